"""bench/bench_layer_ops.py's FLOP count: every model's step counted, attention on the CPU included (torch's counter
has formulas for the CUDA kernels only) and the depthwise conv's backward taken at twice its forward."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_layer_ops  # noqa: E402


def test_cpu_attention_is_counted():
    from torch.utils.flop_counter import FlopCounterMode

    bench_layer_ops._count_cpu_attention()
    q = torch.randn(2, 3, 16, 8, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    # forward: two [16, 16] products of depth 8 per (b, h); backward twice that and more
    assert counter.get_total_flops() >= 3 * 2 * (2 * 3 * 16 * 16 * 8 * 2)


def test_smoke_flops_rows():
    rows = {r["arch"]: r for r in bench_layer_ops.smoke_flops(B=1, T=16)}
    assert set(rows) == {"hope", "titan", "transformer"}
    assert rows["transformer"]["vs_transformer"] == 1.0
    assert any("attention" in k for k in rows["transformer"]["by_op_gflop"])
    for r in rows.values():
        assert r["gflop_per_step"] > 0
        conv = r["by_op_gflop"].get("aten.convolution_backward (2x forward)")
        if conv is not None:
            assert abs(conv - 2 * r["by_op_gflop"]["aten.convolution"]) <= 1e-3
    assert rows["hope"]["gflop_per_step"] > rows["transformer"]["gflop_per_step"]
    bench_layer_ops.with_flop_rates([*rows.values(), {"measure": "speed", "arch": "hope", "median_step_ms": 1000.0}])
    assert rows["hope"]["gflop_per_s"] == round(rows["hope"]["gflop_per_step"], 1)
