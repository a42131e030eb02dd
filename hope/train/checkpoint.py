"""Checkpoints (docs/architecture.md, "Checkpoint format"): atomic step folders + a ``latest`` pointer.

A step folder is written as ``.tmp-step_<n>-<pid>`` and renamed into place; ``latest`` is replaced with
``os.replace`` only after the rename, so a save killed at any point leaves the previous checkpoint usable.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

# test hook "<step>:<seconds>": sleep inside the save of that step (after the weights are written) so a
# test can SIGKILL the process mid-save
PAUSE_ENV = "HOPE_TEST_PAUSE_IN_SAVE"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir, step: int, model: torch.nn.Module, train_state: dict, state_json: dict,
                    keep: int = 2) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>/`` atomically and point ``latest`` at it."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".tmp-step_{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _st_save_model(model, str(tmp / "model.safetensors"))
    torch.save(train_state, tmp / "train_state.pt")
    pause_step, _, pause = os.environ.get(PAUSE_ENV, "").partition(":")
    if pause and int(pause_step) == step:
        (Path(run_dir) / "saving.marker").write_text(str(step))
        time.sleep(float(pause))
    with open(tmp / "state.json", "w") as f:
        json.dump({**state_json, "step": step, "complete": True}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for name in ("model.safetensors", "train_state.pt"):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (after a rollback): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    _write_atomic(ckpt_root / "latest", f"step_{step}")
    _prune(ckpt_root, keep, protect=final.name)
    return final


def _prune(ckpt_root: Path, keep: int, protect: str) -> None:
    steps = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    best = _best_step_name(ckpt_root)
    for old in steps[:-keep] if keep > 0 else []:
        if old.name not in (protect, best):
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob(".tmp-step_*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def _best_step_name(ckpt_root: Path) -> str | None:
    best = ckpt_root / "best"
    return best.read_text().strip() if best.is_file() else None


def mark_best(run_dir, step: int) -> None:
    """Record ``step_<step>`` as the best checkpoint (lowest validation loss); pruning keeps it."""
    _write_atomic(Path(run_dir) / "checkpoints" / "best", f"step_{step}")


def is_complete(step_dir: Path) -> bool:
    state = step_dir / "state.json"
    if not (state.is_file() and (step_dir / "model.safetensors").is_file()):
        return False
    try:
        return bool(json.loads(state.read_text()).get("complete"))
    except (json.JSONDecodeError, OSError):
        return False


def resolve_step_dir(path) -> Path:
    """A run folder, a checkpoints folder or a step folder -> the step folder (``latest`` for the first two)."""
    path = Path(path)
    if (path / "state.json").is_file():
        step_dir = path
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"path: no checkpoint under {str(path)!r} (no {latest})")
        step_dir = root / latest.read_text().strip()
    if not is_complete(step_dir):
        raise FileNotFoundError(f"path: {str(step_dir)!r} is not a complete checkpoint")
    return step_dir


def find_latest(run_dir) -> Path | None:
    """The latest complete checkpoint of ``run_dir``, or None."""
    try:
        return resolve_step_dir(Path(run_dir) / "checkpoints")
    except FileNotFoundError:
        return None


def read_state_json(path) -> dict:
    return json.loads((resolve_step_dir(path) / "state.json").read_text())


def load_model(path, strict: bool = True, device="cpu"):
    """``(model, state_json)`` from a run folder, checkpoints folder or step folder."""
    from hope.models import ModelConfig, build_model

    step_dir = resolve_step_dir(path)
    state = json.loads((step_dir / "state.json").read_text())
    model = build_model(ModelConfig.from_dict(state["model_config"]))
    load_weights(model, step_dir, strict=strict, device=device)
    return model.to(device), state


def load_weights(model: torch.nn.Module, step_dir, strict: bool = True, device="cpu") -> None:
    missing, unexpected = _st_load_model(model, str(Path(step_dir) / "model.safetensors"), strict=strict,
                                         device=str(device))
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint {step_dir}: missing {missing}, unexpected {unexpected}")


def load_train_state(step_dir) -> dict:
    return torch.load(Path(step_dir) / "train_state.pt", map_location="cpu", weights_only=False)


__all__ = ["save_checkpoint", "mark_best", "find_latest", "resolve_step_dir", "read_state_json", "load_model",
           "load_weights", "load_train_state", "is_complete", "PAUSE_ENV"]
