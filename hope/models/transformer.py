"""Transformer++ baseline: pre-RMSNorm blocks of RoPE SDPA attention and SwiGLU, tied head."""
from __future__ import annotations

from torch import nn

from hope.layers.attention import Attention
from hope.layers.mlp import SwiGLU
from hope.layers.norms import RMSNorm
from hope.models.base import LanguageModel
from hope.models.config import ModelConfig


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.rope_theta)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, pos_offset: int = 0):
        x = x + self.attn(self.norm1(x), pos_offset)
        return x + self.ffn(self.norm2(x))


class TransformerLM(LanguageModel):
    """Transformer++ (RMSNorm, SwiGLU, RoPE, SDPA). Stateless: ``state`` is ignored, returns None."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self._init_weights()

    def _check_state(self, state, batch_size):
        return  # nothing to carry: any state is ignored

    def backbone(self, x, state, collect, teach):
        for block in self.blocks:
            x = block(x)
        return x, None, {}, {}
