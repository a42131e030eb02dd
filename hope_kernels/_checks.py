"""Argument checks shared by the public ops: each error names the argument and what was expected."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class NonFiniteError(ValueError):
    """A value check met NaN or inf values: the inputs have diverged (a trainer may skip the step), unlike the
    other ValueErrors here, which report a wrong call."""


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


#: set to "1" to turn the value checks off (also what ``value_checks_off`` does for a block)
SKIP_VALUE_CHECKS_ENV = "HOPE_SKIP_VALUE_CHECKS"


def value_checks_enabled() -> bool:
    """Value checks (gate ranges, finite values) read tensor data and so synchronise a GPU.

    They run unless ``HOPE_SKIP_VALUE_CHECKS=1`` or the call is being traced by torch.compile.
    """
    return os.environ.get(SKIP_VALUE_CHECKS_ENV, "0") != "1" and not _compiling()


@contextlib.contextmanager
def value_checks_off():
    """The value checks off for the block (e.g. a collective FSDP forward that must not stop on one rank)."""
    old = os.environ.get(SKIP_VALUE_CHECKS_ENV)
    os.environ[SKIP_VALUE_CHECKS_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(SKIP_VALUE_CHECKS_ENV, None)
        else:
            os.environ[SKIP_VALUE_CHECKS_ENV] = old


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on device {device} (like the other inputs), got {t.device}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: Iterable[int], what: str = "") -> None:
    expected = tuple(int(e) for e in expected)
    if tuple(t.shape) != expected:
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {expected}{hint}, got {tuple(t.shape)}")


def check_range(name: str, t: torch.Tensor, low: float, high: float) -> None:
    """Check low <= t <= high and finite (skipped when value checks are off)."""
    if not value_checks_enabled() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach().float())
    lo, hi = float(lo), float(hi)
    if not (lo == lo and hi == hi):  # NaN
        raise NonFiniteError(f"{name} contains NaN; expected values in [{low}, {high}]")
    if lo == float("-inf") or hi == float("inf"):
        raise NonFiniteError(f"{name} contains inf; expected values in [{low}, {high}]")
    if lo < low or hi > high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got values in [{lo:.4g}, {hi:.4g}]")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Check every entry of ``t`` is finite (skipped when value checks are off)."""
    if not value_checks_enabled() or t.numel() == 0:
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        where = tuple(int(i) for i in (~finite).nonzero()[0])
        raise NonFiniteError(f"{name} must be finite, got {t[where].item()} at index {where}")


def check_positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def check_choice(name: str, v, choices: Sequence[str]) -> str:
    if v not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {v!r}")
    return v


def check_float(name: str, v, low: float | None = None, high: float | None = None) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise NonFiniteError(f"{name} must be a finite float, got {v}")
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v
