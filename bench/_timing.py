"""Timing and memory helpers shared by the bench/bench_<op>.py modules."""
from __future__ import annotations

import time

import torch


def time_ms(fn, device: torch.device, reps: int = 7) -> float:
    """Median wall time of ``fn()`` in ms: triton's do_bench on CUDA, perf_counter medians on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_mb(fn, device: torch.device) -> float | None:
    """Peak CUDA memory allocated by one ``fn()`` call above what was allocated before it (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def titan_backend(name: str):
    """titan_memory_update on backend ``name`` with the naive function's signature ``(q, k, v, lr, momentum, decay,
    chunk_size, memory, rule, state)``, value checks off (they synchronise the GPU; the benchmark's inputs are
    valid)."""
    from hope_kernels._checks import value_checks_off
    from hope_kernels.titan_memory_update import titan_memory_update

    def run(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state):
        with value_checks_off():
            return titan_memory_update(q, k, v, lr, momentum, decay, chunk_size=chunk_size, memory=memory, rule=rule,
                                       state=state, backend=name)

    run.__name__ = f"titan_memory_update_{name}"
    return run
