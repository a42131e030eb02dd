"""The fused teach-signal custom op shared by the kernel backends (Triton, CUDA): one schema, fake and autograd.

A backend supplies ``forward(hidden, weight, targets, ignore_index, compute_dw, chunk_rows) -> (loss fp32 scalar,
delta [N, D] in hidden's dtype, dW [V, D] fp32 or [0, D])``; the forward pass forms every gradient (Liger's
layout), so the backward only scales delta and dW by the incoming gradient of the loss. :func:`define_fused_op`
registers it as ``hope::teach_signal_<backend>`` (``torch.library.custom_op`` + ``register_fake`` +
``register_autograd``, so ``torch.compile(fullgraph=True)`` traces it); :func:`backend_entry` gives the
``teach_signal`` backend function ``(hidden, weight, targets, ignore_index) -> (loss, delta)``.
"""
from __future__ import annotations

from typing import Callable

import torch


def define_fused_op(backend: str, forward: Callable):
    """Registers ``hope::teach_signal_<backend>`` around ``forward``; returns the op."""

    @torch.library.custom_op(f"hope::teach_signal_{backend}", mutates_args=())
    def op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, compute_dw: bool,
           chunk_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss fp32 scalar, delta [N, D] in hidden's dtype, dW [V, D] fp32 or [0, D] when not computed)."""
        return tuple(forward(hidden, weight, targets, ignore_index, compute_dw, chunk_rows))

    @op.register_fake
    def _(hidden, weight, targets, ignore_index, compute_dw, chunk_rows=0):
        N, D = hidden.shape
        V = weight.shape[0] if compute_dw else 0
        return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(N, D),
                hidden.new_empty(V, D, dtype=torch.float32))

    def setup_context(ctx, inputs, output):
        _hidden, weight, _targets, _ignore_index, compute_dw, _chunk_rows = inputs
        _loss, delta, dw = output
        ctx.save_for_backward(delta, dw)
        ctx.compute_dw = compute_dw
        ctx.weight_dtype = weight.dtype

    def backward(ctx, grad_loss, _grad_delta, _grad_dw):
        # d loss / d hidden = delta and d loss / d weight = dW, both already formed in the forward pass
        delta, dw = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_loss * delta.float()).to(delta.dtype)
        if ctx.needs_input_grad[1]:
            if not ctx.compute_dw:
                raise RuntimeError(f"teach_signal {backend}: weight needs a gradient but dW was not computed in the "
                                   "forward")
            grad_weight = (grad_loss * dw).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None

    op.register_autograd(backward, setup_context=setup_context)
    return op


def backend_entry(op, name: str):
    """``teach_signal`` backend ``(hidden, weight, targets, ignore_index=-100, *, chunk_rows=0) -> (loss, delta)``:
    the loss carries autograd to hidden and weight, delta is detached."""

    def teach_signal_backend(hidden, weight, targets, ignore_index=-100, *, chunk_rows=0):
        compute_dw = bool(torch.is_grad_enabled() and weight.requires_grad)
        loss, delta, _dw = op(hidden, weight, targets, int(ignore_index), compute_dw, int(chunk_rows))
        return loss, delta.detach()

    teach_signal_backend.__name__ = name
    return teach_signal_backend


__all__ = ["define_fused_op", "backend_entry"]
