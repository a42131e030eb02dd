"""Fast state and inner updates: the faithful segment-by-segment mode, the parallel mode's inner
updates after the outer step, and test-time memorisation (docs/architecture.md, NL F1-F4).

Teach signal (F1): each CMS level is taught with an error at its output, in per-token units (the
gradient of that token's cross-entropy, i.e. d mean-loss / d output times the number of valid
tokens), times ``teach_scale``:
- ``shared``: the head delta d loss / d final hidden (``hope_kernels.teach_signal``) for every level;
- ``exact``: d segment-loss / d level output (``torch.autograd.grad`` in the online mode; in the
  parallel mode captured by tensor hooks during the outer backward).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hope.models.base import LanguageModel, ModelOutput, ModelState, check_ids

MEMORIZE_PATHS = ("titan", "cms")


@dataclass
class OnlineResult:
    loss: torch.Tensor
    metrics: dict = field(default_factory=dict)
    state: ModelState | None = None


def _has_cms(model) -> bool:
    return model.config.arch == "hope" and model.config.cms_levels > 0


def _check_model(model):
    if not isinstance(model, LanguageModel):
        raise TypeError(f"model must be a model from hope.models.build_model, got {type(model).__name__}")


def _check_scale(teach_scale) -> float:
    if isinstance(teach_scale, bool) or not isinstance(teach_scale, (int, float)):
        raise TypeError(f"teach_scale must be a float, got {type(teach_scale).__name__}")
    if not teach_scale >= 0:
        raise ValueError(f"teach_scale must be >= 0, got {teach_scale}")
    return float(teach_scale)


def level_deltas(model, out: ModelOutput, scale: float, *, from_hooks: bool = False):
    """Per layer, per level: the error [B, T, D] each CMS level is taught with (detached, fp32)."""
    cfg = model.config
    n_valid = max(1, out.aux.get("n_valid", 1))
    levels = [len(b.cms.levels) for b in model.blocks]
    if cfg.teach_signal == "shared":
        if out.teach_delta is None:
            raise ValueError("out.teach_delta is None: the forward needs labels to produce a teach signal")
        d = out.teach_delta.detach().float() * (n_valid * scale)
        return [[d] * n for n in levels]
    if from_hooks:
        grads = out.aux.get("exact_deltas")
        if grads is None or any(g is None for row in grads for g in row):
            raise RuntimeError("teach_signal='exact' in the parallel mode: call apply_parallel_inner_updates "
                               "after loss.backward() of a training forward (the deltas are captured by hooks)")
        return [[g.detach().float() * (n_valid * scale) for g in row] for row in grads]
    outputs = [o for row in out.aux["level_outputs"] for o in row]
    grads = torch.autograd.grad(out.loss, outputs, retain_graph=True, allow_unused=True)
    res, it = [], iter(grads)
    for row in out.aux["level_outputs"]:
        res.append([(torch.zeros_like(o) if g is None else g).detach().float() * (n_valid * scale)
                    for o, g in zip(row, (next(it) for _ in row))])
    return res


def _push_cms(model, state: ModelState, out: ModelOutput, deltas, flush: bool = False) -> None:
    cfg = model.config
    B = out.hidden.shape[0]
    for i, block in enumerate(model.blocks):
        layer = state.layers[i]
        cms_states = layer.get("cms") or [lvl.fresh_state(B, out.hidden.device) for lvl in block.cms.levels]
        layer["cms"] = [
            lvl.push(cs, out.aux["level_inputs"][i][j], deltas[i][j], lr=cfg.cms_lr, beta=cfg.cms_beta,
                     precond=cfg.cms_precond, backend=cfg.backend, flush=flush)
            for j, (lvl, cs) in enumerate(zip(block.cms.levels, cms_states))
        ]


def cms_telemetry(state: ModelState | None) -> dict:
    """Per level: update count, last update L2 norm, teach-signal norm (per layer and summed over layers)."""
    metrics: dict = {}
    if state is None:
        return metrics
    for i, layer in enumerate(state.layers):
        for j, st in enumerate(layer.get("cms") or []):
            metrics[f"cms/layer{i}/level{j}/update_count"] = float(st.update_count)
            metrics[f"cms/layer{i}/level{j}/update_norm"] = st.update_norm
            metrics[f"cms/layer{i}/level{j}/teach_signal_norm"] = st.teach_signal_norm
            metrics[f"cms/level{j}/update_count"] = metrics.get(f"cms/level{j}/update_count", 0.0) + st.update_count
    return metrics


def online_forward(model, input_ids, labels, *, segment_len: int, teach_scale: float = 1.0,
                   update_cms: bool = True) -> OnlineResult:
    """Faithful mode: process the sequence in segments of ``segment_len`` tokens. Titans memories
    carry their state (graph alive across segments: one outer backward); after each segment every
    CMS level buffers (input, teach delta) per token and fires ``cms_update`` when its buffer fills.
    Returns the token-weighted mean loss over all segments."""
    _check_model(model)
    check_ids("input_ids", input_ids, model.config.vocab_size)
    check_ids("labels", labels, model.config.vocab_size)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len <= 0:
        raise ValueError(f"segment_len must be a positive int, got {segment_len!r}")
    scale = _check_scale(teach_scale)
    if not isinstance(update_cms, bool):
        raise TypeError(f"update_cms must be a bool, got {type(update_cms).__name__}")
    T = input_ids.shape[1]
    state, loss_sum, n_total, tsn = None, None, 0, 0.0
    for s0 in range(0, T, segment_len):
        sl = slice(s0, min(T, s0 + segment_len))
        out = model(input_ids[:, sl], labels=labels[:, sl], state=state, return_state=True, collect=True)
        n = out.aux["n_valid"]
        loss_sum = out.loss * n if loss_sum is None else loss_sum + out.loss * n
        n_total += n
        tsn = out.metrics.get("teach_signal_norm", 0.0)
        if out.state is not None and _has_cms(model) and update_cms and scale > 0:
            _push_cms(model, out.state, out, level_deltas(model, out, scale))
        state = out.state
    loss = loss_sum / max(1, n_total)
    metrics = {"loss": float(loss.detach()), "teach_signal_norm": tsn, **cms_telemetry(state)}
    return OnlineResult(loss=loss, metrics=metrics, state=state)


@torch.no_grad()
def _slow_update(model, level, x, d, lr, beta, precond, backend):
    from hope_kernels import cms_update
    from hope_kernels.cms_update import CMSParams

    params = CMSParams(level.w1.detach().float().unsqueeze(0).contiguous(),
                       level.w2.detach().float().unsqueeze(0).contiguous())
    moms = CMSParams(level.mom1.float().unsqueeze(0).contiguous(), level.mom2.float().unsqueeze(0).contiguous())
    new_p, new_m, stats = cms_update(params, moms, x, d, lr=lr, beta=beta, precond=precond, backend=backend)
    level.w1.copy_(new_p.w1[0])
    level.w2.copy_(new_p.w2[0])
    level.mom1.copy_(new_m.w1[0])
    level.mom2.copy_(new_m.w2[0])
    return float((stats.w1_update_norm.pow(2) + stats.w2_update_norm.pow(2)).sqrt()[0])


def apply_parallel_inner_updates(model, out: ModelOutput, teach_scale: float) -> dict:
    """Parallel mode, after the outer step: apply the CMS levels' inner updates to the SLOW weights
    (no_grad). Level l fires once per full block of ``period_l`` tokens of the sequence just trained
    on (T // period updates, in order), on the batch's tokens of that block with the teach delta
    averaged over the batch (divided by B), times ``teach_scale``; tail tokens (T % period) are dropped.
    Returns telemetry (``cms/level{j}/update_count``, ``.../update_norm``, ``.../teach_signal_norm``)."""
    _check_model(model)
    if not isinstance(out, ModelOutput):
        raise TypeError(f"out must be the ModelOutput of a training forward, got {type(out).__name__}")
    scale = _check_scale(teach_scale)
    if not _has_cms(model) or scale == 0.0:
        return {}
    if "level_inputs" not in out.aux or out.teach_delta is None:
        raise ValueError("out must come from a forward with labels in training mode (model.train()) or "
                         "collect=True: it carries no CMS level inputs / teach delta")
    cfg = model.config
    deltas = level_deltas(model, out, scale, from_hooks=True)
    metrics: dict = {}
    B, T, D = out.hidden.shape
    for i, block in enumerate(model.blocks):
        for j, level in enumerate(block.cms.levels):
            x, d = out.aux["level_inputs"][i][j], deltas[i][j] / B
            C = level.period
            norm = 0.0
            for u in range(T // C):
                xb = x[:, u * C:(u + 1) * C].reshape(1, B * C, D).float()
                db = d[:, u * C:(u + 1) * C].reshape(1, B * C, D)
                norm = _slow_update(model, level, xb, db, cfg.cms_lr, cfg.cms_beta, cfg.cms_precond, cfg.backend)
            metrics[f"cms/layer{i}/level{j}/update_count"] = float(T // C)
            metrics[f"cms/layer{i}/level{j}/update_norm"] = norm
            metrics[f"cms/layer{i}/level{j}/teach_signal_norm"] = float(d.norm())
            metrics[f"cms/level{j}/update_count"] = metrics.get(f"cms/level{j}/update_count", 0.0) + T // C
    return metrics


def memorize(model: LanguageModel, input_ids: torch.Tensor, *, paths: tuple[str, ...] = MEMORIZE_PATHS,
             steps: int = 1) -> ModelState | None:
    """Test-time memorisation on a context only (never the answer). Returns a state to score with:
    ``model(continuation, state=memorize(model, context))``.

    ``titan``: the Titans / self-modifying memories after reading the context (their in-context
    updates); without it they restart from their initial weights. ``cms``: ``steps`` passes over
    the context, each teaching the CMS levels with the context's own next-token loss (labels = the
    context shifted by one; partial buffers are flushed at the end of each pass).
    Transformer++ has nothing to memorise: returns None."""
    _check_model(model)
    check_ids("input_ids", input_ids, model.config.vocab_size)
    if isinstance(paths, str) or not all(p in MEMORIZE_PATHS for p in paths):
        raise ValueError(f"paths must be a tuple drawn from {MEMORIZE_PATHS}, got {paths!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if model.config.arch == "transformer":
        return None
    B, T = input_ids.shape
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    use_cms = "cms" in paths and _has_cms(model)
    need_grad = use_cms and model.config.teach_signal == "exact"
    cms_states = None
    out = None
    for _ in range(steps if use_cms else 1):
        init = None
        if cms_states is not None:
            init = ModelState(pos=0, layers=[{"cms": cs} for cs in cms_states], batch_size=B)
        with torch.set_grad_enabled(need_grad):
            out = model(input_ids, labels=labels, state=init, return_state=True, collect=use_cms)
            if use_cms:
                _push_cms(model, out.state, out, level_deltas(model, out, 1.0), flush=True)
                cms_states = [layer["cms"] for layer in out.state.layers]
    state = out.state.detach()
    for layer in state.layers:
        if "titan" not in paths:
            layer["mem"] = None
            layer["gen"] = None
        if "cms" not in paths and "cms" in layer:
            layer["cms"] = None
    return state


__all__ = ["online_forward", "apply_parallel_inner_updates", "memorize", "OnlineResult", "level_deltas",
           "cms_telemetry", "MEMORIZE_PATHS"]
