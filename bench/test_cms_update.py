"""cms_update timings (pytest-benchmark): reference vs torch.compile (and the C++ backend) on CPU-sized
cases; on a GPU also the Triton kernel at D=768, C=64, B=8 (bandwidth: bench/bench_cms_update.py).

    python -m pytest bench/test_cms_update.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from hope_kernels import backends
from hope_kernels.cms_update import CMSParams, cms_update
from hope_kernels.cms_update.naive import cms_update_naive as cms_update_reference

CPU_CASES = [(2, 16, 64), (4, 64, 128)]  # (B, C, D), E = 4 D
HAS_CUDA = torch.cuda.is_available()


def _args(B, C, D, device="cpu"):
    E = 4 * D
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(device)  # noqa: E731
    return CMSParams(mk(B, E, D), mk(B, D, E)), CMSParams(mk(B, E, D), mk(B, D, E)), mk(B, C, D), mk(B, C, D)


def _step(impl, args):
    if impl == "reference":
        return lambda: cms_update_reference(*args, 0.01, 0.9, True)
    if impl == "compile":
        fn = torch.compile(cms_update_reference, dynamic=False)
        return lambda: fn(*args, 0.01, 0.9, True)
    return lambda: cms_update(*args, lr=0.01, beta=0.9, precond=True, backend=impl)


@pytest.mark.parametrize("impl", ["reference", "compile", "cpp"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "x".join(map(str, c)))
def test_cms_update_cpu(benchmark, impl, case):
    if impl not in ("reference", "compile") and impl not in backends.available_backends("cms_update", "cpu"):
        pytest.skip(f"{impl} backend not available")
    step = _step(impl, _args(*case))
    step()
    benchmark(step)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["reference", "compile", "triton", "cuda"])
def test_cms_update_gpu(benchmark, impl):
    if impl not in ("reference", "compile") and impl not in backends.available_backends("cms_update", "cuda"):
        pytest.skip(f"{impl} backend not available")
    step = _step(impl, _args(8, 64, 768, device="cuda"))

    def synced():
        step()
        torch.cuda.synchronize()

    synced()
    benchmark(synced)
