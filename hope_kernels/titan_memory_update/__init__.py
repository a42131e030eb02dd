"""``titan_memory_update``: chunk-parallel Titans / DGD memory update and read-out (docs/kernels/titan_memory.md)."""
from hope_kernels.titan_memory_update.chunk import (MEMORIES, OP, RULES, ChunkTerms, TitanCall, chunk_terms,
                                                    titan_memory_update)
from hope_kernels.titan_memory_update.naive import LinearMemoryState, MLPMemoryState, titan_memory_update_naive

__all__ = ["titan_memory_update", "LinearMemoryState", "MLPMemoryState", "titan_memory_update_naive", "ChunkTerms",
           "chunk_terms", "TitanCall", "MEMORIES", "RULES", "OP"]
