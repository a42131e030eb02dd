"""Triton kernels of ``titan_memory_update``'s state pass: the linear memory (linear.py) and the mlp memory (mlp.py),
rules ``titans`` and ``dgd``, forward and backward, as the "triton" backend."""
from __future__ import annotations

import torch

from hope_kernels.backends import Backend, triton_runs_on
from hope_kernels.titan_memory_update.triton import linear, mlp


def supports(call) -> tuple[bool, str]:
    if call.dtype == torch.float64:
        return False, "takes fp32/bf16/fp16 q, k, v (float64 runs on the reference)"
    limits = mlp.why_not_mlp if call.memory == "mlp" else linear.why_not
    why = limits(call.Dk, call.width, call.chunk_size, call.rule, call.backward)
    return why is None, why or ""


BACKEND = Backend("titan_memory_update", "triton", priority=30, kernel={"linear": linear, "mlp": mlp},
                  runs_on=triton_runs_on, supports=supports, env="HOPE_USE_TRITON")
