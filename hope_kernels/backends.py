"""Backend records and the one dispatcher every op uses.

Each implementation of an op is one :class:`Backend` record, declared beside its code and registered by the op's
interface module. ``backend="auto"`` walks the op's records from the highest ``priority`` down and takes the first
that is switched on, runs on the tensors' device, supports the call and does not leave it to a later backend
(``auto_skips``: a measured preference, cited from docs/performance.md); it never picks the Triton interpreter. A named backend (argument, or
``$HOPE_BACKEND`` for every op) runs that backend or raises a clear error; ``$HOPE_BACKEND`` gives way to auto on a
call its backend does not support, so one variable can force a backend through a whole model.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

#: every backend name an op may register
NAMES: tuple[str, ...] = ("cuda", "triton", "cpp", "reference")
#: environment variable that names one backend for every op (``auto`` or unset: no forcing)
BACKEND_ENV = "HOPE_BACKEND"


def _yes(call: Any) -> tuple[bool, str]:
    return True, ""


def _never(call: Any) -> str | None:
    return None


def on_cpu(device: torch.device) -> bool:
    return device.type == "cpu"


def on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def on_any(device: torch.device) -> bool:
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on the CPU only under ``TRITON_INTERPRET=1`` (the tests)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


@dataclass(frozen=True)
class Backend:
    """One implementation of one op.

    ``kernel`` is what the op's custom op calls for this backend, with the signature the op's interface module
    documents (the reference's is the naive function itself). ``supports(call) -> (ok, reason)`` says whether it can
    run ``call`` (the op's call record: device, dtype, sizes, flags); ``auto_skips(call)`` names why auto leaves a
    call it supports to a later backend (None: it does not). ``env``: that variable set to ``0`` switches it off.
    """

    op: str
    name: str
    priority: int
    kernel: Callable = field(repr=False)
    runs_on: Callable[[torch.device], bool] = field(default=on_any, repr=False)
    supports: Callable[[Any], tuple[bool, str]] = field(default=_yes, repr=False)
    auto_skips: Callable[[Any], str | None] = field(default=_never, repr=False)
    env: str | None = None

    def __post_init__(self):
        if self.name not in NAMES:
            raise ValueError(f"backend name must be one of {NAMES}, got {self.name!r}")

    @property
    def backend(self) -> str:
        """The backend's name (the field callers of :func:`resolve_backend` read)."""
        return self.name

    def switched_off(self) -> bool:
        return self.env is not None and os.environ.get(self.env, "1").strip() == "0"


_RECORDS: dict[str, dict[str, Backend]] = {}
#: (op, module) -> why that backend module did not import (triton absent, extension not built)
MISSING: dict[tuple[str, str], str] = {}


def _interpreted(rec: Backend, device: torch.device) -> bool:
    """Triton on the CPU is its interpreter, which exists for the tests: auto never picks it."""
    return rec.name == "triton" and device.type == "cpu"


def register(record: Backend) -> Backend:
    """Adds ``record`` to its op's backends (a second record of the same name replaces the first)."""
    _RECORDS.setdefault(record.op, {})[record.name] = record
    return record


def register_modules(op: str, package: str, modules: tuple[str, ...]) -> None:
    """Imports each backend module ``package.<module>`` and registers its ``BACKEND`` record; a module that cannot
    import (its toolchain or extension is missing) is remembered in :data:`MISSING` instead."""
    for module in modules:
        try:
            register(importlib.import_module(f"{package}.{module}").BACKEND)
        except ImportError as err:
            MISSING[op, module] = f"{type(err).__name__}: {err}"


def get(op: str, name: str) -> Backend:
    """The registered record of backend ``name`` of ``op`` (the op's custom op looks its kernel up here)."""
    return _RECORDS[op][name]


def records(op: str) -> list[Backend]:
    """The op's registered backends, highest priority first."""
    if op not in _RECORDS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_RECORDS)}")
    return sorted(_RECORDS[op].values(), key=lambda r: -r.priority)


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run ``op`` on ``device`` (registered, switched on), highest priority first."""
    device = torch.device(device)
    return [r.name for r in records(op) if r.runs_on(device) and not r.switched_off()]


def forced_backend() -> str | None:
    """The backend ``$HOPE_BACKEND`` names (None when unset or ``auto``)."""
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower()
    return None if name in ("", "auto") else name


def _named(op: str, name: str, device: torch.device, source: str) -> Backend:
    """The record of backend ``name`` for ``op`` on ``device``, or a clear error."""
    if name not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {name!r}{source}")
    rec = {r.name: r for r in records(op)}.get(name)
    if rec is None:
        why = MISSING.get((op, name))
        raise RuntimeError(f"backend {name!r} of {op!r} is not available here (registered: "
                           f"{[r.name for r in records(op)]}{'; ' + why if why else ''}); install triton / build "
                           f"the extension, or use backend='auto'")
    if rec.switched_off():
        raise RuntimeError(f"backend {name!r} of {op!r} is switched off by ${rec.env}=0")
    if not rec.runs_on(device):
        raise RuntimeError(f"backend {name!r} of {op!r} cannot run on device {device}; available there: "
                           f"{available_backends(op, device)}")
    return rec


def resolve_backend(op: str, device: torch.device | str, backend: str = "auto", call: Any = None) -> Backend:
    """The backend record that runs ``op`` on ``device`` (and, when given, the op's ``call`` record).

    ``backend`` is ``"auto"`` or one of :data:`NAMES`. A named backend that does not support ``call`` raises
    ``ValueError`` with its reason; ``$HOPE_BACKEND`` forcing such a backend gives way to auto instead.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    device = torch.device(device)
    records(op)  # unknown op: clear error first
    forced = forced_backend() if backend == "auto" else backend
    if forced is not None:
        rec = _named(op, forced, device, f" (from ${BACKEND_ENV})" if backend == "auto" else "")
        ok, why = rec.supports(call) if call is not None else (True, "")
        if ok:
            return rec
        if backend != "auto":
            raise ValueError(f"backend={backend!r} of {op} {why}; use backend='auto' (picks a backend that runs "
                             f"it) or backend='reference'")
    for rec in records(op):
        if rec.switched_off() or not rec.runs_on(device) or _interpreted(rec, device):
            continue
        if call is not None and (not rec.supports(call)[0] or rec.auto_skips(call) is not None):
            continue
        return rec
    raise RuntimeError(f"no backend of {op!r} runs on device {device}")  # unreachable: the reference runs anywhere


__all__ = ["Backend", "NAMES", "BACKEND_ENV", "register", "records", "available_backends", "resolve_backend",
           "forced_backend", "get", "register_modules", "MISSING", "on_cpu", "on_cuda", "on_any", "triton_runs_on"]
