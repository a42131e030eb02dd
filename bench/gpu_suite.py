"""One command on a GPU machine: build the extension, run the tests on CUDA, time every op, print one table.

    python bench/gpu_suite.py [--skip-build] [--tests PATH ...] [--skip-tests] [--early SPEC ...]
                              [--bench SPEC ...] [--deadline-s S] [--out DIR]

SPEC is NAME[:FUNC][@IMPL,IMPL][#I,I]: benchmark ``bench/<NAME>.py`` exposes ``run(device)`` (or the named FUNC)
yielding dicts with op, impl, shape, pass (fwd|fwd+bwd), median_ms, peak_mb; @IMPLS times only those
implementations (HOPE_BENCH_IMPLS), #I only those shape indices (HOPE_BENCH_SHAPES). The extension builds in
the background (``setup.py build_ext --inplace``) while the ``--early`` benchmarks, which need no extension
(Triton, peers), run; the tests and the other benchmarks wait for it. Every benchmark runs in its own process
with a time limit (a hung or crashing kernel costs one module, not the lease), and its rows are appended to
``rows.jsonl`` as they are measured, so a run cut short still returns what it measured. The result JSON
``<out>/gpu_suite-<device>-<date>.json`` (default out: bench/results/, and $OUT when set, as the device tool
returns files from there) holds the environment (device, driver, torch/triton versions, date), every row and
every step's log tail.

On the device machine (bench/README.md has the exact call): carry the peer wheels (.whl), the prepared pilot data
(data/prepared/embedded_pilot) and a copy of the shared corpus (HOPE_SHARED_DATA) for ``bench_train``.
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
DEFAULT_EARLY = ("bench_titan_memory_update@triton,fla", "bench_titan_memory_update:run_mlp@triton,eager,compile",
                 "bench_titan_memory_update:tune", "bench_titan_memory_update@eager,compile")
DEFAULT_BENCHES = ("bench_titan_memory_update@cuda", "bench_teach_signal", "bench_cms_update", "bench_cuda",
                   "bench_self_modifying_titans", "bench_train")
TABLE_COLS = ("op", "memory", "impl", "rule", "shape", "pass", "median_ms", "peak_mb", "speedup_vs_eager",
              "speedup_vs_compile", "speedup_vs_fla", "config", "fwd_n_regs", "fwd_n_spills", "bwd_n_regs",
              "bwd_n_spills", "mlp_fwd_n_regs", "mlp_fwd_n_spills", "mlp_bwd_n_regs", "mlp_bwd_n_spills", "skipped",
              "error")


def _sh(cmd: list[str], log: list[dict], timeout: float, log_file: Path | None = None, env: dict | None = None) -> int:
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1),
                              env=None if env is None else {**os.environ, **env})
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        text = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
        text += f"\n[gpu_suite] timed out after {timeout:.0f}s"
    if log_file is not None:
        log_file.write_text(text)
    log.append({"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1), "tail": text[-6000:]})
    print(f"[{rc}] {' '.join(cmd)} ({time.time() - t0:.0f}s)", flush=True)
    return rc


def environment() -> dict:
    import torch

    if str(ROOT) not in sys.path:  # the checkout's hope_kernels, for the extension load report
        sys.path.insert(0, str(ROOT))

    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "host": platform.node()}
    for pkg in ("triton", "fla", "liger_kernel"):
        try:
            mod = importlib.import_module(pkg)
            env[pkg] = getattr(mod, "__version__", "present")
        except Exception:  # noqa: BLE001 - absent or broken peer: recorded as None
            env[pkg] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        props = torch.cuda.get_device_properties(0)
        env["sm_count"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            env["driver"] = None
    else:
        env["device"] = "cpu"
    try:
        from hope_kernels import _ext

        env["extension_errors"] = dict(_ext.LOAD_ERRORS)
    except Exception as exc:  # noqa: BLE001
        env["extension_errors"] = repr(exc)
    return env


def parse_spec(spec: str) -> tuple[str, str, str, str]:
    """NAME[:FUNC][@IMPLS][#SHAPES] -> (NAME, FUNC or "run", IMPLS, SHAPES); the last two may be ""."""
    head, _, shapes = spec.partition("#")
    head, _, impls = head.partition("@")
    name, _, func = head.partition(":")
    return name, func or "run", impls, shapes


def run_one(spec: str, rows_file: Path) -> int:
    """Child process: runs one benchmark generator, appending each row to ``rows_file`` as it comes."""
    import torch

    name, func, _, _ = parse_spec(spec)
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]  # the checkout's packages even without an install
    mod = importlib.import_module(name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with rows_file.open("a") as fh:
        for row in getattr(mod, func)(device):
            fh.write(json.dumps(dict(row, module=spec), default=str) + "\n")
            fh.flush()
            print(json.dumps(row, default=str), flush=True)
    return 0


def _fmt(v) -> str:
    if v is None:
        return ""
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--tests", nargs="*", default=["tests/kernels"], help="pytest paths (default tests/kernels)")
    ap.add_argument("--isolate", nargs="*", default=["raw_extension_checks"],
                    help="pytest -k patterns run in a separate process after the others")
    ap.add_argument("--early", nargs="*", default=list(DEFAULT_EARLY), help="SPECs run while the extension builds")
    ap.add_argument("--bench", nargs="*", default=list(DEFAULT_BENCHES), help="SPECs run after the tests")
    ap.add_argument("--deadline-s", type=float, default=3000.0, help="wall-clock budget of the whole suite")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        return run_one(args.one, Path(args.rows))

    t_end = time.time() + args.deadline_s
    left = lambda: t_end - time.time()  # noqa: E731
    out_dirs = [Path(d) for d in filter(None, (args.out, os.environ.get("OUT")))]
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
    scratch = out_dirs[-1]
    rows_file = scratch / "rows.jsonl"
    rows_file.write_text("")
    log: list[dict] = []
    build = None
    if not args.skip_build:  # in the background: the early benchmarks need no extension
        build_log = (scratch / "build.log").open("w")
        build = (time.time(), subprocess.Popen(
            [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, stdout=build_log,
            stderr=subprocess.STDOUT, env={**os.environ, "HOPE_CUDA_ARCH": os.environ.get("HOPE_CUDA_ARCH", "90")}))

    def bench(spec: str) -> None:
        if left() < 20:
            log.append({"bench": spec, "skipped": "suite deadline reached"})
            return
        _, _, impls, shapes = parse_spec(spec)
        env = {k: v for k, v in (("HOPE_BENCH_IMPLS", impls), ("HOPE_BENCH_SHAPES", shapes)) if v}
        _sh([sys.executable, str(Path(__file__).resolve()), "--one", spec, "--rows", str(rows_file)], log,
            left() - 10, env=env)

    for spec in args.early:
        bench(spec)
    if build is not None:
        t0, proc = build
        try:
            rc = proc.wait(timeout=max(left() - 30, 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = 124
        text = (scratch / "build.log").read_text()
        log.append({"cmd": "setup.py build_ext --inplace", "rc": rc, "seconds": round(time.time() - t0, 1),
                    "tail": text[-6000:]})
        print(f"[{rc}] build_ext ({time.time() - t0:.0f}s since start)", flush=True)
    if not args.skip_tests and args.tests:
        pytest = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "--timeout", "300"]
        # tests that crashed the whole process on the GPU image run apart, so a crash there hides nothing else
        isolated = " or ".join(args.isolate)
        _sh([*pytest, *args.tests, *(["-k", f"not ({isolated})"] if isolated else [])], log,
            min(1800, left() - 60), scratch / "pytest.log")
        if isolated:
            _sh([*pytest, *args.tests, "-k", isolated], log, min(300, left() - 60), scratch / "pytest_isolated.log")
    for spec in args.bench:
        bench(spec)

    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    env = environment()
    result = {"environment": env, "argv": sys.argv[1:], "rows": rows, "log": log}
    fname = f"gpu_suite-{str(env['device']).replace(' ', '_')}-{env['date'][:10]}.json"
    for d in out_dirs:
        (d / fname).write_text(json.dumps(result, indent=1, default=str))

    cols = [c for c in TABLE_COLS if any(c in r for r in rows)]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)) for c in cols))
    return 0 if all(e.get("rc", 0) == 0 for e in log if "rc" in e) else 1


if __name__ == "__main__":
    sys.exit(main())
