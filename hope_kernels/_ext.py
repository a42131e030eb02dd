"""Loads the compiled csrc/ extensions; records why one is missing instead of raising."""
from __future__ import annotations

import importlib

import torch

#: module name -> reason it did not load (absent when it loaded)
LOAD_ERRORS: dict[str, str] = {}


def _load(name: str):
    try:
        return importlib.import_module(f"hope_kernels.{name}")
    except (ImportError, OSError) as err:  # not built (pip skipped it) or built against another torch
        LOAD_ERRORS[name] = f"{type(err).__name__}: {err}"
        return None


#: C++ CPU kernels (csrc/*_cpu.cpp) or None
cpu = _load("_C_cpu")
#: CUDA kernels (csrc/*.cu) or None; only tried when this torch has CUDA
cuda = _load("_C_cuda") if torch.version.cuda is not None else None
if torch.version.cuda is None:
    LOAD_ERRORS["_C_cuda"] = "torch was built without CUDA"


def why_unavailable(name: str) -> str | None:
    """Why extension ``name`` ("_C_cpu" / "_C_cuda") did not load, or None if it did."""
    return LOAD_ERRORS.get(name)
