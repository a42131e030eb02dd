"""Divergence guard: a forward stopped by a value check on non-finite values (the model's parameters went bad)
is a bad step (skipped, logged with a reason, counted towards the rollback), not a crash; programming errors
still raise; under DDP every rank skips when one rank's forward fails."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hope.train import Trainer, load_config
from hope.train.logging import read_log
from tests.train.conftest import REPO, tiny_overrides
from tests.train.faults import FaultyTrainer

SMOKE = REPO / "hope" / "configs" / "smoke.yaml"


def _records(run_dir) -> list[dict]:
    return read_log(Path(run_dir) / "log.jsonl")


def test_value_checks_raise_a_typed_nonfinite_error():
    """NaN / inf values raise NonFiniteError (a bad step for the guard); wrong calls raise other errors."""
    import torch

    from hope_kernels._checks import NonFiniteError, check_float, check_range

    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(NonFiniteError, match="lr contains"):
            check_range("lr", torch.tensor([0.5, bad]), 0.0, 1.0)
    with pytest.raises(NonFiniteError, match="lr must be a finite float"):
        check_float("lr", float("nan"))
    with pytest.raises(ValueError, match="must lie in") as finite:
        check_range("lr", torch.tensor([-0.5, 1.2]), 0.0, 1.0)
    assert not isinstance(finite.value, NonFiniteError)


@pytest.mark.parametrize("mode", ["parallel", "online"])
def test_nan_parameters_skip_then_roll_back(tmp_path, prepared_corpus, mode):
    """Attempt 3 poisons every parameter with NaN: the gate check raises "lr contains NaN" in the forward of
    attempts 3 and 4 (the weights stay bad), two bad steps in a row roll back to the step-2 checkpoint, and
    the run finishes with finite weights."""
    cfg = load_config(SMOKE, tiny_overrides(tmp_path / "r", steps=5, ckpt_every=2, eval_every=0, batch_size=2,
                                            mode=mode, **{"guard.max_bad_steps": 2}))
    summary = FaultyTrainer(cfg, nan_params={3}).train()
    records = _records(summary["run_dir"])
    skipped = [r for r in records if r["event"] == "skipped"]
    rollbacks = [r for r in records if r["event"] == "rollback"]
    assert [r["step"] for r in skipped] == [3, 3] and [r["bad_in_row"] for r in skipped] == [1, 2]
    assert all(r["reason"] == "nonfinite_forward" for r in skipped), skipped
    assert "contains NaN" in skipped[0]["detail"] and skipped[0]["loss"] == "nan"
    assert len(rollbacks) == 1 and rollbacks[0]["step"] == 2 and rollbacks[0]["from_step"] == 3
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert steps == [1, 2, 3, 3, 4, 5] and summary["step"] == 5
    assert all(math.isfinite(r["loss"]) for r in records if r["event"] == "train")


def test_nan_loss_reason_is_logged(tmp_path, prepared_corpus):
    cfg = load_config(SMOKE, tiny_overrides(tmp_path / "r", steps=3, ckpt_every=0, eval_every=0, batch_size=2))
    summary = FaultyTrainer(cfg, nan_loss={1}).train()
    skipped = [r for r in _records(summary["run_dir"]) if r["event"] == "skipped"]
    assert len(skipped) == 1 and skipped[0]["reason"] == "nonfinite_loss" and "detail" not in skipped[0]


def test_programming_errors_in_the_forward_still_raise(tmp_path, prepared_corpus, monkeypatch):
    """A shape error and a type error raised by the model are not swallowed as bad steps."""
    trainer = Trainer(load_config(SMOKE, tiny_overrides(tmp_path / "r", steps=2, ckpt_every=0, eval_every=0)))
    for exc in (ValueError("k must have shape (4, 2, 64, 32), got (4, 2, 64, 16)"),
                TypeError("lr must have dtype in (float32), got int64")):
        def broken(*args, _exc=exc, **kwargs):
            raise _exc

        monkeypatch.setattr(trainer, "forward", broken)
        with pytest.raises(type(exc), match="must have"):
            trainer.train()
        trainer.step = 0


@pytest.mark.distributed
def test_ddp_ranks_skip_together_when_one_forward_fails(tmp_path, prepared_corpus):
    """Only rank 1's weights go bad: its forward raises, rank 0's does not; both skip (no collective
    mismatch, no crash), roll back together, and end with identical finite weights."""
    out = tmp_path / "ddp_out"
    out.mkdir()
    args = tiny_overrides(tmp_path / "ddp", steps=6, ckpt_every=2, eval_every=0, threads=1,
                          **{"guard.max_bad_steps": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "train" / "ddp_worker.py"), "--nan-params=3", "--nan-ranks=1", str(SMOKE), str(out),
           *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["finite"] and r1["finite"] and r0["params_sha256"] == r1["params_sha256"]
    records = _records(tmp_path / "ddp")
    skipped = [r for r in records if r["event"] == "skipped"]
    assert [r["bad_in_row"] for r in skipped] == [1, 2]
    assert all(r["reason"] == "nonfinite_forward" and r["bad_ranks"] == [1] for r in skipped), skipped
    assert [r["step"] for r in records if r["event"] == "rollback"] == [2]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 3, 4, 5, 6]
