"""Placeholder: the chunk-parallel reference is being written (see docs/kernels/titan_memory.md)."""
from __future__ import annotations


def titan_memory_update_reference(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state):
    raise NotImplementedError("titan_memory_update reference not written yet")
