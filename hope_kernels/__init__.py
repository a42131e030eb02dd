"""Fused kernels for HOPE / Titans memories, with readable PyTorch references.

Public ops (each in its own folder, one shape for all: docs/kernels/README.md):

- :func:`titan_memory_update`  chunk-parallel Titans / DGD memory update and read-out
- :func:`teach_signal`         cross-entropy and its gradient w.r.t. the hidden states, without logits
- :func:`cms_update`           one Continuum Memory System level update over a filled buffer
- :func:`self_modifying_titans` the self-modifying Titans layer's generator recurrence and M_mem pass as one op

Each op has backends ``cuda``, ``triton``, ``cpp`` and ``reference`` (where implemented), one record each
(:mod:`hope_kernels.backends`). ``backend="auto"`` walks them by priority and takes the first that runs the call
(measured preferences: docs/performance.md); ``backend=<name>`` or ``HOPE_BACKEND=<name>`` forces one.
"""
from hope_kernels.backends import available_backends, resolve_backend
from hope_kernels.titan_memory_update import (
    LinearMemoryState,
    MLPMemoryState,
    titan_memory_update,
)
from hope_kernels.teach_signal import teach_signal
from hope_kernels.cms_update import CMSParams, CMSStats, cms_update
from hope_kernels.self_modifying_titans import SelfModifyingTitansOutput, self_modifying_titans

__all__ = [
    "titan_memory_update",
    "LinearMemoryState",
    "MLPMemoryState",
    "teach_signal",
    "cms_update",
    "CMSParams",
    "CMSStats",
    "self_modifying_titans",
    "SelfModifyingTitansOutput",
    "available_backends",
    "resolve_backend",
]
__version__ = "0.1.0"
