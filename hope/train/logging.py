"""Run logging: JSON lines, W&B (offline unless WANDB_API_KEY is set), a tqdm progress bar, a PNG loss curve."""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

# wall-clock fields: the only keys of a log line that differ between two runs of the same config and seed
TIMING_KEYS = ("tokens_per_s", "elapsed_s", "step_time_s")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf: write "nan" / "inf" so a diverged step stays visible
    return value


def count_records(path) -> int:
    """Records (non-empty lines) of a log.jsonl; 0 when there is none."""
    if not Path(path).is_file():
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def _keep_first_records(path: Path, n: int) -> None:
    """Cut ``path`` to its first ``n`` records (atomically): the records a resumed run writes again go."""
    if not path.is_file():
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if len(lines) <= n:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.writelines(lines[:n])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLogger:
    """Writes ``log.jsonl`` (main rank only), mirrors scalars to W&B, drives the progress bar.

    ``keep_records``: how many records of an earlier life of the run to keep (those written up to the checkpoint
    a resume starts from, so the log holds one record per step; None: keep all)."""

    def __init__(self, run_dir: Path, cfg, total_steps: int, start_step: int, enabled: bool = True,
                 keep_records: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "log.jsonl"
        self.wandb_run = None
        self.bar = None
        self.records = 0
        if not enabled:
            return
        if keep_records is not None:
            _keep_first_records(self.path, keep_records)
        self.records = count_records(self.path)
        self._file = open(self.path, "a")
        self._init_wandb(cfg)
        if cfg.log.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _init_wandb(self, cfg) -> None:
        mode = cfg.log.wandb
        if mode == "disabled":
            return
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError:
            warnings.warn("log.wandb: the wandb package is not installed; W&B logging is off", stacklevel=2)
            return
        self.wandb_run = wandb.init(project=cfg.log.wandb_project, name=self.run_dir.name, dir=str(self.run_dir),
                                    mode=mode, config=cfg.to_dict(), resume="allow", id=self.run_dir.name)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        line = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(line, sort_keys=True) + "\n")
        self._file.flush()
        self.records += 1
        if self.wandb_run is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.wandb_run.log(scalars, step=int(record.get("step", 0)))

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        plot_losses(self.path, self.run_dir / "plots" / "loss.png")


def read_log(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(log_path, out_png) -> Path | None:
    """Train loss per step and validation loss at eval steps -> PNG."""
    records = read_log(log_path) if Path(log_path).is_file() else []
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train" and isinstance(r.get("loss"), float)]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("event") == "eval"]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
