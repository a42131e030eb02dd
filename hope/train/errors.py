"""Why a run refused to start or stopped: ``python -m hope.train`` prints these as one ``error:`` line."""
from __future__ import annotations


class RunError(Exception):
    """A run refused to start (the folder is in use, holds another run, no checkpoint verifies, the data or
    tokenizer differ from the checkpoint's) or stopped (divergence); the message says what to do."""


class DivergenceError(RunError):
    """The divergence guard gave up: bad steps went on after ``guard.max_rollbacks`` rollbacks."""


__all__ = ["RunError", "DivergenceError"]
