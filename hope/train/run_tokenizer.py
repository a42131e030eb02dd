"""The tokenizer travels with the run: a copy of its model file in ``<run_dir>/tokenizer.model`` (a Hugging Face
tokenizer folder: ``<run_dir>/tokenizer_hf/``), so a run folder evaluates from any working directory and after it
is moved (checked against the sha256 that every checkpoint's state.json records under ``tokenizer``)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from hope.data.tokenizer import tokenizer_sha256

RUN_TOKENIZER = "tokenizer.model"
RUN_HF_TOKENIZER = "tokenizer_hf"


def copy_tokenizer_into_run(run_dir, tokenizer_path, sha256: str) -> Path:
    """Copy the tokenizer model into ``run_dir`` atomically (a temporary file, verified, then renamed).
    A run folder that already holds a different tokenizer is an error: its checkpoints were made with it."""
    source = Path(tokenizer_path)
    dest = Path(run_dir) / (RUN_HF_TOKENIZER if source.is_dir() else RUN_TOKENIZER)
    if dest.exists():
        have = tokenizer_sha256(dest)
        if have == sha256:
            return dest
        raise ValueError(f"tokenizer mismatch: run folder {run_dir} holds {RUN_TOKENIZER} with sha256 {have}, this "
                         f"run's tokenizer {tokenizer_path} has {sha256}; start a new run folder")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if source.is_dir():
        shutil.copytree(source, tmp)
    else:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    if tokenizer_sha256(tmp) != sha256:
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        raise ValueError(f"tokenizer mismatch: {tokenizer_path} changed while it was copied into {run_dir} "
                         f"(expected sha256 {sha256})")
    os.replace(tmp, dest)
    return dest


__all__ = ["RUN_TOKENIZER", "RUN_HF_TOKENIZER", "copy_tokenizer_into_run"]
