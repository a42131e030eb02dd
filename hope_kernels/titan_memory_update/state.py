"""State layouts of the Titans memories (fp32 weights and momenta per (batch, head))."""
from __future__ import annotations

from typing import NamedTuple

import torch


class LinearMemoryState(NamedTuple):
    """Linear memory M(x) = W x."""

    W: torch.Tensor  # [B, H, Dv, Dk]
    S: torch.Tensor  # [B, H, Dv, Dk] momentum ("surprise")


class MLPMemoryState(NamedTuple):
    """Residual 2-layer memory M(x) = x + W1 gelu(W2 x)."""

    W1: torch.Tensor  # [B, H, D, E]
    W2: torch.Tensor  # [B, H, E, D]
    S1: torch.Tensor  # [B, H, D, E]
    S2: torch.Tensor  # [B, H, E, D]


def zero_linear_state(B: int, H: int, Dv: int, Dk: int, device) -> LinearMemoryState:
    W = torch.zeros(B, H, Dv, Dk, dtype=torch.float32, device=device)
    return LinearMemoryState(W, torch.zeros_like(W))
