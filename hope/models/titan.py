"""TITAN baseline (Titans arXiv 2501.00663): LMM (memory as the sequence mixer) and MAG (memory as a
gate on sliding-window attention, Titans sec. 4.2) with persistent tokens (sec. 3.3): ``persistent_tokens``
learnable tokens prepended to a stream, attended by every query of the sliding window (SW-Attn*)."""
from __future__ import annotations

import torch
from torch import nn

from hope.layers.attention import Attention
from hope.layers.mlp import SwiGLU
from hope.layers.norms import RMSNorm
from hope.layers.titan_memory import TitanMemory
from hope.models.base import LanguageModel
from hope.models.config import ModelConfig


class TitanBlock(nn.Module):
    """x + mixer(norm(x)); x + SwiGLU(norm(x)). mixer: memory (lmm) or SWA gated by memory (mag):
    o = W_o(RMSNorm(y_attn) * sigmoid(RMSNorm(y_mem)))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.variant = cfg.titan_variant
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.memory = TitanMemory(cfg.d_model, cfg.n_heads, memory=cfg.memory, expansion=cfg.memory_expansion,
                                  chunk_size=cfg.chunk_size, rule=cfg.rule, conv_window=cfg.conv_window,
                                  normalize_v=cfg.normalize_v, update_clip=cfg.mem_update_clip, backend=cfg.backend)
        if self.variant == "mag":
            self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.rope_theta, window=cfg.window, out_proj=False)
            self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.mem_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, state, pos_offset: int, prefix: int = 0):
        xn = self.norm1(x)
        y_mem, new_state, metrics = self.memory(xn, state)
        if self.variant == "mag":
            y_attn = self.attn(xn, pos_offset, prefix)
            y = self.out(self.attn_norm(y_attn) * torch.sigmoid(self.mem_norm(y_mem)))
        else:
            y = y_mem
        x = x + y
        return x + self.ffn(self.norm2(x)), new_state, metrics


class TitanLM(LanguageModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(TitanBlock(config) for _ in range(config.n_layers))
        if config.persistent_tokens > 0:
            self.persistent = nn.Parameter(torch.randn(config.persistent_tokens, config.d_model) * config.init_std)
        self._init_weights()
        for block in self.blocks:
            block.memory.reset_gate_bias()

    def backbone(self, x, state, collect, teach):
        B, T, _ = x.shape
        P = self.config.persistent_tokens
        # persistent tokens open a stream (state None): chaining segments equals one call on the whole
        prepend = P > 0 and (state is None or state.pos == 0)
        if prepend:
            x = torch.cat([self.persistent.to(x.dtype).unsqueeze(0).expand(B, P, -1), x], dim=1)
        pos = 0 if state is None else state.pos + (P if P > 0 else 0)
        new_states, metrics = [], {}
        mem_norm, lr_mean, clip_frac = 0.0, 0.0, 0.0
        for i, block in enumerate(self.blocks):
            layer_state = None if state is None else state.layers[i]
            x, s, m = block(x, layer_state, pos, P if prepend else 0)
            new_states.append(s)
            mem_norm = mem_norm + m["memory_update_norm"]
            lr_mean = lr_mean + m["memory_lr_mean"]
            clip_frac = clip_frac + m["memory_clip_fraction"]
        metrics["memory_update_norm"] = mem_norm / len(self.blocks)
        metrics["memory_lr_mean"] = lr_mean / len(self.blocks)
        metrics["memory_clip_fraction"] = clip_frac / len(self.blocks)
        if prepend:
            x = x[:, P:]
        return x, new_states, metrics, {}
