"""C++ CPU backend of ``self_modifying_titans`` (csrc/self_modifying_titans_cpu.cpp): the operators
``hope_cpu::self_modifying_titans_fwd`` / ``_bwd`` that the ``hope_kernels._C_cpu`` extension registers, one task per
(b, h) carrying that head's memories through every chunk (docs/kernels/self_modifying_titans.md, "C++")."""
from __future__ import annotations

import torch

from hope_kernels import _ext
from hope_kernels.self_modifying_titans.backends import Backend
from hope_kernels.self_modifying_titans.chunk import supports_layer_call

#: the loaded extension registers the operators (an older build of _C_cpu lacks them)
AVAILABLE = _ext.cpu is not None and hasattr(torch.ops.hope_cpu, "self_modifying_titans_fwd")


class CppKernel:
    @staticmethod
    def fwd(inputs, settings):
        return torch.ops.hope_cpu.self_modifying_titans_fwd(inputs, *settings.as_args())

    @staticmethod
    def bwd(grads, inputs, saved, settings):
        return torch.ops.hope_cpu.self_modifying_titans_bwd(grads, inputs, *saved, *settings.as_args())


def supports(call) -> tuple[bool, str]:
    if not AVAILABLE:
        why = _ext.why_unavailable("_C_cpu") or "the loaded hope_kernels._C_cpu was built without it"
        return False, f"the C++ kernels are not built ({why})"
    return supports_layer_call(call)


BACKEND = Backend("cpp", priority=10, kernel=CppKernel, runs_on=lambda device: device.type == "cpu",
                  supports=supports, env="HOPE_SELFMOD_CPP")
