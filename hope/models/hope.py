"""HOPE (NL arXiv 2512.24695 sec. 8): blocks of self-modifying Titans followed by a Continuum Memory
System chain, tied embedding / head (F1). No attention, so no RoPE.

Block: x = x + SelfModTitans(RMSNorm(x)); x = CMS(x) where each level is x + W2 gelu(W1 rmsnorm(x)).

The CMS learns within the sequence (``cms_mode``, docs/equations.md "Continual CMS"): level l's weights at token t
are its slow weights plus the updates fired at each multiple of period_l before t, each from the errors of the
tokens before that boundary.
- ``chunk_parallel`` (default): a teach pass at the segment-start weights gives every level's error per token
  (token-local: d loss_t / d y_t along paths that stay at token t, so no later token's label can reach it); then
  the forward reads each block with its updated weights in the dual form (``CMSLevel.continual``).
- ``sequential`` (exact): the segment is cut at every boundary; at a boundary the level's error is
  d (loss of its block's tokens) / d (its outputs) by autograd through everything, taken at the current weights.
- ``static``: the levels keep the stream's current weights (no in-context update; ablation).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from hope.layers.cms import CMSChain
from hope.layers.norms import RMSNorm
from hope.layers.self_modifying import SelfModifyingTitans
from hope.models.base import LanguageModel, TeachContext
from hope.models.config import ModelConfig

_TITAN_METRICS = ("memory_update_norm", "generator_update_norm", "memory_lr_mean", "memory_clip_fraction",
                  "generator_clip_fraction")


class HopeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cms_lr, self.cms_beta = cfg.cms_lr, cfg.cms_beta
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.titans = SelfModifyingTitans(cfg.d_model, cfg.n_heads, expansion=cfg.memory_expansion,
                                          mem_chunk_size=cfg.mem_chunk_size, gen_chunk_size=cfg.gen_chunk_size,
                                          gen_update_clip=cfg.gen_update_clip, mem_update_clip=cfg.mem_update_clip,
                                          conv_window=cfg.conv_window, rule=cfg.rule, selfmod=cfg.selfmod,
                                          adaptive_q=cfg.adaptive_q, normalize_v=cfg.normalize_v,
                                          mem_readout=cfg.mem_readout, momentum=cfg.selfmod_momentum,
                                          backend=cfg.backend)
        self.cms = CMSChain(cfg.d_model, cfg.cms_hidden, cfg.active_cms_periods, cfg.init_std,
                            out_scale=(2 * cfg.n_layers) ** -0.5)

    def forward(self, x, state, collect, teach=None, local_grad: bool = False, titans_out=None):
        """``teach``: per level (inputs, errors) of the teach pass for the chunk-parallel continual CMS; None: the
        levels read with the stream's current weights. ``local_grad``: the teach pass (same-token gradient paths
        through the self-modifying Titans). ``titans_out``: the self-modifying Titans' (y, state, metrics) for this
        x and state, already computed (the first block's, shared by the teach pass and the forward). Every layer
        runs inside this forward (FSDP gathers a block's weights around its forward)."""
        if titans_out is None:
            titans_out = self.titans(self.norm1(x), state, local_grad=local_grad)
        y, titan_state, metrics = titans_out
        x = x + y
        cms_states = None if state is None else state.get("cms")
        if teach is None:
            x, level_in, level_out = self.cms(x, cms_states, collect)
        else:
            x, cms_states, level_in, level_out = self.cms.continual(x, teach, cms_states, lr=self.cms_lr,
                                                                    beta=self.cms_beta, collect=collect)
        titan_state["cms"] = cms_states
        return x, titan_state, metrics, level_in, level_out


class HopeLM(LanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(HopeBlock(config) for _ in range(config.n_layers))
        self._init_weights()

    def _layer_state(self, state, i):
        return None if state is None else state.layers[i]

    def backbone(self, x, state, collect, teach: TeachContext):
        cfg = self.config
        learns = cfg.cms_levels > 0 and teach.scale > 0 and cfg.cms_mode != "static"
        if learns and cfg.cms_mode == "sequential":
            return self._sequential(x, state, collect, teach)
        first = self._first_titans(x, state) if learns else None
        level_teach = self._teach_pass(x, state, teach, first) if learns else None
        new_states, level_inputs, level_outputs = [], [], []
        metrics = dict.fromkeys(_TITAN_METRICS, 0.0)
        for i, block in enumerate(self.blocks):
            x, s, m, lin, lout = block(x, self._layer_state(state, i), collect,
                                       None if level_teach is None else level_teach[i],
                                       titans_out=first if i == 0 else None)
            new_states.append(s)
            level_inputs.append(lin)
            level_outputs.append(lout)
            for key in metrics:  # means over the blocks
                metrics[key] = metrics[key] + m[key] / len(self.blocks)
        aux = {"level_inputs": level_inputs, "level_outputs": level_outputs} if collect else {}
        if collect and level_teach is not None:
            aux["level_teach"] = level_teach
        metrics.update(cms_telemetry(new_states))
        return x, new_states, metrics, aux

    def _first_titans(self, x, state):
        """The first block's self-modifying Titans (y, state, metrics) with the forward's gradients, computed once
        for the teach pass (which reads it at the forward's own input and state and takes no gradient through it)
        and the forward; None under FSDP, whose hooks gather a block only around its own forward."""
        b0 = self.blocks[0]
        if _is_fsdp(b0):
            return None
        return b0.titans(b0.norm1(x), self._layer_state(state, 0))

    # ------------------------------------------------------------------------------------- teach signals
    def _teach_loss(self, h, labels):
        """Summed next-token cross-entropy of h [B, T, D] (per-token units) and the head's per-token delta."""
        from hope_kernels import teach_signal

        B, T, D = h.shape
        hn = self.final_norm(h)
        loss, delta = teach_signal(hn.reshape(B * T, D), self.head_weight.to(hn.dtype), labels.reshape(-1).long(),
                                   backend=self.config.backend)
        n_valid = int((labels != -100).sum())
        return loss * n_valid, delta.view(B, T, D) * n_valid

    def _teach_pass(self, x, state, teach: TeachContext, first=None):
        """Per layer, per level: (input, error at the level's output) [B, T, D] of every token, at the weights the
        segment starts with (chunk-parallel form). ``exact``: d loss_t / d y_t by one backward in which the
        self-modifying Titans pass gradients only along same-token paths (``local_grad``), so no token's error
        holds a later token's loss; ``shared``: the head's delta for every level."""
        cfg = self.config
        exact = cfg.teach_signal == "exact"
        # FSDP2-sharded blocks: gathered for the whole pass and called without their hooks, so the backward below
        # runs none of FSDP's backward hooks (it computes no parameter gradient)
        sharded = [b for b in self.blocks if _is_fsdp(b)]
        for b in sharded:
            b.unshard()
        try:
            with torch.enable_grad() if exact else torch.no_grad():
                h = x.detach()
                inputs, outputs = [], []
                for i, block in enumerate(self.blocks):
                    shared = None  # the first block's Titans from the forward (``first``): its values, no graph
                    if i == 0 and first is not None:
                        shared = (first[0].detach(), dict(first[1]), first[2])
                    h, _, _, lin, lout = block.forward(h, self._layer_state(state, i), True, local_grad=True,
                                                       titans_out=shared)
                    inputs.append(lin)
                    outputs.append(lout)
                loss, head_delta = self._teach_loss(h, teach.labels)
                if exact:
                    flat = [o for row in outputs for o in row]
                    grads = iter(torch.autograd.grad(loss, flat, allow_unused=True))
                    errors = [[torch.zeros_like(o) if g is None else g for o, g in zip(row, grads)] for row in outputs]
                else:
                    errors = [[head_delta] * len(row) for row in outputs]
        finally:
            for b in sharded:
                b.reshard()
        return [[(xi, e.detach().float() * teach.scale) for xi, e in zip(ri, re)] for ri, re in zip(inputs, errors)]

    # ----------------------------------------------------------------------------------- sequential (exact)
    def _sequential(self, x, state, collect, teach: TeachContext):
        """Exact continual CMS: the segment is cut wherever a level's block ends; the block's error is
        d (its tokens' summed loss) / d (the level's outputs) through everything, at the current weights; then the
        level fires ``cms_update`` at those weights (``CMSLevel.push``). Tokens of a block still open at the end of
        the call are taught from their own losses and wait in the state."""
        cfg = self.config
        if any(_is_fsdp(b) for b in self.blocks):
            raise ValueError("ModelConfig.cms_mode='sequential' does not run under FSDP (its teach signals are "
                             "backward passes inside the forward); use cms_mode='chunk_parallel'")
        B, T, D = x.shape
        layers = [dict(self._layer_state(state, i) or {}) for i in range(len(self.blocks))]
        for layer, block in zip(layers, self.blocks):
            if layer.get("cms") is None:
                layer["cms"] = [lvl.fresh_state(B, x.device) for lvl in block.cms.levels]
        exact = cfg.teach_signal == "exact"
        grad_ctx = torch.enable_grad() if exact else contextlib.nullcontext()
        # per level: the open block's (input, output, index of the segment loss) triples
        pending = [[[] for _ in block.cms.levels] for block in self.blocks]
        seg_losses, outs, metrics_sum = [], [], dict.fromkeys(_TITAN_METRICS, 0.0)
        level_inputs = [[[] for _ in block.cms.levels] for block in self.blocks]
        level_outputs = [[[] for _ in block.cms.levels] for block in self.blocks]
        n_seg = 0

        def fire(i, j):
            items = pending[i][j]
            if not items:
                return
            level = self.blocks[i].cms.levels[j]
            xs = torch.cat([xi for xi, _, _ in items], 1)
            if exact:
                loss = sum(seg_losses[k] for k in sorted({k for _, _, k in items}))
                # only this block's tokens' losses: its outputs cannot reach earlier ones
                grads = torch.autograd.grad(loss, [yo for _, yo, _ in items], retain_graph=True, allow_unused=True)
                err = torch.cat([torch.zeros_like(yo) if g is None else g for (_, yo, _), g in zip(items, grads)], 1)
            else:
                err = torch.cat([seg_losses[k][1] for _, _, k in items], 1)
            layers[i]["cms"][j] = level.push(layers[i]["cms"][j], xs, err.detach().float() * teach.scale,
                                             lr=cfg.cms_lr, beta=cfg.cms_beta, precond=cfg.cms_precond,
                                             backend=cfg.backend)
            pending[i][j] = []

        with grad_ctx:
            pos = 0
            while pos < T:
                room = min(lvl.period - layers[i]["cms"][j].fill - sum(yo.shape[1] for _, yo, _ in pending[i][j])
                           for i, block in enumerate(self.blocks) for j, lvl in enumerate(block.cms.levels))
                sl = slice(pos, min(T, pos + room))
                h = x[:, sl]
                for i, block in enumerate(self.blocks):
                    h, s, m, lin, lout = block(h, layers[i], True)
                    layers[i].update({k: v for k, v in s.items() if k != "cms"})
                    for key in metrics_sum:
                        metrics_sum[key] = metrics_sum[key] + m[key]
                    for j, (xin, yout) in enumerate(zip(lin, lout)):
                        pending[i][j].append((xin, yout, len(seg_losses)))
                        if collect:
                            level_inputs[i][j].append(xin)
                            level_outputs[i][j].append(yout)
                loss, head_delta = self._teach_loss(h, teach.labels[:, sl])
                seg_losses.append(loss if exact else (loss, head_delta))
                outs.append(h)
                n_seg += 1
                pos = sl.stop
                for i, block in enumerate(self.blocks):
                    for j, lvl in enumerate(block.cms.levels):
                        open_len = layers[i]["cms"][j].fill + sum(yo.shape[1] for _, yo, _ in pending[i][j])
                        if open_len == lvl.period:
                            fire(i, j)
            for i, block in enumerate(self.blocks):  # blocks still open: taught from their own tokens' losses
                for j in range(len(block.cms.levels)):
                    fire(i, j)
        h = torch.cat(outs, 1)
        if exact and not torch.is_grad_enabled():
            h = h.detach()
        metrics = {k: v / (n_seg * len(self.blocks)) for k, v in metrics_sum.items()}
        metrics.update(cms_telemetry(layers))
        aux = {}
        if collect:
            aux = {"level_inputs": [[torch.cat(c, 1) for c in row] for row in level_inputs],
                   "level_outputs": [[torch.cat(c, 1) for c in row] for row in level_outputs]}
        return h, layers, metrics, aux


def _is_fsdp(module) -> bool:
    """An FSDP2 (``fully_shard``) module: gathers its weights with ``unshard()``."""
    return callable(getattr(module, "unshard", None)) and callable(getattr(module, "reshard", None))


def cms_telemetry(layer_states) -> dict:
    """Per level: updates fired so far in the stream, last update's L2 norm, teach-signal norm of the last call
    (per layer, and the update counts summed over layers)."""
    metrics: dict = {}
    for i, layer in enumerate(layer_states or []):
        for j, st in enumerate((layer or {}).get("cms") or []):
            if st is None:
                continue
            metrics[f"cms/layer{i}/level{j}/update_count"] = float(st.update_count)
            metrics[f"cms/layer{i}/level{j}/update_norm"] = st.update_norm
            metrics[f"cms/layer{i}/level{j}/teach_signal_norm"] = st.teach_signal_norm
            metrics[f"cms/level{j}/update_count"] = metrics.get(f"cms/level{j}/update_count", 0.0) + st.update_count
    return metrics
