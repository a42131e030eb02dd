"""The CUDA state-pass kernels (csrc/titan_linear.cu: state tiles in shared memory; csrc/titan_mlp.cu: the block-phased
body csrc/titan_mlp_body.h shares with the CPU kernels) as the "cuda" backend. Auto ranks it after Triton, which
measured faster (docs/performance.md), and skips its mlp kernels until they pass their tests on a GPU."""
from __future__ import annotations

import torch

from hope_kernels import _ext
from hope_kernels.backends import Backend, on_cuda
from hope_kernels.titan_memory_update.chunk import ExtensionStatePass

if _ext.cuda is None:
    raise ImportError(_ext.why_unavailable("_C_cuda"))

#: the largest head dims and chunk the kernels take (csrc/titan_linear_checks.h kTitanMaxDim / kTitanMaxChunk, and
#: csrc/titan_mlp_checks.h for the mlp memory's D, hidden width E and chunk)
MAX_HEAD_DIM, MAX_CHUNK = 128, 64
MLP_MAX_HEAD_DIM, MLP_MAX_HIDDEN, MLP_MAX_CHUNK = 128, 512, 64
#: memories whose CUDA kernels passed their tests on a GPU: auto picks only these
VALIDATED_ON_GPU = ("linear",)


def supports(call) -> tuple[bool, str]:
    if call.dtype == torch.float64:
        return False, "takes fp32/bf16/fp16 q, k, v (float64 runs on the reference)"
    C = call.chunk_size
    if call.memory == "mlp":
        if call.Dk <= MLP_MAX_HEAD_DIM and call.width <= MLP_MAX_HIDDEN and C <= MLP_MAX_CHUNK:
            return True, ""
        return False, (f"takes D <= {MLP_MAX_HEAD_DIM}, E <= {MLP_MAX_HIDDEN} and chunk_size <= {MLP_MAX_CHUNK} for "
                       f"memory='mlp', got D={call.Dk}, E={call.width}, chunk_size={C}")
    if call.Dk <= MAX_HEAD_DIM and call.width <= MAX_HEAD_DIM and C <= MAX_CHUNK:
        return True, ""
    return False, (f"takes Dk, Dv <= {MAX_HEAD_DIM} and chunk_size <= {MAX_CHUNK}, got Dk={call.Dk}, "
                   f"Dv={call.width}, chunk_size={C}")


def auto_skips(call) -> str | None:
    return None if call.memory in VALIDATED_ON_GPU else "its kernels have not yet passed their tests on a GPU"


BACKEND = Backend("titan_memory_update", "cuda", priority=20, kernel=ExtensionStatePass.per_memory(_ext.cuda, fp32_only=False),
                  runs_on=on_cuda, supports=supports, auto_skips=auto_skips, env="HOPE_USE_CUDA")
