"""Every Triton launch of our kernels at the largest shapes the dispatcher lets them take fits an H100: compiled
for sm_90 here, without a GPU (bench/triton_resources.py), each needs at most 227 KiB of shared memory. A kernel
that would fail at launch there with OutOfResources fails here first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _has_cuda_backend() -> bool:
    try:
        import triton
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:  # noqa: BLE001 - no Triton or no CUDA backend in it: nothing to compile with
        return False
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(ptxas)


@pytest.mark.skipif(not _has_cuda_backend(), reason="Triton's CUDA backend (ptxas) is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the launches themselves run (and device minutes count)")
def test_every_triton_launch_fits_an_h100(tmp_path):
    out = tmp_path / "resources.json"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0",  # interpreted kernels cannot be compiled
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(root / "bench" / "triton_resources.py"), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=root)
    assert out.exists(), f"the report did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"_linear_fwd_kernel", "_linear_bwd_kernel", "_mlp_fwd_kernel", "_mlp_bwd_kernel", "_ts_lse_kernel",
            "_ts_grad_kernel", "_cms_update_kernel"} <= kernels
    too_big = [f"{r['case']} {r['kernel']} {r['flags']}: {r['shared']} B" for r in rows if not r["fits_h100"]]
    assert not too_big, "launches that need more shared memory than an H100 has:\n" + "\n".join(too_big)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the quick mode (stopped before PTX; an empty cache, so that it compiles) reports the same shared memory
    quick = tmp_path / "quick.json"
    subprocess.run([sys.executable, str(root / "bench" / "triton_resources.py"), "--no-ptxas", "--op", "cms_update",
                    "--op", "teach_signal", "--json", str(quick)], capture_output=True, text=True,
                   env={**env, "TRITON_CACHE_DIR": str(tmp_path / "triton-cache")}, timeout=600, cwd=root)
    quick_rows = json.loads(quick.read_text())["rows"]
    full = {(r["case"], r["kernel"], r["flags"]): r["shared"] for r in rows}
    assert quick_rows and all(full[(r["case"], r["kernel"], r["flags"])] == r["shared"] for r in quick_rows)
    assert all("regs" not in r for r in quick_rows)
