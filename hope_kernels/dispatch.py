"""One dispatcher for every op: picks cuda > triton > cpp > reference by device and availability.

An op may reorder that preference with :func:`prefer` when a measurement says a later backend is faster on the
same device (or an earlier one has not run on that device yet); the reason is kept in :data:`PREFERENCE_NOTES`.

Each op folder registers its implementations at import time with :func:`register`. A backend is
*available* for a call when it was registered (its module imported: triton installed, extension
built) and its ``supports(device)`` predicate accepts the tensors' device. ``backend="auto"``
takes the first available one in :data:`BACKEND_ORDER`; a named backend, or the environment
variable ``HOPE_BACKEND``, forces one and raises if it is not available.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

#: Preference order for ``backend="auto"``: fastest first; the reference always works.
BACKEND_ORDER: tuple[str, ...] = ("cuda", "triton", "cpp", "reference")
#: Environment variable that forces one backend for every op (``auto`` or unset: no forcing).
BACKEND_ENV = "HOPE_BACKEND"


@dataclass(frozen=True)
class Implementation:
    backend: str
    fn: Callable
    supports: Callable[[torch.device], bool]


_REGISTRY: dict[str, dict[str, Implementation]] = {}
#: op -> its own preference order (a permutation of BACKEND_ORDER), set by :func:`prefer`
_ORDER: dict[str, tuple[str, ...]] = {}
#: op -> why its order differs from BACKEND_ORDER (measurement, device, date)
PREFERENCE_NOTES: dict[str, str] = {}


def prefer(op: str, order: tuple[str, ...], reason: str) -> None:
    """Give ``op`` its own ``backend="auto"`` preference ``order`` (every backend of BACKEND_ORDER, once)."""
    if sorted(order) != sorted(BACKEND_ORDER):
        raise ValueError(f"order must be a permutation of {BACKEND_ORDER}, got {order!r}")
    _ORDER[op] = tuple(order)
    PREFERENCE_NOTES[op] = reason


def backend_order(op: str) -> tuple[str, ...]:
    """The preference order ``backend="auto"`` walks for ``op``."""
    return _ORDER.get(op, BACKEND_ORDER)


def _any_device(device: torch.device) -> bool:
    return True


def register(op: str, backend: str, fn: Callable, supports: Callable[[torch.device], bool] | None = None) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op``.

    ``supports(device) -> bool`` says whether it can run on tensors of that device.
    """
    if backend not in BACKEND_ORDER:
        raise ValueError(f"backend must be one of {BACKEND_ORDER}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = Implementation(backend, fn, supports or _any_device)


def triton_supports(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on the CPU only under ``TRITON_INTERPRET=1`` (tests)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def registered_backends(op: str) -> list[str]:
    """Backends registered for ``op`` (imported successfully), in preference order."""
    impls = _REGISTRY.get(op, {})
    return [b for b in backend_order(op) if b in impls]


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run ``op`` on ``device``, in preference order."""
    device = torch.device(device)
    impls = _REGISTRY.get(op, {})
    return [b for b in backend_order(op) if b in impls and impls[b].supports(device)]


def forced_backend() -> str | None:
    """The backend ``$HOPE_BACKEND`` forces (None when unset or ``auto``)."""
    name = os.environ.get(BACKEND_ENV, "auto").strip().lower()
    return None if name in ("", "auto") else name


def auto_candidates(op: str, device: torch.device | str) -> list[str]:
    """What ``backend="auto"`` may pick for ``op`` on ``device``, best first: the available backends, without the
    Triton interpreter on the CPU (it is for tests)."""
    device = torch.device(device)
    return [b for b in available_backends(op, device) if not (b == "triton" and device.type == "cpu")]


def resolve_backend(op: str, device: torch.device | str, backend: str = "auto") -> Implementation:
    """Return the implementation of ``op`` to run on ``device``.

    ``backend`` is ``"auto"`` or one of :data:`BACKEND_ORDER`; when it is ``"auto"`` the environment
    variable ``HOPE_BACKEND`` (if set to a backend name) takes its place.
    """
    device = torch.device(device)
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_REGISTRY)}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    requested = backend
    if requested == "auto":
        requested = forced_backend() or "auto"
    if requested == "auto":
        for name in auto_candidates(op, device):
            return _REGISTRY[op][name]
        raise RuntimeError(f"no backend of {op!r} supports device {device}")  # unreachable: reference
    if requested not in BACKEND_ORDER:
        raise ValueError(
            f"backend must be 'auto' or one of {BACKEND_ORDER}, got {requested!r}"
            + (f" (from ${BACKEND_ENV})" if backend == "auto" else "")
        )
    impl = _REGISTRY[op].get(requested)
    if impl is None:
        raise RuntimeError(
            f"backend {requested!r} of {op!r} is not available here (registered: "
            f"{registered_backends(op)}); install triton / build the extension, or use backend='auto'"
        )
    if not impl.supports(device):
        raise RuntimeError(
            f"backend {requested!r} of {op!r} cannot run on device {device}; "
            f"available there: {available_backends(op, device)}"
        )
    return impl
