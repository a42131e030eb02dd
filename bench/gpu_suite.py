"""One command on a GPU machine: build the extension, run the test suite on CUDA, time every op.

    python bench/gpu_suite.py [--skip-build] [--skip-tests] [--out DIR]

Writes ``<out>/gpu_suite-<device>-<date>.json`` (default out: bench/results/, and $OUT when set, as the
device tool returns files from there) and prints one table. Every benchmark module ``bench/bench_<op>.py``
exposes ``run(device) -> list[dict]``; rows carry op, impl, shape, pass (fwd|fwd+bwd), median_ms, peak_mb.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODULES = ("bench_titan_memory_update", "bench_teach_signal", "bench_cms_update", "bench_cuda")


def _sh(cmd: list[str], log: list[dict], timeout: int) -> int:
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    log.append({"cmd": " ".join(cmd), "rc": proc.returncode, "seconds": round(time.time() - t0, 1),
                "tail": (proc.stdout + proc.stderr)[-6000:]})
    print(f"[{proc.returncode}] {' '.join(cmd)} ({time.time() - t0:.0f}s)", flush=True)
    return proc.returncode


def environment() -> dict:
    import torch

    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "host": platform.node()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            env["driver"] = None
    else:
        env["device"] = "cpu"
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)

    log: list[dict] = []
    if not args.skip_build:
        _sh([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], log, 1200)
    if not args.skip_tests:
        _sh([sys.executable, "-m", "pytest", "-q", "-x", "tests/kernels"], log, 1800)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sys.path.insert(0, str(ROOT / "bench"))
    rows: list[dict] = []
    for name in BENCH_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            log.append({"bench": name, "skipped": f"import failed: {exc}"})
            continue
        try:
            rows.extend(dict(r, module=name) for r in mod.run(device))
        except Exception as exc:  # one failing benchmark must not hide the others
            log.append({"bench": name, "error": repr(exc)})
            print(f"{name}: {exc!r}", flush=True)

    env = environment()
    result = {"environment": env, "rows": rows, "log": log}
    stamp = env["date"][:10]
    fname = f"gpu_suite-{str(env['device']).replace(' ', '_')}-{stamp}.json"
    for out_dir in filter(None, (args.out, os.environ.get("OUT"))):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / fname).write_text(json.dumps(result, indent=1, default=str))

    cols = ("op", "impl", "shape", "pass", "median_ms", "peak_mb")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    return 0 if all(e.get("rc", 0) == 0 for e in log if "rc" in e) else 1


if __name__ == "__main__":
    sys.exit(main())
