"""Causal multi-head attention with RoPE and SDPA; optional sliding window (Titans MAG branch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [T, head_dim/2] for absolute positions (RoFormer rotary embedding)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_even, x_odd) of x [B, H, T, Dh] by the position angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    y1 = x1 * cos - x2 * sin
    y2 = x1 * sin + x2 * cos
    return torch.stack((y1, y2), dim=-1).flatten(-2)


def sliding_window_mask(T: int, window: int, device, prefix: int = 0) -> torch.Tensor:
    """Boolean [T, T] mask, True where query t may attend key s: t - window < s <= t, or s < ``prefix`` (persistent
    tokens, attended by every query: Titans sec. 3.3 / 4.2)."""
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & ((diff < window) | (i[None, :] < prefix))


class Attention(nn.Module):
    """q, k, v projections, RoPE on q and k, SDPA (causal or sliding window), output projection."""

    def __init__(self, dim: int, n_heads: int, rope_theta: float = 10000.0, window: int | None = None,
                 out_proj: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.rope_theta = rope_theta
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False) if out_proj else nn.Identity()

    def forward(self, x: torch.Tensor, pos_offset: int = 0, prefix: int = 0) -> torch.Tensor:
        """``prefix``: leading positions every query may attend whatever the window (persistent tokens)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        positions = torch.arange(pos_offset, pos_offset + T, device=x.device)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.window is None or self.window >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = sliding_window_mask(T, self.window, x.device, prefix)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, D))
