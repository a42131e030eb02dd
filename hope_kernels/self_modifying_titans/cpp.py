"""C++ CPU backend of ``self_modifying_titans`` (csrc/self_modifying_titans_cpu.cpp): the operators
``hope_cpu::self_modifying_titans_fwd`` / ``_bwd`` that the ``hope_kernels._C_cpu`` extension registers, one task per
(b, h) carrying that head's memories through every chunk (docs/kernels/self_modifying_titans.md, "C++")."""
from __future__ import annotations

import torch

from hope_kernels import _ext
from hope_kernels.backends import Backend, on_cpu
from hope_kernels.self_modifying_titans.chunk import OP, supports_layer_call

if _ext.cpu is None:
    raise ImportError(_ext.why_unavailable("_C_cpu"))
if not hasattr(torch.ops.hope_cpu, "self_modifying_titans_fwd"):
    raise ImportError("the loaded hope_kernels._C_cpu was built without csrc/self_modifying_titans_cpu.cpp")


class CppKernel:
    @staticmethod
    def fwd(inputs, settings):
        return torch.ops.hope_cpu.self_modifying_titans_fwd(inputs, *settings.as_args())

    @staticmethod
    def store_floats(settings, T, D, E, G) -> int:
        return torch.ops.hope_cpu.self_modifying_titans_store_size(
            T, D, E, G, settings.gen_chunk_size, settings.mem_chunk_size, settings.gen_update_clip,
            settings.mem_update_clip, settings.dgd, settings.checkpoint_every)

    @staticmethod
    def bwd(grads, inputs, saved, settings, q_only=False):
        return torch.ops.hope_cpu.self_modifying_titans_bwd(grads, inputs, *saved, *settings.as_args(), q_only)


def empty_cache() -> int:
    """Frees the checkpoint and chunk-store buffers the C++ operators keep for reuse once a backward has freed them
    (a training step asks for the same sizes every step; at most 2 GiB is kept). Returns the bytes released."""
    return int(torch.ops.hope_cpu.self_modifying_titans_empty_cache())


BACKEND = Backend(OP, "cpp", priority=10, kernel=CppKernel, runs_on=on_cpu, supports=supports_layer_call,
                  env="HOPE_USE_CPP")
