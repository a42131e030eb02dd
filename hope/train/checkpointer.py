"""Checkpointing for the trainer: everything a run needs to continue exactly (weights, optimizer states, each
rank's data position and RNG states, the trainer's counters), saved and restored collectively under DDP and
FSDP (every rank contributes its data position and RNG; FSDP's sharded weights and optimizer states are
gathered to the unsharded files the replicated path writes; rank 0 writes). The files: checkpoint.py."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from hope.train import checkpoint as ckpt
from hope.train import distributed as D
from hope.train.errors import RunError


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StateDictView:
    """What ``checkpoint.save_checkpoint`` needs of a model (``state_dict()``), for an FSDP model's gathered
    full state dict: the safetensors file is then the one the unsharded model writes."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return dict(self._state)


class Checkpointer:
    def __init__(self, run_dir: Path, model, optimizers: list, info: D.DistInfo, fsdp: bool, keep: int):
        self.run_dir, self.model, self.optimizers = Path(run_dir), model, optimizers
        self.info, self.fsdp, self.keep = info, fsdp, keep

    def save(self, step: int, train_state: dict, data_position: dict, metadata: dict) -> Path:
        """Collective: write ``step_<step>`` with ``train_state`` (plain data of the trainer), every rank's
        ``data_position`` and RNG states, the weights and optimizer states, and ``metadata`` (state.json)."""
        mine = (data_position, rng_state())
        if self.info.enabled:
            import torch.distributed as dist

            ranks: list = [None] * self.info.world_size
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if self.fsdp:  # collective: the full (unsharded) weights and optimizer states, on rank 0's CPU
            weights = _StateDictView(D.full_model_state_dict(self.model))
            optimizers = [D.full_optimizer_state_dict(self.model, o) for o in self.optimizers]
        else:
            weights, optimizers = self.model, None
        path, error = None, None
        if self.info.is_main:
            state = {**train_state, "optimizers": optimizers or [o.state_dict() for o in self.optimizers],
                     "data": [r[0] for r in ranks], "rng": [r[1] for r in ranks]}
            try:
                path = str(ckpt.save_checkpoint(self.run_dir, step, weights, state, metadata, keep=self.keep))
            except OSError as e:
                error = e
        return Path(D.from_main(path, error, self.info))

    def newest(self) -> Path | None:
        """Collective: the newest checkpoint of the run that verifies (rank 0 checks), or None."""
        found, error = None, None
        if self.info.is_main:
            try:
                step_dir = ckpt.select_checkpoint(self.run_dir)[0]
                found = None if step_dir is None else str(step_dir)
            except OSError as e:
                error = e
        found = D.from_main(found, error, self.info)
        return None if found is None else Path(found)

    def load(self, step_dir) -> tuple[dict, dict, dict]:
        """Collective: load the weights and optimizer states of ``step_dir`` (verified already) into the model and
        optimizers; returns the saved train state, this rank's data position and its RNG states."""
        state = ckpt.load_train_state(step_dir, verify=False)
        saved_by = len(state["data"])
        if saved_by != self.info.world_size:
            raise RunError(f"resume: checkpoint {step_dir} was saved by {saved_by} ranks, this run has "
                           f"{self.info.world_size}; resume with the same number of processes")
        if self.fsdp:  # every rank reads the full files and keeps its shards
            from safetensors.torch import load_file

            D.load_full_model_state_dict(self.model, load_file(str(Path(step_dir) / ckpt.MODEL_FILE)))
            for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
                D.load_full_optimizer_state_dict(self.model, opt, sd)
        else:
            ckpt.load_weights(self.model, step_dir, device=self.info.device)
            for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
                opt.load_state_dict(sd)
        rank = self.info.rank
        return state, state["data"][rank], state["rng"][rank]


__all__ = ["Checkpointer", "rng_state", "set_rng_state"]
