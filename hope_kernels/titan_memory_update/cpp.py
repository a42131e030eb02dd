"""The C++ CPU state-pass kernels (csrc/titan_linear_cpu.cpp, csrc/titan_mlp_cpu.cpp; fp32, one task per (b, h)) as
the "cpp" backend. Auto takes them where they measured faster than the reference, fwd+bwd and forward-only
(docs/performance.md): the linear memory except titans forward-only, the mlp memory under dgd."""
from __future__ import annotations

import torch

from hope_kernels import _ext
from hope_kernels.backends import Backend, on_cpu
from hope_kernels.titan_memory_update.chunk import ExtensionStatePass

if _ext.cpu is None:
    raise ImportError(_ext.why_unavailable("_C_cpu"))


def supports(call) -> tuple[bool, str]:
    if call.dtype == torch.float64:
        return False, "takes fp32/bf16/fp16 q, k, v (float64 runs on the reference)"
    return True, ""


def auto_skips(call) -> str | None:
    slower = (call.rule == "titans" and not call.backward) if call.memory == "linear" else call.rule == "titans"
    return "measured slower than the reference on this call (docs/performance.md)" if slower else None


BACKEND = Backend("titan_memory_update", "cpp", priority=10, kernel=ExtensionStatePass.per_memory(_ext.cpu, fp32_only=True),
                  runs_on=on_cpu, supports=supports, auto_skips=auto_skips, env="HOPE_USE_CPP")
