"""``teach_signal``: the public function and the ``hope::teach_signal`` custom op every kernel backend runs through.

Backends: ``cuda`` (csrc/teach_signal.cu), ``triton``, ``reference`` (naive.py). A kernel backend's
``kernel(hidden, weight, targets, ignore_index, compute_dw, chunk_rows) -> (loss fp32 scalar, delta [N, D] in hidden's
dtype, dW [V, D] fp32 or [0, D])`` forms every gradient in the forward pass (Liger's layout), so the op's backward
only scales delta and dW by the incoming gradient of the loss (``register_autograd``); the fake lets
``torch.compile(fullgraph=True)`` trace it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hope_kernels import backends
from hope_kernels._checks import check_tensor, value_checks_enabled
from hope_kernels.teach_signal.naive import teach_signal_naive

OP = "teach_signal"
backends.register_modules(OP, "hope_kernels.teach_signal", ("naive", "triton", "cuda"))


@dataclass(frozen=True)
class TeachSignalCall:
    """What a backend is asked to run: N rows of hidden [N, D] against a head weight [V, D]."""

    device: torch.device
    dtype: torch.dtype
    N: int
    V: int
    D: int


@torch.library.custom_op("hope::teach_signal", mutates_args=())
def teach_signal_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                    compute_dw: bool, chunk_rows: int,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss fp32 scalar, delta [N, D] in hidden's dtype, dW [V, D] fp32 or [0, D] when not computed)."""
    return tuple(backends.get(OP, backend).kernel(hidden, weight, targets, ignore_index, compute_dw, chunk_rows))


@teach_signal_op.register_fake
def _(hidden, weight, targets, ignore_index, compute_dw, chunk_rows, backend):
    N, D = hidden.shape
    V = weight.shape[0] if compute_dw else 0
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(N, D),
            hidden.new_empty(V, D, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    _hidden, weight, _targets, _ignore_index, compute_dw, _chunk_rows, backend = inputs
    _loss, delta, dw = output
    ctx.save_for_backward(delta, dw)
    ctx.compute_dw, ctx.weight_dtype, ctx.backend = compute_dw, weight.dtype, backend


def _backward(ctx, grad_loss, _grad_delta, _grad_dw):
    # d loss / d hidden = delta and d loss / d weight = dW, both already formed in the forward pass
    delta, dw = ctx.saved_tensors
    grad_hidden = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_hidden = (grad_loss * delta.float()).to(delta.dtype)
    if ctx.needs_input_grad[1]:
        if not ctx.compute_dw:
            raise RuntimeError(f"teach_signal {ctx.backend}: weight needs a gradient but dW was not computed in the "
                               "forward")
        grad_weight = (grad_loss * dw).to(ctx.weight_dtype)
    return grad_hidden, grad_weight, None, None, None, None, None


teach_signal_op.register_autograd(_backward, setup_context=_setup_context)


def teach_signal(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy loss and teach signal of a linear LM head, without keeping the logits.

    Args:
        hidden: [N, D] final hidden states (fp32, bf16 or fp16).
        weight: [V, D] head weight (tied to the embedding in our models), same dtype as ``hidden``, V >= 1.
        targets: [N] int64 token ids in [0, V) or ``ignore_index``. The caller shifts them by one
            (position t predicts token t + 1).
        backend: ``"auto"`` or one of ``cuda``, ``triton``, ``reference``.
        chunk_rows: rows of logits the CUDA kernel forms at a time (0: it picks).
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
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have at least one row (a vocabulary of V >= 1 tokens), got shape "
                         f"{tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},) (one per row of hidden), got {tuple(targets.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 0:
        raise ValueError(f"chunk_rows must be an int >= 0 (0: the kernel picks), got {chunk_rows!r}")
    targets = targets.long()
    if value_checks_enabled() and targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"targets must be in [0, {weight.shape[0]}) or ignore_index={ignore_index}; "
                f"targets[{i}] = {int(targets[i])}"
            )
    (N, D), V = hidden.shape, weight.shape[0]
    rec = backends.resolve_backend(OP, hidden.device, backend, TeachSignalCall(hidden.device, hidden.dtype, N, V, D))
    if rec.name == "reference":
        return teach_signal_naive(hidden, weight, targets, ignore_index)
    compute_dw = bool(torch.is_grad_enabled() and weight.requires_grad)
    loss, delta, _dw = teach_signal_op(hidden, weight, targets, ignore_index, compute_dw, chunk_rows, rec.name)
    return loss, delta.detach()
