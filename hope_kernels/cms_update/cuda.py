"""The CUDA cms_update kernel (csrc/cms_update.cu) as the "cuda" backend."""
from __future__ import annotations

from hope_kernels import _ext
from hope_kernels.backends import Backend, on_cuda

if _ext.cuda is None:
    raise ImportError(_ext.why_unavailable("_C_cuda"))

BACKEND = Backend("cms_update", "cuda", priority=30, kernel=_ext.cuda.cms_update, runs_on=on_cuda, env="HOPE_USE_CUDA")
