"""GPU timings of the csrc/ CUDA kernels vs Triton vs the reference: ``run(device) -> list[dict]``."""
from __future__ import annotations

import torch

from hope_kernels import backends
from hope_kernels.cms_update import CMSParams, cms_update

CMS_SHAPES = [(8, 16, 512, 2048), (16, 64, 1024, 4096)]  # (B, C, D, E)


def _median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2]


def run(device: str = "cuda") -> list[dict]:
    device = torch.device(device)
    if device.type != "cuda":
        return []
    rows = []
    for B, C, D, E in CMS_SHAPES:
        g = torch.Generator(device="cpu").manual_seed(0)
        mk = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(device)  # noqa: E731
        params, momenta = CMSParams(mk(B, E, D), mk(B, D, E)), CMSParams(mk(B, E, D), mk(B, D, E))
        x, delta = mk(B, C, D), mk(B, C, D)
        for impl in backends.available_backends("cms_update", device):
            torch.cuda.reset_peak_memory_stats(device)
            ms = _median_ms(lambda: cms_update(params, momenta, x, delta, lr=0.01, beta=0.9, backend=impl))
            rows.append({"op": "cms_update", "impl": impl, "shape": f"B{B} C{C} D{D} E{E}", "pass": "fwd",
                         "median_ms": round(ms, 4),
                         "peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)})
    return rows


if __name__ == "__main__":
    for row in run("cuda"):
        print(row)
