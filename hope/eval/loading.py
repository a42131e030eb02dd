"""Checkpoint + tokenizer loading for evaluation: strict keys, tokenizer checksum must match the checkpoint."""
from __future__ import annotations

from pathlib import Path


def load_for_eval(checkpoint, tokenizer_path=None, device="cpu"):
    """``(model, tokenizer, state_json, run_dir)``. Missing/unexpected weight keys raise (strict loading);
    a tokenizer whose sha256 differs from the one recorded in the checkpoint raises ValueError."""
    from hope.data.tokenizer import Tokenizer
    from hope.train.checkpoint import load_model, resolve_step_dir

    if checkpoint is None or not Path(checkpoint).exists():
        raise ValueError(f"--checkpoint must be an existing run, checkpoints or step folder, got {checkpoint!r}")
    model, state = load_model(checkpoint, strict=True, device=device)
    model.eval()
    recorded = state.get("tokenizer") or {}
    path = tokenizer_path or recorded.get("path")
    if not path:
        raise ValueError("the checkpoint records no tokenizer path; pass --tokenizer")
    tok = Tokenizer.load(path)
    check_tokenizer(tok, recorded.get("sha256"), model.config.vocab_size)
    step_dir = resolve_step_dir(checkpoint)
    run_dir = step_dir.parent.parent
    return model, tok, state, run_dir


def check_tokenizer(tok, expected_sha256, model_vocab_size: int) -> None:
    if expected_sha256 and tok.sha256 != expected_sha256:
        raise ValueError(f"tokenizer mismatch: the checkpoint was trained with tokenizer sha256 {expected_sha256}, "
                         f"the eval tokenizer {tok.path if hasattr(tok, 'path') else ''} has {tok.sha256}")
    if tok.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer mismatch: tokenizer vocab_size {tok.vocab_size} exceeds the model's "
                         f"{model_vocab_size}")
