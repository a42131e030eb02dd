"""The CUDA teach-signal kernel (csrc/teach_signal.cu) as the "cuda" backend."""
from __future__ import annotations

import torch

from hope_kernels import _ext
from hope_kernels.backends import Backend, on_cuda

if _ext.cuda is None:
    raise ImportError(_ext.why_unavailable("_C_cuda"))

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def teach_signal_kernel(hidden, weight, targets, ignore_index: int, compute_dw: bool, chunk_rows: int):
    """``(loss, delta in hidden's dtype, dW fp32 or [0, D])``; float64 runs in fp32 like the reference."""
    dtype = hidden.dtype if hidden.dtype in _KERNEL_DTYPES else torch.float32
    loss, delta, dw = _ext.cuda.teach_signal(hidden.to(dtype).contiguous(), weight.to(dtype).contiguous(),
                                             targets.long().contiguous(), int(ignore_index), bool(compute_dw),
                                             int(chunk_rows))
    return loss, delta.to(hidden.dtype), dw


BACKEND = Backend("teach_signal", "cuda", priority=30, kernel=teach_signal_kernel, runs_on=on_cuda,
                  env="HOPE_USE_CUDA")
