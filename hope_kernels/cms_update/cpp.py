"""The C++ CPU cms_update kernel (csrc/cms_update_cpu.cpp) as the "cpp" backend: auto prefers it to the reference on
the CPU (measured faster, docs/performance.md)."""
from __future__ import annotations

from hope_kernels import _ext
from hope_kernels.backends import Backend, on_cpu

if _ext.cpu is None:
    raise ImportError(_ext.why_unavailable("_C_cpu"))

BACKEND = Backend("cms_update", "cpp", priority=10, kernel=_ext.cpu.cms_update, runs_on=on_cpu, env="HOPE_USE_CPP")
