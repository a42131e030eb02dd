"""The csrc/ teach_signal C++ CPU kernel wrapped in an autograd.Function (tested; not registered, see below)."""
from __future__ import annotations

import torch

from hope_kernels import _ext

OP = "teach_signal"


class _TeachSignalCpp(torch.autograd.Function):
    """loss = mean CE; backward uses the saved G = d loss / d logits: dhidden = g G W, dweight = g G^T hidden."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        h32, w32 = hidden.detach().float().contiguous(), weight.detach().float().contiguous()
        loss, grad_logits = _ext.cpu.teach_signal(h32, w32, targets.contiguous(), int(ignore_index))
        ctx.save_for_backward(grad_logits, h32, w32)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        delta = (grad_logits @ w32).to(hidden.dtype)
        ctx.mark_non_differentiable(delta)
        return loss, delta

    @staticmethod
    def backward(ctx, grad_loss, _grad_delta):
        grad_logits, h32, w32 = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_loss * (grad_logits @ w32)).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_loss * (grad_logits.t() @ h32)).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, None, None


def teach_signal_cpp(hidden, weight, targets, ignore_index=-100):
    return _TeachSignalCpp.apply(hidden, weight, targets, ignore_index)


# Not registered as "cpp": measured fwd+bwd ratio reference/cpp on this machine was 1.52x (N37 V101),
# 0.87x (N256 V2048), 1.04x (N512 V8192): it does not measurably beat the reference (docs/kernels/csrc.md).
CPP_AVAILABLE = _ext.cpu is not None
