"""teach_signal fwd+bwd timings (pytest-benchmark): reference vs torch.compile on CPU-sized cases; on a GPU
also the Triton kernels at a mid-sized shape (full shapes: bench/bench_teach_signal.py).

    python -m pytest bench/test_teach_signal.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from hope_kernels import backends
from hope_kernels.teach_signal import teach_signal
from hope_kernels.teach_signal.naive import teach_signal_naive as teach_signal_reference

CPU_CASES = [(256, 64, 1000), (1024, 128, 4000)]  # (N, D, V)
HAS_CUDA = torch.cuda.is_available()


def _inputs(N, D, V, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * D**-0.5).to(device, dtype).requires_grad_()
    return hidden, weight, torch.randint(0, V, (N,), generator=g).to(device)


def _fwd_bwd(fn, hidden, weight, targets):
    def step():
        hidden.grad = weight.grad = None
        loss, _ = fn(hidden, weight, targets, -100)
        loss.backward()
        if hidden.is_cuda:
            torch.cuda.synchronize()
    return step


@pytest.mark.parametrize("impl", ["reference", "compile"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "x".join(map(str, c)))
def test_teach_signal_cpu(benchmark, impl, case):
    fn = teach_signal_reference if impl == "reference" else torch.compile(teach_signal_reference, dynamic=False)
    step = _fwd_bwd(fn, *_inputs(*case))
    step()  # compile outside the timing
    benchmark(step)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["reference", "compile", "triton"])
def test_teach_signal_gpu(benchmark, impl):
    if impl == "triton" and "triton" not in backends.available_backends("teach_signal", "cuda"):
        pytest.skip("triton backend not registered")
    fns = {"reference": teach_signal_reference, "compile": torch.compile(teach_signal_reference, dynamic=False),
           "triton": lambda h, w, t, i: teach_signal(h, w, t, ignore_index=i, backend="triton")}
    step = _fwd_bwd(fns[impl], *_inputs(4096, 768, 32000, device="cuda", dtype=torch.bfloat16))
    step()
    benchmark(step)
