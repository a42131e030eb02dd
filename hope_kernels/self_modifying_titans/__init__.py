"""``self_modifying_titans``: the self-modifying Titans layer's generator recurrence and M_mem pass as one op."""
from hope_kernels.self_modifying_titans.chunk import LayerSettings, LayerTensors, SelfModifyingTitansCall
from hope_kernels.self_modifying_titans.interface import (
    SelfModifyingTitansOutput,
    kernel_backend,
    self_modifying_titans,
)
from hope_kernels.self_modifying_titans.naive import GENERATORS, self_modifying_titans_naive

__all__ = ["self_modifying_titans", "self_modifying_titans_naive", "kernel_backend", "SelfModifyingTitansCall",
           "SelfModifyingTitansOutput", "LayerTensors", "LayerSettings", "GENERATORS"]
