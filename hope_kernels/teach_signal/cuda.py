"""The csrc/ teach_signal kernels: CUDA (registered as "cuda") and C++ CPU (tested; not registered, see below)."""
from __future__ import annotations

import torch

from hope_kernels import _ext, dispatch
from hope_kernels.teach_signal.fused_op import backend_entry, define_fused_op

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


def _cuda_forward(hidden, weight, targets, ignore_index, compute_dw, chunk_rows):
    if not CUDA_AVAILABLE:
        raise RuntimeError(f"hope_kernels._C_cuda.teach_signal is not available: {_ext.why_unavailable('_C_cuda')}")
    # the kernel takes fp32/bf16/fp16; float64 runs in fp32 like the reference (which also computes in fp32)
    dtype = hidden.dtype if hidden.dtype in _KERNEL_DTYPES else torch.float32
    loss, delta, dw = _ext.cuda.teach_signal(
        hidden.to(dtype).contiguous(), weight.to(dtype).contiguous(), targets.long().contiguous(),
        int(ignore_index), bool(compute_dw), int(chunk_rows))
    return loss, delta.to(hidden.dtype), dw


#: ``hope::teach_signal_cuda`` (schema, fake and autograd: fused_op.py); ``chunk_rows`` rows of logits at a time
#: (0: the kernel picks)
teach_signal_cuda_op = define_fused_op("cuda", _cuda_forward)
teach_signal_cuda = backend_entry(teach_signal_cuda_op, "teach_signal_cuda")


CUDA_AVAILABLE = _ext.cuda is not None and hasattr(_ext.cuda, "teach_signal")
if CUDA_AVAILABLE:
    dispatch.register(OP, "cuda", teach_signal_cuda, lambda device: device.type == "cuda")
