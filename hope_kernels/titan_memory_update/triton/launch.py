"""Launch settings shared by the linear and mlp state-pass launchers."""
from __future__ import annotations

import torch

#: launch settings, overridable for tuning sweeps (bench/bench_titan_memory_update.py ``tune``): value-block
#: caps for the forward / backward kernels, warps per program, software-pipelining stages (None: Triton's)
TUNING = {"fwd_bv": 64, "bwd_bv": 32, "num_warps": 4, "num_stages": None, "dgd_num_stages": 1,
          # mlp kernels: hidden units per tile, warps (one program per (b, h) holds several [C, D] tiles), stages
          "mlp_be": 32, "mlp_bwd_be": 16, "mlp_num_warps": 8, "mlp_num_stages": 1, "mlp_fused_fwd": True}
#: the last compiled kernel of each pass ("fwd" / "bwd"): its n_regs / n_spills feed the benchmark report
LAST_KERNELS: dict = {}


def precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting (exact fp32 unless TF32 is allowed); half inputs use TF32
    # for the fp32 state products (their own rounding is already coarser)
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "tf32"


def empty(*shape, device, dtype) -> torch.Tensor:
    """Every buffer a kernel must fill entirely (tests replace this with a NaN-poisoning allocator)."""
    return torch.empty(*shape, device=device, dtype=dtype)


