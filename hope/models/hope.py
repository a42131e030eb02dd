"""HOPE (NL arXiv 2512.24695 sec. 8): blocks of self-modifying Titans followed by a Continuum Memory
System chain, tied embedding / head (F1). No attention, so no RoPE.

Block: x = x + SelfModTitans(RMSNorm(x)); x = CMS(x) where each level is x + W2 gelu(W1 rmsnorm(x)).
"""
from __future__ import annotations

import torch
from torch import nn

from hope.layers.cms import CMSChain
from hope.layers.norms import RMSNorm
from hope.layers.self_modifying import SelfModifyingTitans
from hope.models.base import LanguageModel
from hope.models.config import ModelConfig


class HopeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
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

    def forward(self, x, state, collect):
        y, titan_state, metrics = self.titans(self.norm1(x), state)
        x = x + y
        cms_states = None if state is None else state.get("cms")
        x, level_in, level_out = self.cms(x, cms_states, collect)
        titan_state["cms"] = cms_states
        return x, titan_state, metrics, level_in, level_out


class HopeLM(LanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(HopeBlock(config) for _ in range(config.n_layers))
        self._init_weights()

    def backbone(self, x, state, collect):
        new_states, level_inputs, level_outputs = [], [], []
        metrics = dict.fromkeys(("memory_update_norm", "generator_update_norm", "memory_lr_mean",
                                 "memory_clip_fraction", "generator_clip_fraction"), 0.0)
        for i, block in enumerate(self.blocks):
            layer_state = None if state is None else state.layers[i]
            x, s, m, lin, lout = block(x, layer_state, collect)
            new_states.append(s)
            level_inputs.append(lin)
            level_outputs.append(lout)
            for key in list(metrics):  # means over the blocks
                metrics[key] = metrics[key] + m[key] / len(self.blocks)
        aux = {"level_inputs": level_inputs, "level_outputs": level_outputs} if collect else {}
        if collect and self.config.teach_signal == "exact" and torch.is_grad_enabled():
            # parallel mode's exact teach signal: d loss / d level output, captured during the outer backward
            aux["exact_deltas"] = [[None] * len(row) for row in level_outputs]
            for i, row in enumerate(level_outputs):
                for j, o in enumerate(row):
                    if o.requires_grad:
                        o.register_hook(self._capture(aux["exact_deltas"], i, j))
        if state is not None:  # CMS telemetry of the carried state
            for i, layer in enumerate(state.layers):
                for j, st in enumerate(layer.get("cms") or []):
                    metrics[f"cms/layer{i}/level{j}/update_count"] = float(st.update_count)
        return x, new_states, metrics, aux

    @staticmethod
    def _capture(store, i, j):
        def hook(grad):
            store[i][j] = grad.detach()
        return hook
