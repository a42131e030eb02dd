"""W&B logging for eval results: offline unless WANDB_API_KEY is set; never fails an evaluation."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from hope.yamlio import load_yaml

DEFAULT_PROJECT = "hope-stage2"


def project_for(run_dir) -> str:
    """$WANDB_PROJECT, else the training run's ``log.wandb_project`` (config.yaml in run_dir), else the default."""
    if os.environ.get("WANDB_PROJECT"):
        return os.environ["WANDB_PROJECT"]
    cfg = Path(run_dir) / "config.yaml"
    if cfg.is_file():
        try:
            data = load_yaml(cfg.read_text()) or {}
            project = (data.get("log") or {}).get("wandb_project")
            if isinstance(project, str) and project:
                return project
        except yaml.YAMLError:
            pass
    return DEFAULT_PROJECT


def log_results(run_dir, suite: str, flat_metrics: dict) -> str:
    """Logs ``eval/<suite>/<metric>`` into the training run's W&B project; returns the mode used
    ("online", "offline" or "disabled: <why>")."""
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if os.environ.get("WANDB_MODE") == "disabled":
        return "disabled: WANDB_MODE=disabled"
    try:
        import wandb
        run = wandb.init(project=project_for(run_dir), dir=str(run_dir), mode=mode,
                         job_type=f"eval-{suite}", reinit=True)
        run.log({f"eval/{suite}/{k}": v for k, v in flat_metrics.items() if isinstance(v, (int, float))})
        run.finish()
        return mode
    except Exception as e:  # logging is a side channel: the JSON in the run folder is the record
        return f"disabled: {type(e).__name__}: {e}"
