"""The csrc/ teach_signal kernels: CUDA (registered as "cuda") and C++ CPU (tested; not registered, see below)."""
from __future__ import annotations

import torch

from hope_kernels import _ext, dispatch

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


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _TeachSignalCuda(torch.autograd.Function):
    """Mirrors the triton path: the forward forms loss, delta and (when the head is trained) dW; backward only scales."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, compute_dw, chunk_rows):
        # the kernel takes fp32/bf16/fp16; float64 runs in fp32 like the reference (which also computes in fp32)
        dtype = hidden.dtype if hidden.dtype in _KERNEL_DTYPES else torch.float32
        loss, delta, dw = _ext.cuda.teach_signal(
            hidden.detach().to(dtype).contiguous(), weight.detach().to(dtype).contiguous(),
            targets.long().contiguous(), int(ignore_index), bool(compute_dw), int(chunk_rows),
        )
        delta = delta.to(hidden.dtype)
        ctx.save_for_backward(delta, dw)
        ctx.compute_dw = compute_dw
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(delta)
        return loss, delta

    @staticmethod
    def backward(ctx, grad_loss, _grad_delta):
        # d loss / d hidden = delta and d loss / d weight = dW, both already formed in the forward pass
        delta, dw = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_loss * delta.float()).to(delta.dtype)
        if ctx.needs_input_grad[1]:
            if not ctx.compute_dw:
                raise RuntimeError("teach_signal cuda: weight needs a gradient but dW was not computed in the forward")
            grad_weight = (grad_loss * dw).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def teach_signal_cuda(hidden, weight, targets, ignore_index=-100, *, chunk_rows=0):
    """Same contract as ``teach_signal_reference``; ``chunk_rows`` rows of logits at a time (0: the kernel picks)."""
    compute_dw = bool(torch.is_grad_enabled() and weight.requires_grad)
    return _TeachSignalCuda.apply(hidden, weight, targets, ignore_index, compute_dw, chunk_rows)


CUDA_AVAILABLE = _ext.cuda is not None and hasattr(_ext.cuda, "teach_signal")
if CUDA_AVAILABLE:
    dispatch.register(OP, "cuda", teach_signal_cuda, lambda device: device.type == "cuda")
