"""Backend records of ``self_modifying_titans``: one per implementation, each with ``supports(call) -> (ok, reason)``.

A record's ``kernel`` has ``fwd(inputs, settings) -> outputs`` and ``bwd(grads, inputs, saved, settings) ->
input gradients`` (chunk.py's tensor lists). ``backend="auto"`` walks the records from the highest priority down
and takes the first that is switched on, runs on the device, supports the call and does not leave it to a later
backend (``auto_skips``); it never picks the Triton interpreter. Each record is also registered with the package
dispatcher (``hope_kernels.dispatch``), so ``available_backends`` and ``$HOPE_BACKEND`` see it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hope_kernels import dispatch

OP = "self_modifying_titans"


def _yes(call: Any) -> tuple[bool, str]:
    return True, ""


def _never(call: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of the op: ``kernel`` (fwd / bwd, or None for the reference, which is the naive function
    under autograd), ``runs_on(device)``, ``supports(call) -> (ok, reason)``, ``auto_skips(call) -> reason | None``
    (a measured preference for a later backend), ``env`` (that variable set to ``0`` switches it off)."""

    name: str
    priority: int
    kernel: Any = field(default=None, repr=False)
    runs_on: Callable[[torch.device], bool] = field(default=dispatch._any_device, repr=False)
    supports: Callable[[Any], tuple[bool, str]] = field(default=_yes, repr=False)
    auto_skips: Callable[[Any], str | None] = field(default=_never, repr=False)
    env: str | None = None

    def switched_off(self) -> bool:
        return self.env is not None and os.environ.get(self.env, "1").strip() == "0"


_RECORDS: dict[str, Backend] = {}


def register(record: Backend) -> Backend:
    _RECORDS[record.name] = record
    dispatch.register(OP, record.name, record.kernel, supports=record.runs_on)
    return record


def get(name: str) -> Backend:
    return _RECORDS[name]


def records() -> list[Backend]:
    """Registered records, highest priority first."""
    return sorted(_RECORDS.values(), key=lambda r: -r.priority)


def resolve(call, backend: str = "auto") -> tuple[Backend, str]:
    """The record that runs ``call`` and, for auto, why each faster one did not (a readable trail).

    A named backend (argument or ``$HOPE_BACKEND``) that cannot run the call raises ``ValueError`` with its reason
    when named by argument; from the environment it gives way to auto."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    forced = dispatch.forced_backend() if backend == "auto" else backend
    if forced is not None:
        if forced not in dispatch.BACKEND_ORDER:
            raise ValueError(f"backend must be 'auto' or one of {dispatch.BACKEND_ORDER}, got {forced!r}")
        rec = _RECORDS.get(forced)
        ok, why = (False, f"has no {forced!r} backend (registered: {sorted(_RECORDS)})") if rec is None else \
            (False, f"is switched off by ${rec.env}=0") if rec.switched_off() else \
            (False, f"cannot run on device {call.device}") if not rec.runs_on(call.device) else rec.supports(call)
        if ok:
            return rec, ""
        if backend != "auto":
            raise ValueError(f"backend={backend!r} of {OP} {why}; use backend='auto' or backend='reference'")
    trail = []
    for rec in records():
        if rec.switched_off() or not rec.runs_on(call.device):
            continue
        if rec.name == "triton" and call.device.type == "cpu":
            continue  # the interpreter is for the tests
        ok, why = rec.supports(call)
        skip = rec.auto_skips(call) if ok else None
        if ok and skip is None:
            return rec, "; ".join(trail)
        trail.append(f"{rec.name}: {why or skip}")
    raise RuntimeError(f"no backend of {OP} runs on {call.device}")  # unreachable: the reference runs anywhere


__all__ = ["Backend", "OP", "register", "get", "records", "resolve"]
