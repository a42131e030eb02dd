"""Registers the csrc/ cms_update kernels: "cuda" (CUDA extension) and "cpp" (C++ CPU extension)."""
from __future__ import annotations

import torch

from hope_kernels import _ext, dispatch
from hope_kernels.cms_update.reference import CMSParams, finish_update

OP = "cms_update"


def _wrap(ext_fn):
    """Adapts an extension's cms_update(w1, w2, m1, m2, x, delta, lr, beta, precond) to the reference signature."""

    @torch.no_grad()
    def cms_update_ext(params, momenta, x, delta, lr, beta, precond, inplace=False):
        w1, w2 = params.w1.contiguous(), params.w2.contiguous()
        w1_new, w2_new, m1_new, m2_new = ext_fn(
            w1, w2, momenta.w1.contiguous(), momenta.w2.contiguous(),
            x.float().contiguous(), delta.float().contiguous(), float(lr), float(beta), bool(precond),
        )
        return finish_update(params, momenta, CMSParams(w1_new, w2_new), CMSParams(m1_new, m2_new), inplace)

    return cms_update_ext


if _ext.cuda is not None:
    dispatch.register(OP, "cuda", _wrap(_ext.cuda.cms_update), lambda device: device.type == "cuda")
if _ext.cpu is not None:
    # registered for the CPU: measured faster than the reference on this machine (docs/kernels/csrc.md)
    dispatch.register(OP, "cpp", _wrap(_ext.cpu.cms_update), lambda device: device.type == "cpu")
