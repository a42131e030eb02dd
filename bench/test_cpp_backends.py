"""C++ CPU kernels vs the PyTorch reference on CPU-sized cases (pytest-benchmark); prints ref/cpp ratios.

    python -m pytest bench/test_cpp_backends.py --benchmark-only -s
"""
from __future__ import annotations

import time

import pytest
import torch

from hope_kernels import backends
from hope_kernels.cms_update import CMSParams, cms_update

CMS_CASES = [(2, 8, 64, 128), (4, 16, 128, 256), (8, 32, 256, 512)]  # (B, C, D, E)

pytestmark = pytest.mark.skipif(
    "cpp" not in backends.available_backends("cms_update", "cpu"), reason="C++ CPU extension not built"
)


def _cms_args(B, C, D, E):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    return CMSParams(mk(B, E, D), mk(B, D, E)), CMSParams(mk(B, E, D), mk(B, D, E)), mk(B, C, D), mk(B, C, D)


def _median_s(fn, reps=15):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2]


@pytest.mark.parametrize("precond", [False, True], ids=["plain", "precond"])
@pytest.mark.parametrize("case", CMS_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_cms_update_cpu(benchmark, backend, case, precond):
    params, momenta, x, delta = _cms_args(*case)
    step = lambda be: cms_update(params, momenta, x, delta, lr=0.01, beta=0.9, precond=precond, backend=be)  # noqa: E731
    benchmark(step, backend)
    if backend == "cpp":  # one run reports the ratio of medians measured back to back
        ratio = _median_s(lambda: step("reference")) / _median_s(lambda: step("cpp"))
        print(f"\ncms_update {case} precond={precond}: reference/cpp = {ratio:.2f}x")
