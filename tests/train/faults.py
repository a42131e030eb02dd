"""Fault injection for the trainer tests: a Trainer whose forward goes bad on chosen attempts, crafted pickles,
byte snapshots of a run folder and a legacy (pickle) checkpoint writer."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hope.train import Trainer


class FaultyTrainer(Trainer):
    """A Trainer whose training forward goes bad on chosen attempts (0-based calls of ``forward``, skipped steps
    included): ``nan_loss`` multiplies the loss by NaN; ``nan_params`` multiplies every parameter by NaN before
    the forward (the model has gone bad: value checks raise NonFiniteError, and every later step is bad too until
    the guard rolls back). ``ranks``: the ranks these act on (None: every rank)."""

    def __init__(self, cfg, *, nan_loss=(), nan_params=(), ranks=None):
        self.nan_loss, self.nan_params = set(nan_loss), set(nan_params)
        self.fault_ranks = None if ranks is None else set(ranks)
        self.attempts = 0
        super().__init__(cfg)

    def forward(self, batch, teach_scale):
        attempt, self.attempts = self.attempts, self.attempts + 1
        hit = self.fault_ranks is None or self.info.rank in self.fault_ranks
        if hit and attempt in self.nan_params:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(float("nan"))
        loss, metrics, out = super().forward(batch, teach_scale)
        if hit and attempt in self.nan_loss:
            loss = loss * float("nan")
        return loss, metrics, out


def parse_fault_args(argv: list[str]) -> tuple[dict, list[str]]:
    """``--nan-loss=1,2 --nan-params=3 --nan-ranks=1`` at the front of a worker's argv -> FaultyTrainer kwargs."""
    faults, rest = {}, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("--nan-loss", "--nan-params", "--nan-ranks"):
            faults[{"--nan-loss": "nan_loss", "--nan-params": "nan_params", "--nan-ranks": "ranks"}[key]] = [
                int(v) for v in value.split(",") if v]
        else:
            rest.append(arg)
    return faults, rest


class _OpensAFile:
    """Unpickling this calls ``open(marker, "w")``: the marker file's existence proves the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_crafted_pickle(path: Path, marker: Path) -> None:
    torch.save(_OpensAFile(marker), path)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_legacy(step_dir: Path) -> None:
    """Rewrite a checkpoint in the older layout: the train state pickled into ``train_state.pt`` (what
    ``torch.save`` made of it), ``state.json`` without the file hashes."""
    from hope.train.checkpoint import load_train_state

    step_dir = Path(step_dir)
    state = {k: v for k, v in load_train_state(step_dir).items()
             if k in ("step", "tokens_seen", "best_val", "optimizers", "data", "rng")}
    state["fast_state"] = None
    meta = json.loads((step_dir / "state.json").read_text())
    torch.save(state, step_dir / "train_state.pt")
    for name in meta.pop("files"):
        if name != "model.safetensors":
            (step_dir / name).unlink()
    meta.pop("format", None)
    (step_dir / "state.json").write_text(json.dumps(meta))
