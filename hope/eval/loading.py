"""Checkpoint + tokenizer loading for evaluation: strict keys, tokenizer checksum must match the checkpoint.

The tokenizer comes from, in order: ``--tokenizer``; the run folder's own copy (``<run>/tokenizer.model``,
written by the trainer at run start), so a run evaluates from any working directory and after it is moved;
the path recorded in the checkpoint (relative paths resolve against the working directory)."""
from __future__ import annotations

from pathlib import Path

import torch


def resolve_device(device) -> torch.device:
    """``None``/``"auto"``: cuda when available, else cpu. A cuda device on a machine without one is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA device is available; use device=cpu")
    return dev


def load_for_eval(checkpoint, tokenizer_path=None, device="cpu"):
    """``(model, tokenizer, state_json, run_dir)``. Missing/unexpected weight keys raise (strict loading);
    a tokenizer whose sha256 differs from the one recorded in the checkpoint raises ValueError."""
    from hope.train.checkpoint import load_model, resolve_step_dir

    if checkpoint is None or not Path(checkpoint).exists():
        raise ValueError(f"--checkpoint must be an existing run, checkpoints or step folder, got {checkpoint!r}")
    device = resolve_device(device)
    model, state = load_model(checkpoint, strict=True, device=device)
    model.eval()
    run_dir = resolve_step_dir(checkpoint).parent.parent
    tok = load_run_tokenizer(run_dir, state, tokenizer_path)
    check_tokenizer(tok, (state.get("tokenizer") or {}).get("sha256"), model.config.vocab_size)
    return model, tok, state, run_dir


def load_run_tokenizer(run_dir, state: dict, tokenizer_path=None):
    """The tokenizer of a checkpoint (see the module docstring for the search order); the run folder's copy
    must match the recorded sha256."""
    from hope.data.tokenizer import Tokenizer
    from hope.train.run_tokenizer import RUN_TOKENIZER

    if tokenizer_path is not None:
        return Tokenizer.load(tokenizer_path)
    recorded = state.get("tokenizer") or {}
    copy = Path(run_dir) / RUN_TOKENIZER
    if copy.is_file():
        tok = Tokenizer.load(copy)
        if recorded.get("sha256") and tok.sha256 != recorded["sha256"]:
            raise ValueError(f"tokenizer mismatch: the run folder's {copy} has sha256 {tok.sha256}, the checkpoint "
                             f"was trained with {recorded['sha256']}; pass --tokenizer with the right file")
        return tok
    path = recorded.get("path")
    if not path:
        raise ValueError(f"the checkpoint records no tokenizer and {copy} does not exist; pass --tokenizer")
    if not Path(path).is_file():
        raise ValueError(f"the checkpoint's tokenizer {path} is not found (from {Path.cwd()}) and {copy} does not "
                         f"exist; pass --tokenizer PATH")
    return Tokenizer.load(path)


def check_tokenizer(tok, expected_sha256, model_vocab_size: int) -> None:
    if expected_sha256 and tok.sha256 != expected_sha256:
        raise ValueError(f"tokenizer mismatch: the checkpoint was trained with tokenizer sha256 {expected_sha256}, "
                         f"the eval tokenizer {getattr(tok, 'path', '')} has {tok.sha256}")
    if tok.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer mismatch: tokenizer vocab_size {tok.vocab_size} exceeds the model's "
                         f"{model_vocab_size}")
