"""self_modifying_titans timings: ``run(device) -> list[dict]`` (called by bench/gpu_suite.py).

The self-modifying Titans layer (generators + M_mem, its defaults: dgd, 4 generators, generator chunk 8) forward +
backward on every kernel backend of the fused op that runs on the device, against the layer's own loop over
generator chunks (``fused=False``: ``titan_memory_update`` per chunk on auto's backends), and the teach pass's call
(``local_grad=True``: the xq-only backward). On the GPU also the Triton kernels with three-pass TF32 products
(``triton-tf32x3``, ``TUNING["precision"]``). Rows: median ms, peak MB (CUDA), speedup against the loop.
"""
from __future__ import annotations

import contextlib

import torch
from _timing import peak_mb, time_ms

from hope.layers.self_modifying import SelfModifyingTitans
from hope_kernels import backends
from hope_kernels._checks import value_checks_off
from hope_kernels.self_modifying_titans.chunk import OP

# (name, B, T, d_model, heads, M_mem chunk): the smoke and pilot presets' layer
GPU_SHAPES = [("smoke", 8, 128, 128, 4, 32), ("pilot", 4, 2048, 768, 12, 64)]
CPU_SHAPES = [("smoke", 8, 128, 128, 4, 32), ("pilot", 1, 512, 768, 12, 64)]


@contextlib.contextmanager
def _triton_precision(precision: str | None):
    """The fused op's Triton products at ``precision`` for the block (None: unchanged)."""
    if precision is None:
        yield
        return
    from hope_kernels.self_modifying_titans import triton as smt_triton

    saved = smt_triton.TUNING["precision"]
    smt_triton.TUNING["precision"] = precision
    try:
        yield
    finally:
        smt_triton.TUNING["precision"] = saved


def _step(layer, x, local_grad: bool):
    def fn():
        layer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(local_grad)
        y, _, _ = layer(xi, local_grad=local_grad)
        if local_grad:
            torch.autograd.grad(y.float().square().mean(), xi)
        else:
            y.float().square().mean().backward()
    return fn


def run(device="cuda") -> list[dict]:
    device = torch.device(device)
    rows = []
    for name, B, T, dim, heads, mem_chunk in GPU_SHAPES if device.type == "cuda" else CPU_SHAPES:
        torch.manual_seed(0)
        base = SelfModifyingTitans(dim, heads, mem_chunk_size=mem_chunk).to(device)
        x = (torch.randn(B, T, dim, generator=torch.Generator().manual_seed(0)) * 0.5).to(device)
        layers = {"loop": SelfModifyingTitans(dim, heads, mem_chunk_size=mem_chunk, fused=False).to(device)}
        for be in backends.available_backends(OP, device):
            if be != "reference":
                layers[be] = SelfModifyingTitans(dim, heads, mem_chunk_size=mem_chunk, backend=be).to(device)
        if "triton" in layers and device.type == "cuda":
            layers["triton-tf32x3"] = SelfModifyingTitans(dim, heads, mem_chunk_size=mem_chunk,
                                                          backend="triton").to(device)
        for layer in layers.values():
            layer.load_state_dict(base.state_dict())
        for local_grad in (False, True):
            loop_ms = None
            for impl, layer in layers.items():
                fn = _step(layer, x, local_grad)
                shape = f"{name} B{B} T{T} d{dim} h{heads} mem_chunk{mem_chunk}"
                try:
                    with value_checks_off(), _triton_precision("tf32x3" if impl == "triton-tf32x3" else None):
                        fn()
                        ms = time_ms(fn, device, reps=5)
                        mb = peak_mb(fn, device)
                except Exception as exc:  # noqa: BLE001 - a declined or failing backend is a row, not a crash
                    rows.append({"op": OP, "impl": impl, "shape": shape, "error": repr(exc)[:200]})
                    continue
                row = {"op": OP, "impl": impl, "shape": shape, "pass": "teach fwd+bwd(xq)" if local_grad else "fwd+bwd",
                       "median_ms": round(ms, 3), "peak_mb": None if mb is None else round(mb, 1),
                       "path": getattr(layer, "fused_path", None) or "loop"}
                if impl == "loop":
                    loop_ms = ms
                elif loop_ms:
                    row["speedup_vs_loop"] = round(loop_ms / ms, 2)
                rows.append(row)
    return rows


if __name__ == "__main__":
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")):
        print(r)
