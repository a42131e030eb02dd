"""The divergence guard: which steps are bad, when to roll back, when to give up (docs/runs.md).

A step is bad when its forward stopped on non-finite values (``NonFiniteError`` from a value check), its loss
or teach-signal norm is not finite, the teach-signal norm exceeds ``guard.max_teach_norm``, the loss exceeds
``guard.loss_spike`` times the running loss (an exploding but finite loss), or the clipped gradient norm is not
finite. A bad step is skipped (no optimizer step); ``guard.max_bad_steps`` in a row roll back to the newest
checkpoint; after ``guard.max_rollbacks`` rollbacks with no newer checkpoint written in between the run stops
with DivergenceError. So a run always ends: each reset of the rollback budget needs a checkpoint at a later step.
Under data parallelism every rank reaches the same verdict (``decide`` is collective).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hope.train import distributed as D
from hope.train.errors import DivergenceError

# weight of the newest accepted loss in the running loss (an exponential moving average over ~10 steps)
RUNNING_LOSS_WEIGHT = 0.1


@dataclass
class Verdict:
    """Why a step is bad: ``reason`` (the first bad rank's), its ``detail``, the ranks that saw it and the loss
    to report (this rank's, or the mean over ranks for a spike; nan when the forward stopped)."""
    reason: str
    detail: str | None
    ranks: tuple
    loss: float


class DivergenceGuard:
    def __init__(self, cfg, info: D.DistInfo):
        self.cfg, self.info = cfg, info
        self.running_loss: float | None = None  # of accepted steps; saved with each checkpoint
        self.bad_in_row = 0
        self.rollbacks = 0                      # since the last checkpoint written
        self.last: Verdict | None = None

    def decide(self, loss, teach_norm: float, forward_error: str | None) -> tuple[Verdict | None, float]:
        """Collective: the verdict on a step from its (local) loss tensor, teach-signal norm and forward error
        (None: a good step), and the loss averaged over ranks."""
        loss_value = float("nan") if loss is None else float(loss.detach())
        if forward_error is not None:
            local = ("nonfinite_forward", forward_error)
        elif not math.isfinite(loss_value):
            local = ("nonfinite_loss", None)
        elif not math.isfinite(teach_norm):
            local = ("nonfinite_teach_signal_norm", None)
        elif teach_norm > self.cfg.max_teach_norm:
            local = ("teach_signal_norm_above_max", None)
        else:
            local = None
        bad = D.bad_ranks(local, self.info)
        if bad:
            reason, detail = bad[0][1]
            return Verdict(reason, detail, tuple(r for r, _ in bad), loss_value), float("nan")
        mean = D.mean_scalar(loss_value, self.info)
        spike = self.cfg.loss_spike
        if spike and self.running_loss is not None and mean > spike * self.running_loss:
            detail = f"loss {mean:.4g} > guard.loss_spike {spike:g} x running loss {self.running_loss:.4g}"
            return self.every_rank("loss_spike", mean, detail), mean
        return None, mean

    def every_rank(self, reason: str, loss: float, detail: str | None = None) -> Verdict:
        """A verdict every rank reached by itself (from values that are the same on every rank)."""
        return Verdict(reason, detail, tuple(range(self.info.world_size)), loss)

    def accept(self, loss: float) -> None:
        self.bad_in_row = 0
        w = RUNNING_LOSS_WEIGHT
        self.running_loss = loss if self.running_loss is None else (1 - w) * self.running_loss + w * loss

    def reject(self, verdict: Verdict) -> None:
        self.bad_in_row += 1
        self.last = verdict

    @property
    def wants_rollback(self) -> bool:
        return self.bad_in_row >= self.cfg.max_bad_steps

    def check_rollback(self, step: int, checkpoint) -> None:
        """Before rolling back to ``checkpoint`` (None: there is none): raise DivergenceError when the budget is
        spent, else count the rollback."""
        what = (f"divergence at step {step}: {self.bad_in_row} bad steps in a row (last: {self.last.reason}, "
                f"loss {self.last.loss:.4g})")
        if checkpoint is None:
            raise DivergenceError(f"{what} and no checkpoint to roll back to (ckpt_every=0?); lower optim.outer.lr "
                                  "or look at the log")
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise DivergenceError(f"{what} after {self.rollbacks} rollbacks to checkpoint {checkpoint} "
                                  f"(guard.max_rollbacks={self.cfg.max_rollbacks}); lower optim.outer.lr or look at "
                                  "the log")
        self.rollbacks += 1
        self.bad_in_row = 0

    def checkpoint_written(self) -> None:
        self.rollbacks = 0

    def state_dict(self) -> dict:
        return {"running_loss": self.running_loss}

    def load_state_dict(self, state: dict) -> None:
        self.running_loss = state.get("running_loss")
        self.bad_in_row = 0


__all__ = ["DivergenceGuard", "Verdict", "RUNNING_LOSS_WEIGHT"]
