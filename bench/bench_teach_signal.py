"""teach_signal timings and peak memory: ``run(device) -> list[dict]`` (called by bench/gpu_suite.py).

Compares, for one fwd+bwd step that yields the loss, delta (d loss / d hidden) and d loss / d weight:
  eager    the reference (materialised [N, V] fp32 logits, F.cross_entropy, autograd)
  compile  torch.compile of the same reference
  triton   the fused Triton kernels (never the [N, V] logits)
  liger    Liger-Kernel's LigerFusedLinearCrossEntropyLoss, when importable
Issue target at N=16k, D=768, V=32000: triton peak memory <= 10% of eager, time <= 1.0x eager.
Rows: op, impl, shape, pass, median_ms, peak_mb (max allocated during the step minus the inputs),
time_vs_eager, mem_vs_eager.
"""
from __future__ import annotations

import torch
from _timing import peak_mb, time_ms

from hope_kernels import backends
from hope_kernels.teach_signal import teach_signal
from hope_kernels.teach_signal.naive import teach_signal_naive as teach_signal_reference

GPU_SHAPES = [(4096, 768, 32000), (16384, 768, 32000), (32768, 768, 32000), (4096, 4096, 128256), (16384, 4096, 128256)]
CPU_SHAPES = [(256, 64, 1000), (1024, 128, 4000)]






def _inputs(N, D, V, device, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * D**-0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    targets[::17] = -100
    return hidden, weight, targets


def _steps(hidden, weight, targets, device):
    """impl name -> a closure doing one fwd+bwd (grads of hidden and weight are cleared each call)."""

    def clear():
        hidden.grad = None
        weight.grad = None

    def via(fn):
        def step():
            clear()
            loss, _delta = fn(hidden, weight, targets, -100)
            loss.backward()
        return step

    steps = {"eager": via(teach_signal_reference)}
    try:
        steps["compile"] = via(torch.compile(teach_signal_reference, dynamic=False))
    except Exception:  # noqa: BLE001 - a backend without a compiler still reports the others
        pass
    if "triton" in backends.available_backends("teach_signal", device) and device.type == "cuda":
        steps["triton"] = via(lambda h, w, t, i: teach_signal(h, w, t, ignore_index=i, backend="triton"))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)

        def liger_step():
            clear()
            liger(weight, hidden, targets).backward()  # (lin_weight, _input, target); no delta returned

        if device.type == "cuda":
            steps["liger"] = liger_step
    except ImportError:
        pass
    return steps


def run(device="cuda") -> list[dict]:
    device = torch.device(device)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for N, D, V in shapes:
        hidden, weight, targets = _inputs(N, D, V, device, dtype)
        shape = f"N{N} D{D} V{V} {str(dtype).replace('torch.', '')}"
        eager = None
        for impl, step in _steps(hidden, weight, targets, device).items():
            try:
                step()  # compile / autotune outside the timing
                ms = time_ms(step, device)
                peak = peak_mb(step, device)
            except torch.cuda.OutOfMemoryError as exc:  # the logits path does not fit at the largest shapes
                rows.append({"op": "teach_signal", "impl": impl, "shape": shape, "pass": "fwd+bwd", "error": f"OOM: {exc}"[:200]})
                torch.cuda.empty_cache()
                continue
            row = {"op": "teach_signal", "impl": impl, "shape": shape, "pass": "fwd+bwd",
                   "median_ms": round(ms, 3), "peak_mb": None if peak is None else round(peak, 1)}
            if impl == "eager":
                eager = row
            elif eager is not None:
                row["time_vs_eager"] = round(ms / eager["median_ms"], 3)
                if peak is not None and eager["peak_mb"]:
                    row["mem_vs_eager"] = round(peak / eager["peak_mb"], 3)
            rows.append(row)
        del hidden, weight, targets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")):
        print(r)
