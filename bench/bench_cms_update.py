"""cms_update timings and achieved bandwidth: ``run(device) -> list[dict]`` (called by bench/gpu_suite.py).

Compares the reference (eager), torch.compile of the reference, and every registered backend (triton,
cuda, cpp where available) at E = 4D. The op is memory bound: it must read W1, W2, M1, M2 and write them
back, plus read x and delta, so bytes_moved = 4 (8 B E D + 2 B C D). achieved_gbs = bytes_moved / time,
and pct_roofline compares it with the measured device-to-device copy bandwidth (2 x bytes / time of a
1 GiB copy). Issue target: triton >= 60% of roofline at D=768, C=64, B=8.
"""
from __future__ import annotations

import torch
from _timing import peak_mb, time_ms

from hope_kernels import backends
from hope_kernels.cms_update import CMSParams, cms_update
from hope_kernels.cms_update.naive import cms_update_naive as cms_update_reference

# (B, C, D); E = 4 D. Periods (C) 1 .. 1024 and D 64 .. 1024
GPU_SHAPES = [(8, 64, 768), (8, 1, 768), (8, 16, 768), (8, 256, 768), (8, 1024, 768), (8, 64, 64), (8, 64, 256),
              (8, 64, 1024)]
CPU_SHAPES = [(2, 16, 64), (4, 64, 128)]




def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2**30) -> float:
    """Measured roofline: bytes read + written per second by a plain device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bytes_moved(B: int, C: int, D: int, E: int) -> int:
    return 4 * (8 * B * E * D + 2 * B * C * D)


def run(device="cuda") -> list[dict]:
    device = torch.device(device)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    roofline = copy_bandwidth_gbs(device, 2**30 if device.type == "cuda" else 2**26)
    compiled = torch.compile(cms_update_reference, dynamic=False)
    rows = [{"op": "cms_update", "impl": "copy", "shape": "roofline", "pass": "fwd", "achieved_gbs": round(roofline, 1)}]
    for B, C, D in shapes:
        E = 4 * D
        g = torch.Generator().manual_seed(0)
        mk = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(device)  # noqa: E731
        params, momenta = CMSParams(mk(B, E, D), mk(B, D, E)), CMSParams(mk(B, E, D), mk(B, D, E))
        x, delta = mk(B, C, D), mk(B, C, D)
        impls = {"eager": lambda: cms_update_reference(params, momenta, x, delta, 0.01, 0.9, True),
                 "compile": lambda: compiled(params, momenta, x, delta, 0.01, 0.9, True)}
        for name in backends.available_backends("cms_update", device):
            if name != "reference":
                impls[name] = (lambda be: lambda: cms_update(params, momenta, x, delta, lr=0.01, beta=0.9,
                                                             precond=True, backend=be))(name)
        moved = bytes_moved(B, C, D, E)
        eager_ms = None
        for impl, fn in impls.items():
            try:
                fn()
                ms = time_ms(fn, device)
            except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler for inductor on this host
                rows.append({"op": "cms_update", "impl": impl, "shape": f"B{B} C{C} D{D} E{E}", "error": repr(exc)[:200]})
                continue
            gbs = moved / (ms * 1e-3) / 1e9
            row = {"op": "cms_update", "impl": impl, "shape": f"B{B} C{C} D{D} E{E}", "pass": "fwd",
                   "median_ms": round(ms, 4), "bytes_moved": moved, "achieved_gbs": round(gbs, 1),
                   "pct_roofline": round(100 * gbs / roofline, 1)}
            if impl == "eager":
                eager_ms = ms
            elif eager_ms:
                row["speedup_vs_eager"] = round(eager_ms / ms, 2)
            rows.append(row)
    return rows


if __name__ == "__main__":
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")):
        print(r)
