"""Checkpoints (docs/runs.md): atomic step folders of tensors and plain data, verified before use.

    <run_dir>/checkpoints/step_<n>/
      model.safetensors          weights
      train_state.safetensors    the train state's tensors (optimizer moments, RNG states)
      train_state.json           the rest of it: step, data positions, optimizer scalars and layout, guard state
      state.json                 metadata (model config, tokenizer, data, run config) and the sha256 of each file
                                 above; written last, so a folder without it is not a checkpoint
    <run_dir>/checkpoints/latest, best   names of the step folder last written / of the lowest validation loss

Nothing is unpickled: tensors come from safetensors, everything else from JSON. A step folder is written as
``.tmp-step_<n>-<pid>`` and renamed into place, then ``latest`` is replaced, so a save killed (or failing on a
full disk) at any point leaves the previous checkpoint usable. Folders of the older format (the train state
pickled in ``train_state.pt``) are refused; ``python -m hope.train.checkpoint convert <folder>`` converts them
with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file as _st_load_file
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_file as _st_save_file
from safetensors.torch import save_model as _st_save_model

from hope.data.tokenizer import sha256_file

FORMAT = 2
MODEL_FILE = "model.safetensors"
TENSORS_FILE = "train_state.safetensors"
TRAIN_STATE_FILE = "train_state.json"
STATE_FILE = "state.json"
LEGACY_FILE = "train_state.pt"
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A step folder that is not a usable checkpoint; ``reason`` says why, ``hint`` what to do."""

    def __init__(self, step_dir, reason: str, hint: str = ""):
        self.step_dir, self.reason, self.hint = Path(step_dir), reason, hint
        super().__init__(f"checkpoint {self.step_dir}: {reason}" + (f"; {hint}" if hint else ""))


# ----------------------------------------------------------------------- train state <-> JSON + tensors
def encode(obj, tensors: dict, key: str = "state"):
    """``obj`` as JSON-ready data; its tensors go into ``tensors`` under their path (``decode`` inverts)."""
    if isinstance(obj, torch.Tensor):
        if key in tensors:  # a dict key holding a "." can spell another entry's path
            key = f"{key}#{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, f"{key}.k{i}"), encode(v, tensors, f"{key}.{k}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"checkpoint: {key} is a {type(obj).__name__}; a checkpoint holds tensors and plain data only")


def decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
    return {k: decode(v, tensors) for k, v in obj.items()}


# ------------------------------------------------------------------------------------------------ write
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir, step: int, model, train_state: dict, state_json: dict, keep: int = 2) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>/`` atomically and point ``latest`` at it. ``model``: anything
    with ``state_dict()``; ``train_state``: tensors and plain data (``encode``). A failed write raises OSError
    naming the file and leaves no partial folder."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".tmp-step_{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    current = tmp
    try:
        tmp.mkdir()
        current = tmp / MODEL_FILE
        _st_save_model(model, str(current))
        tensors: dict = {}
        plain = encode(train_state, tensors)
        current = tmp / TENSORS_FILE
        _st_save_file(tensors, str(current))
        current = tmp / TRAIN_STATE_FILE
        _write_json(current, plain)
        files = {}
        for name in (MODEL_FILE, TENSORS_FILE, TRAIN_STATE_FILE):
            current = tmp / name
            _fsync(current)
            files[name] = sha256_file(current)
        current = tmp / STATE_FILE
        _write_json(current, {**state_json, "step": step, "format": FORMAT, "files": files, "complete": True})
    except Exception as e:  # noqa: BLE001 - any failure (disk full, safetensors' own errors): no partial folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"checkpoint step_{step}: could not write {current}: {e}") from e
    if final.exists():  # re-saving a step (after a rollback): move the old folder aside first, atomically
        trash = ckpt_root / f".trash-step_{step}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(ckpt_root)
    _write_atomic(ckpt_root / "latest", final.name)
    _prune(ckpt_root, keep, protect=final.name)
    return final


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """Step folders, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def _prune(ckpt_root: Path, keep: int, protect: str) -> None:
    best = _pointer(ckpt_root / "best")
    for old in _step_dirs(ckpt_root)[keep:] if keep > 0 else []:
        if old.name not in (protect, best):
            shutil.rmtree(old, ignore_errors=True)
    for stale in (*ckpt_root.glob(".tmp-step_*"), *ckpt_root.glob(".trash-step_*")):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def _pointer(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def mark_best(run_dir, step: int) -> None:
    """Record ``step_<step>`` as the best checkpoint (lowest validation loss); pruning keeps it."""
    _write_atomic(Path(run_dir) / "checkpoints" / "best", f"step_{step}")


# ------------------------------------------------------------------------------------------ verify / find
def verify_checkpoint(step_dir, files=None) -> dict:
    """``state.json`` of ``step_dir`` after checking it marks a complete checkpoint and that each of its files
    (``files``: a subset of the names, None: all) matches its recorded sha256; else CheckpointError."""
    step_dir = Path(step_dir)
    state_path = step_dir / STATE_FILE
    if not step_dir.is_dir():
        raise CheckpointError(step_dir, "no such folder")
    if not state_path.is_file():
        raise CheckpointError(step_dir, f"{STATE_FILE} is missing (a save that did not finish)")
    try:
        state = json.loads(state_path.read_bytes())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(step_dir, f"{STATE_FILE} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("complete") is not True:
        raise CheckpointError(step_dir, f"{STATE_FILE} does not mark a complete checkpoint")
    if "files" not in state:
        if (step_dir / LEGACY_FILE).exists():
            raise CheckpointError(step_dir, f"older format: the train state is a pickle ({LEGACY_FILE}), not loaded "
                                  "because unpickling can run code",
                                  f"if you trust it, convert it: python -m hope.train.checkpoint convert {step_dir}")
        raise CheckpointError(step_dir, f"{STATE_FILE} records no file hashes")
    for name, digest in state["files"].items():
        if files is not None and name not in files:
            continue
        if not (step_dir / name).is_file():
            raise CheckpointError(step_dir, f"{name} is missing")
        if sha256_file(step_dir / name) != digest:
            raise CheckpointError(step_dir, f"{name} does not match its recorded sha256 (damaged or changed)")
    return state


def select_checkpoint(run_dir, files=None) -> tuple[Path | None, dict[str, str]]:
    """The newest step folder of ``run_dir`` that verifies (or None), and why each newer one was skipped
    (``{folder name: reason}``, with a note when ``latest`` names a folder that is not there)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    skipped: dict[str, str] = {}
    latest = _pointer(ckpt_root / "latest")
    if latest and not (ckpt_root / latest).is_dir():
        skipped[latest] = "named by checkpoints/latest but not there"
    for step_dir in _step_dirs(ckpt_root):
        try:
            verify_checkpoint(step_dir, files)
            return step_dir, skipped
        except CheckpointError as e:
            skipped[step_dir.name] = e.reason + (f" ({e.hint})" if e.hint else "")
    return None, skipped


def has_checkpoints(run_dir) -> bool:
    return bool(_step_dirs(Path(run_dir) / "checkpoints"))


def resolve_step_dir(path, files=(MODEL_FILE,)) -> Path:
    """A step folder, or the newest verifying one of a run / checkpoints folder (warning about newer ones that
    do not verify); its ``files`` are checked against their sha256. Raises CheckpointError / FileNotFoundError."""
    path = Path(path)
    if (path / STATE_FILE).is_file() or _STEP_DIR.fullmatch(path.name):
        verify_checkpoint(path, files)
        return path
    run_dir = path.parent if path.name == "checkpoints" and not (path / "checkpoints").is_dir() else path
    step_dir, skipped = select_checkpoint(run_dir, files)
    if step_dir is None:
        if skipped:
            raise CheckpointError(run_dir / "checkpoints", "no checkpoint verifies: " +
                                  "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        raise FileNotFoundError(f"path: no checkpoint under {str(path)!r}")
    if skipped:
        warnings.warn(f"checkpoint: using {step_dir}; skipped " + "; ".join(f"{k}: {v}" for k, v in skipped.items()),
                      stacklevel=2)
    return step_dir


def find_latest(run_dir) -> Path | None:
    """The newest verifying checkpoint of ``run_dir``, or None."""
    return select_checkpoint(run_dir)[0]


# ------------------------------------------------------------------------------------------------- read
def read_state_json(path) -> dict:
    return json.loads((resolve_step_dir(path) / STATE_FILE).read_text())


def load_model(path, strict: bool = True, device="cpu"):
    """``(model, state_json)`` from a run folder, checkpoints folder or step folder."""
    from hope.models import ModelConfig, build_model

    step_dir = resolve_step_dir(path)
    state = json.loads((step_dir / STATE_FILE).read_text())
    model = build_model(ModelConfig.from_dict(state["model_config"]))
    load_weights(model, step_dir, strict=strict, device=device)
    return model.to(device), state


def load_weights(model: torch.nn.Module, step_dir, strict: bool = True, device="cpu") -> None:
    missing, unexpected = _st_load_model(model, str(Path(step_dir) / MODEL_FILE), strict=strict,
                                         device=str(device))
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint {step_dir}: missing {missing}, unexpected {unexpected}")


def load_train_state(step_dir, verify: bool = True) -> dict:
    """The train state saved with the checkpoint (tensors on the CPU); its files are verified first."""
    step_dir = Path(step_dir)
    if verify:
        verify_checkpoint(step_dir, (TENSORS_FILE, TRAIN_STATE_FILE))
    plain = json.loads((step_dir / TRAIN_STATE_FILE).read_text())
    return decode(plain, _st_load_file(str(step_dir / TENSORS_FILE)))


# ------------------------------------------------------------------------------------- older checkpoints
def _numpy_globals() -> list:
    """What an older train state needs beyond tensors: numpy arrays (the NumPy RNG state), under both module
    names NumPy has used."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [(reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype,
            *(type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64))]


def convert_legacy(path) -> list[Path]:
    """Convert the older-format step folders at ``path`` (one step folder, or a run / checkpoints folder) in
    place: ``train_state.pt`` read with ``torch.load(weights_only=True)`` (tensors and plain data only; anything
    else is refused) becomes ``train_state.safetensors`` + ``train_state.json``. Returns the converted folders."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        step_dirs = [path]
    else:
        step_dirs = _step_dirs(path if path.name == "checkpoints" else path / "checkpoints")
    done = []
    for step_dir in step_dirs:
        legacy = step_dir / LEGACY_FILE
        if not legacy.is_file():
            continue
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError and whatever a damaged file raises
            raise ValueError(f"checkpoint {legacy}: not converted: it does not load as tensors and plain data only "
                             f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
        state.pop("fast_state", None)
        meta = json.loads((step_dir / STATE_FILE).read_text())
        tensors: dict = {}
        plain = encode(state, tensors)
        _st_save_file(tensors, str(step_dir / TENSORS_FILE))
        _write_json(step_dir / TRAIN_STATE_FILE, plain)
        meta["files"] = {name: sha256_file(step_dir / name) for name in (MODEL_FILE, TENSORS_FILE, TRAIN_STATE_FILE)}
        meta["format"] = FORMAT
        _write_json(step_dir / f".{STATE_FILE}.tmp", meta)
        os.replace(step_dir / f".{STATE_FILE}.tmp", step_dir / STATE_FILE)
        legacy.unlink()
        done.append(step_dir)
    return done


def main(argv: list[str] | None = None) -> int:
    """python -m hope.train.checkpoint verify|convert <run, checkpoints or step folder>..."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("verify", "convert"):
        print(main.__doc__, file=sys.stderr)
        return 2
    rc = 0
    for path in argv[1:]:
        try:
            if argv[0] == "convert":
                done = convert_legacy(path)
                print(f"{path}: converted {len(done)} checkpoint(s)" + "".join(f"\n  {d}" for d in done))
            elif (Path(path) / STATE_FILE).is_file():
                verify_checkpoint(path)
                print(f"{path}: verifies")
            else:
                chosen, skipped = select_checkpoint(Path(path).parent if Path(path).name == "checkpoints" else path)
                for name, reason in skipped.items():
                    print(f"{path}: skipped {name}: {reason}")
                print(f"{path}: newest good checkpoint: {chosen}")
                rc = rc or int(chosen is None)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            rc = 1
    return rc


__all__ = ["save_checkpoint", "mark_best", "verify_checkpoint", "select_checkpoint", "has_checkpoints", "find_latest",
           "resolve_step_dir", "read_state_json", "load_model", "load_weights", "load_train_state", "convert_legacy",
           "encode", "decode", "CheckpointError", "FORMAT"]

if __name__ == "__main__":
    sys.exit(main())
