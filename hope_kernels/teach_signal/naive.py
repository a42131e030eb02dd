"""Naive teach signal: materialises the [N, V] logits (the readable ground truth and the "reference" backend)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hope_kernels.backends import Backend


def teach_signal_naive(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """loss = mean CE(hidden @ weight^T, targets) over non-ignored rows; delta = d loss / d hidden.

    The loss keeps its autograd graph (to hidden and weight); delta is returned detached, in the
    dtype of ``hidden``. With no valid target the loss is 0 and delta is 0 (F.cross_entropy gives NaN).
    """
    logits = hidden.float() @ weight.float().t()  # [N, V], fp32 accumulation
    valid = targets != ignore_index
    n_valid = valid.sum()
    loss_sum = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    loss = loss_sum / n_valid.clamp_min(1)
    with torch.no_grad():
        # NL's teach signal (F1): (softmax - onehot) @ W / N_valid, zero on ignored rows
        probs = torch.softmax(logits.detach(), dim=-1)
        safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        probs.scatter_add_(1, safe_t[:, None], -torch.ones_like(probs[:, :1]))
        probs.mul_((valid.float() / n_valid.clamp_min(1).float())[:, None])
        delta = (probs @ weight.detach().float()).to(hidden.dtype)
    return loss, delta


BACKEND = Backend("teach_signal", "reference", priority=0, kernel=teach_signal_naive)
