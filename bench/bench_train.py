"""End-to-end training throughput of the pilot configs: ``run(device)`` yields one row per (config, compile).

Each row comes from the real trainer (``python -m hope.train <config> steps=N ...``, one process per run, bf16,
seq 2048, batch 16 as in the configs): steady-state tokens/s from the median step time after the warm-up steps
(compile and autotuning land there), peak GPU memory, and the projected wall time of the 3B-token pilot on one
GPU (91553 steps x 16 x 2048 tokens) at that rate, evaluation and checkpoints not counted.

Needs the prepared pilot data (``data/prepared/embedded_pilot``: the suite carries it) and, when the run has no
``../shared``, ``HOPE_SHARED_DATA`` pointing at a copy of the shared corpus (its sha256s are checked).
Environment: HOPE_TRAIN_CONFIGS (comma list of config names or paths), HOPE_TRAIN_STEPS (default 12),
HOPE_TRAIN_COMPILE ("0,1" default), HOPE_TRAIN_TIMEOUT_S (per run, default 240).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("pilot", "titan_pilot", "transformer_pilot")
PILOT_TOKENS = 91553 * 16 * 2048
WARMUP_STEPS = 4


def _records(log_file: Path) -> list[dict]:
    if not log_file.exists():
        return []
    return [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]


def run_config(config: str, compile_on: bool, steps: int, timeout_s: float) -> dict:
    row = {"op": "train", "impl": f"compile={'on' if compile_on else 'off'}", "shape": Path(config).stem,
           "pass": "train step"}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "hope.train", config, f"steps={steps}", "eval_every=0", "eval_batches=1",
               "ckpt_every=0", "log.every=1", "log.wandb=disabled", "guard.max_bad_steps=0",
               f"compile={'true' if compile_on else 'false'}", f"run_dir={run_dir}"]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
            tail = (proc.stdout + proc.stderr)[-1500:]
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc, tail = 124, f"timed out after {timeout_s:.0f}s"
        records = _records(run_dir / "log.jsonl")
    train = [r for r in records if r.get("event") == "train"]
    row["wall_s"] = round(time.time() - t0, 1)
    if not train:
        return dict(row, error=f"rc={rc}: {tail}")
    steady = [r["step_time_s"] for r in train[WARMUP_STEPS:]] or [r["step_time_s"] for r in train]
    step_s = statistics.median(steady)
    tokens_per_step = train[-1]["tokens_seen"] / train[-1]["step"]
    row.update(steps=len(train), median_ms=round(step_s * 1e3, 1), tokens_per_s=round(tokens_per_step / step_s),
               first_step_s=round(train[0]["step_time_s"], 1),
               peak_mb=round(train[-1].get("gpu_peak_gib", float("nan")) * 1024, 0),
               pilot_3b_hours=round(PILOT_TOKENS / (tokens_per_step / step_s) / 3600, 1),
               skipped_steps=sum(1 for r in records if r.get("event") == "skipped"),
               final_loss=round(train[-1]["loss"], 3))
    if rc != 0:
        row["error"] = f"rc={rc} after {len(train)} steps: {tail[-300:]}"
    return row


def run(device="cuda"):
    configs = os.environ.get("HOPE_TRAIN_CONFIGS", ",".join(CONFIGS)).split(",")
    steps = int(os.environ.get("HOPE_TRAIN_STEPS", "12"))
    timeout_s = float(os.environ.get("HOPE_TRAIN_TIMEOUT_S", "240"))
    compiles = [c == "1" for c in os.environ.get("HOPE_TRAIN_COMPILE", "0,1").split(",")]
    if str(device) == "cpu":
        return
    for config in configs:
        for compile_on in compiles:
            yield run_config(config, compile_on, steps, timeout_s)


if __name__ == "__main__":
    for r in run("cuda"):
        print(r)
