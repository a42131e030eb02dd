"""W&B logging for eval results: offline unless WANDB_API_KEY is set; never fails an evaluation."""
from __future__ import annotations

import os


def log_results(run_dir, suite: str, flat_metrics: dict) -> str:
    """Logs ``eval/<suite>/<metric>``; returns the mode used ("online", "offline" or "disabled: <why>")."""
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if os.environ.get("WANDB_MODE") == "disabled":
        return "disabled: WANDB_MODE=disabled"
    try:
        import wandb
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "hope"), dir=str(run_dir), mode=mode,
                         job_type=f"eval-{suite}", reinit=True)
        run.log({f"eval/{suite}/{k}": v for k, v in flat_metrics.items() if isinstance(v, (int, float))})
        run.finish()
        return mode
    except Exception as e:  # logging is a side channel: the JSON in the run folder is the record
        return f"disabled: {type(e).__name__}: {e}"
