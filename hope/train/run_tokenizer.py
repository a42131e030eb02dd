"""The tokenizer travels with the run: a copy of its model file in ``<run_dir>/tokenizer.model``, so a run
folder evaluates from any working directory and after it is moved (checked against the sha256 that every
checkpoint's state.json records under ``tokenizer``)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from hope.data.tokenizer import sha256_file

RUN_TOKENIZER = "tokenizer.model"


def copy_tokenizer_into_run(run_dir, tokenizer_path, sha256: str) -> Path:
    """Copy the tokenizer model into ``run_dir`` atomically (a temporary file, verified, then renamed).
    A run folder that already holds a different tokenizer is an error: its checkpoints were made with it."""
    dest = Path(run_dir) / RUN_TOKENIZER
    if dest.is_file():
        have = sha256_file(dest)
        if have == sha256:
            return dest
        raise ValueError(f"tokenizer mismatch: run folder {run_dir} holds {RUN_TOKENIZER} with sha256 {have}, this "
                         f"run's tokenizer {tokenizer_path} has {sha256}; start a new run folder")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.copyfile(tokenizer_path, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if sha256_file(tmp) != sha256:
        tmp.unlink()
        raise ValueError(f"tokenizer mismatch: {tokenizer_path} changed while it was copied into {run_dir} "
                         f"(expected sha256 {sha256})")
    os.replace(tmp, dest)
    return dest


__all__ = ["RUN_TOKENIZER", "copy_tokenizer_into_run"]
