"""``teach_signal``: cross-entropy of ``hidden @ weight^T`` and its gradient w.r.t. ``hidden``."""
from __future__ import annotations

import torch

from hope_kernels import dispatch
from hope_kernels._checks import check_tensor
from hope_kernels.teach_signal.reference import teach_signal_reference

OP = "teach_signal"

dispatch.register(OP, "reference", teach_signal_reference)
try:  # Triton kernels (no build step); absent when triton is not installed
    from hope_kernels.teach_signal import triton as _triton_impl  # noqa: F401
except ImportError:
    pass
try:  # compiled extension (csrc/): CUDA and C++ CPU kernels
    from hope_kernels.teach_signal import cuda as _cuda_impl  # noqa: F401
except ImportError:
    pass


def teach_signal(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy loss and teach signal of a linear LM head, without keeping the logits.

    Args:
        hidden: [N, D] final hidden states (fp32, bf16 or fp16).
        weight: [V, D] head weight (tied to the embedding in our models), same dtype as ``hidden``.
        targets: [N] int64 token ids in [0, V) or ``ignore_index``. The caller shifts them by one
            (position t predicts token t + 1).
    Returns:
        ``(loss, delta)``: ``loss`` is the fp32 scalar mean cross-entropy over non-ignored rows
        (differentiable w.r.t. ``hidden`` and ``weight``; 0 when no row is valid); ``delta`` [N, D]
        = d loss / d hidden = (softmax(logits) - onehot(target)) @ weight / N_valid, zero on ignored
        rows, detached, in ``hidden``'s dtype. (Nested Learning, F1: the error each CMS level is taught with.)
    """
    check_tensor("hidden", hidden, ndim=2)
    check_tensor("weight", weight, ndim=2, device=hidden.device)
    check_tensor("targets", targets, ndim=1, dtypes=(torch.int64, torch.int32), device=hidden.device)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must have shape (V, {hidden.shape[1]}) to match hidden's D={hidden.shape[1]}, "
            f"got {tuple(weight.shape)}"
        )
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},) (one per row of hidden), got {tuple(targets.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    from hope_kernels._checks import value_checks_enabled

    targets = targets.long()
    if value_checks_enabled() and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"targets must be in [0, {weight.shape[0]}) or ignore_index={ignore_index}; "
                f"targets[{i}] = {int(targets[i])}"
            )
    impl = dispatch.resolve_backend(OP, hidden.device, backend)
    return impl.fn(hidden, weight, targets, ignore_index)
