"""titan_memory_update fwd+bwd timings (pytest-benchmark): the reference on a CPU-sized case; on a GPU the
reference vs the Triton kernels at docs/performance.md's first shape (full table: bench/bench_titan_memory_update.py).

    python -m pytest bench/test_titan_memory_update.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from _timing import titan_backend

from hope_kernels.titan_memory_update import LinearMemoryState
from hope_kernels.titan_memory_update.naive import titan_memory_update_naive as titan_memory_update_reference

HAS_CUDA = torch.cuda.is_available()


def _step(fn, B, H, T, D, rule, device, dtype):
    g = torch.Generator().manual_seed(0)
    # leaves (scaled before requires_grad_): a scaled copy would keep a graph that the first backward frees
    mk = lambda scale: (torch.randn(B, H, T, D, generator=g) * scale).to(device, dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(D**-0.5), mk(D**-0.5), mk(1.0)
    gates = [(torch.rand(B, H, T, generator=g) * s).to(device) for s in (0.5, 1.0, 0.1)]
    W0 = torch.zeros(B, H, D, D, device=device, requires_grad=True)
    S0 = torch.zeros(B, H, D, D, device=device, requires_grad=True)

    def step():
        out, st = fn(q, k, v, *gates, 64, "linear", rule, LinearMemoryState(W0, S0))
        (out.float().square().sum() + st.W.sum()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
    return step


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_titan_memory_update_reference_cpu(benchmark, rule):
    benchmark(_step(titan_memory_update_reference, 1, 2, 128, 16, rule, "cpu", torch.float32))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_titan_memory_update_gpu(benchmark, impl, rule):
    if impl == "triton":
        fn = titan_backend("triton")
    else:
        fn = titan_memory_update_reference
    benchmark(_step(fn, 8, 12, 2048, 64, rule, "cuda", torch.bfloat16))
