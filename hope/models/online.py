"""Streams in segments and test-time memorisation (docs/architecture.md, NL F1-F4).

The in-context learning itself lives in the models' forward: the Titans / self-modifying memories update token by
token, HOPE's CMS levels at their period boundaries (hope/models/hope.py). Here:
- ``online_forward``: a sequence processed in segments of ``segment_len`` tokens, the state (memories, CMS fast
  weights and open blocks, conv caches) carried with the graph alive (one outer backward);
- ``memorize``: a context read before scoring, its state returned for the continuation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hope.models.base import LanguageModel, ModelState, check_ids

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


def online_forward(model, input_ids, labels, *, segment_len: int, teach_scale: float = 1.0) -> OnlineResult:
    """Process the sequence in segments of ``segment_len`` tokens with the state carried (graph alive across
    segments: one outer backward). Returns the token-weighted mean loss over all segments and the last segment's
    metrics (CMS update counts are the stream's totals)."""
    _check_model(model)
    check_ids("input_ids", input_ids, model.config.vocab_size)
    check_ids("labels", labels, model.config.vocab_size)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len <= 0:
        raise ValueError(f"segment_len must be a positive int, got {segment_len!r}")
    scale = _check_scale(teach_scale)
    T = input_ids.shape[1]
    state, loss_sum, n_total, metrics = None, None, 0, {}
    for s0 in range(0, T, segment_len):
        sl = slice(s0, min(T, s0 + segment_len))
        out = model(input_ids[:, sl], labels=labels[:, sl], state=state, return_state=True, teach_scale=scale)
        n = out.aux["n_valid"]
        loss_sum = out.loss * n if loss_sum is None else loss_sum + out.loss * n
        n_total += n
        metrics = out.metrics
        state = out.state
    loss = loss_sum / max(1, n_total)
    return OnlineResult(loss=loss, metrics={**metrics, "loss": float(loss.detach())}, state=state)


def memorize(model: LanguageModel, input_ids: torch.Tensor, *, paths: tuple[str, ...] = MEMORIZE_PATHS,
             steps: int = 1) -> ModelState | None:
    """Test-time memorisation on a context only (never the answer). Returns a state to score with:
    ``model(continuation, state=memorize(model, context))``.

    One pass reads the context as the forward does: the Titans / self-modifying memories update token by token and
    HOPE's CMS levels fire at their boundaries, taught with the context's own next-token errors; a block left open
    at the end is then fired too (flushed). ``titan``: keep the memories' state (without it they restart from
    their initial weights). ``cms``: keep the CMS levels' state; ``steps`` > 1 reads the context again with the
    levels carried (the memories restart each pass). Transformer++ has nothing to memorise: returns None."""
    _check_model(model)
    check_ids("input_ids", input_ids, model.config.vocab_size)
    if isinstance(paths, str) or not all(p in MEMORIZE_PATHS for p in paths):
        raise ValueError(f"paths must be a tuple drawn from {MEMORIZE_PATHS}, got {paths!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if model.config.arch == "transformer":
        return None
    B = input_ids.shape[0]
    use_cms = "cms" in paths and _has_cms(model)
    cms_states, out = None, None
    cfg = model.config
    for _ in range(steps if use_cms else 1):
        init = None
        if cms_states is not None:
            init = ModelState(pos=0, layers=[{"cms": cs} for cs in cms_states], batch_size=B)
        with torch.no_grad():
            out = model(input_ids, state=init, return_state=True, teach_scale=1.0 if use_cms else 0.0)
        if use_cms:
            cms_states = []
            for layer, block in zip(out.state.layers, model.blocks):
                empty = input_ids.new_zeros((B, 0, cfg.d_model), dtype=torch.float32)
                layer["cms"] = [lvl.push(st, empty, empty, lr=cfg.cms_lr, beta=cfg.cms_beta, precond=cfg.cms_precond,
                                         backend=cfg.backend, flush=True)
                                for lvl, st in zip(block.cms.levels, layer["cms"])]
                cms_states.append(layer["cms"])
    state = out.state.detach()
    for layer in state.layers:
        if "titan" not in paths:
            layer["mem"] = None
            layer["gen"] = None
        if "cms" not in paths and "cms" in layer:
            layer["cms"] = None
    return state


__all__ = ["online_forward", "memorize", "OnlineResult", "MEMORIZE_PATHS"]
