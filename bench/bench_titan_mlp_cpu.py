"""C++ CPU mlp-memory state pass (csrc/titan_mlp_cpu.cpp) vs the PyTorch reference on the CPU, fwd and fwd+bwd.

``python bench/bench_titan_mlp_cpu.py [threads]`` prints one row per (shape, rule, pass) with the min and median ms
of the reference (``eager``) and of ``backend="cpp"`` over interleaved runs, and the speed-up of the mins (on a
shared machine, interleaving and the min keep other jobs' load out of the ratio);
cpp.py's ``auto_skips`` follows where cpp won (docs/performance.md). Inputs as bench_titan_memory_update.run_mlp (its
``_inputs``, E = 2 D), at the chunk sizes given here.
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import titan_backend  # noqa: E402
from bench_titan_memory_update import _inputs, _step  # noqa: E402

from hope_kernels.titan_memory_update import MLPMemoryState  # noqa: E402
from hope_kernels.titan_memory_update.naive import titan_memory_update_naive  # noqa: E402

#: (B, H, T, D, E, C)
SHAPES = [(2, 4, 512, 32, 64, 32), (1, 2, 256, 64, 128, 64)]


def _call(fn, rule, chunk):
    def call(q, k, v, lr, mo, de, *state):
        out, st = fn(q, k, v, lr, mo, de, chunk, "mlp", rule, MLPMemoryState(*state))
        return out, st[0]
    return call


def run(shapes=SHAPES, reps: int = 7):
    dev = torch.device("cpu")
    impls = (("eager", titan_memory_update_naive), ("cpp", titan_backend("cpp")))
    for B, H, T, D, E, C in shapes:
        assert E == 2 * D, "bench_titan_memory_update._inputs makes E = 2 D"
        for rule in ("titans", "dgd"):
            args, state = _inputs(B, H, T, D, dev, torch.float32, memory="mlp")
            for backward in (False, True):
                steps = {name: _step(_call(fn, rule, C), args, state, backward) for name, fn in impls}
                times = {name: [] for name in steps}
                for step in steps.values():
                    step()  # warm-up
                for _ in range(reps):  # interleaved
                    for name, step in steps.items():
                        t0 = time.perf_counter()
                        step()
                        times[name].append((time.perf_counter() - t0) * 1e3)
                row = {"shape": f"B{B} H{H} T{T} D{D} E{E} C{C}", "rule": rule, "pass": "fwd+bwd" if backward else "fwd"}
                for name, ts in times.items():
                    row[f"{name}_min_ms"] = round(min(ts), 2)
                    row[f"{name}_median_ms"] = round(sorted(ts)[len(ts) // 2], 2)
                row["speedup"] = round(min(times["eager"]) / min(times["cpp"]), 2)
                yield row


if __name__ == "__main__":
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    print("torch", torch.__version__, "threads", torch.get_num_threads())
    for row in run():
        print(row, flush=True)
