"""``cms_update``: the public function and the ``hope::cms_update`` custom op every kernel backend runs through.

Backends: ``cuda`` (csrc/cms_update.cu), ``triton``, ``cpp`` (csrc/cms_update_cpu.cpp), ``reference`` (naive.py).
A kernel backend's ``kernel(w1, w2, m1, m2, x, delta, lr, beta, precond) -> (w1_new, w2_new, m1_new, m2_new)`` takes
contiguous fp32 tensors; the op is not differentiable (an inner-loop update), so it has a fake and no autograd.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hope_kernels import backends
from hope_kernels._checks import check_float, check_shape, check_tensor
from hope_kernels.cms_update.naive import CMSParams, CMSStats, cms_update_naive, finish_update

OP = "cms_update"
backends.register_modules(OP, "hope_kernels.cms_update", ("naive", "triton", "cuda", "cpp"))


@dataclass(frozen=True)
class CMSCall:
    """What a backend is asked to run: sizes of x [B, C, D] and the level's hidden width E."""

    device: torch.device
    B: int
    C: int
    D: int
    E: int
    precond: bool


@torch.library.custom_op("hope::cms_update", mutates_args=())
def cms_update_op(w1: torch.Tensor, w2: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, x: torch.Tensor,
                  delta: torch.Tensor, lr: float, beta: float, precond: bool,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1_new, w2_new, m1_new, m2_new) by ``backend``'s kernel."""
    xs = (t.float().contiguous() for t in (w1, w2, m1, m2, x, delta))
    return tuple(backends.get(OP, backend).kernel(*xs, float(lr), float(beta), bool(precond)))


@cms_update_op.register_fake
def _(w1, w2, m1, m2, x, delta, lr, beta, precond, backend):
    return tuple(torch.empty_like(t, dtype=torch.float32) for t in (w1, w2, m1, m2))


def _as_params(name: str, p) -> CMSParams:
    if isinstance(p, CMSParams):
        return p
    if isinstance(p, (tuple, list)) and len(p) == 2:
        return CMSParams(*p)
    raise TypeError(f"{name} must be a CMSParams(w1, w2) (or a pair of tensors), got {type(p).__name__}")


def cms_update(
    params: CMSParams | tuple[torch.Tensor, torch.Tensor],
    momenta: CMSParams | tuple[torch.Tensor, torch.Tensor],
    x: torch.Tensor,
    delta: torch.Tensor,
    *,
    lr: float,
    beta: float,
    precond: bool = False,
    inplace: bool = False,
    backend: str = "auto",
) -> tuple[CMSParams, CMSParams, CMSStats]:
    """One momentum-SGD step of a CMS level f(x) = x + W2 gelu(W1 rmsnorm(x)) on its buffer.

    Args:
        params: ``CMSParams(w1 [B, E, D], w2 [B, D, E])`` per-sample fast weights (fp32).
        momenta: ``CMSParams`` of the same shapes (fp32).
        x: [B, C, D] the C buffered inputs of the level.
        delta: [B, C, D] the error (teach signal) at the level's output for those tokens.
        lr, beta: finite step size >= 0 and momentum in [0, 1].
        precond: nl_l2_precond (NL eq. 27-29): W1 <- W1 (I - lr xbar xbar^T) - lr m.
        inplace: write the new weights and momenta into ``params`` / ``momenta``.
        backend: ``"auto"`` or one of ``cuda``, ``triton``, ``cpp``, ``reference``.
    Returns:
        ``(params, momenta, stats)`` with g = sum_t J_W f(x_t)^T delta_t, m = beta m + g,
        W <- W - lr m. Not differentiable (an inner-loop update; runs under no_grad).
    """
    params = _as_params("params", params)
    momenta = _as_params("momenta", momenta)
    check_tensor("x", x, ndim=3)
    dev = x.device
    check_tensor("delta", delta, ndim=3, device=dev)
    check_shape("delta", delta, x.shape, "like x: [B, C, D]")
    B, C, D = x.shape
    check_tensor("params.w1", params.w1, ndim=3, device=dev, dtypes=(torch.float32,))
    E = params.w1.shape[1]
    check_shape("params.w1", params.w1, (B, E, D), "[B, E, D]")
    check_tensor("params.w2", params.w2, ndim=3, device=dev, dtypes=(torch.float32,))
    check_shape("params.w2", params.w2, (B, D, E), "[B, D, E]")
    check_tensor("momenta.w1", momenta.w1, ndim=3, device=dev, dtypes=(torch.float32,))
    check_shape("momenta.w1", momenta.w1, (B, E, D), "like params.w1")
    check_tensor("momenta.w2", momenta.w2, ndim=3, device=dev, dtypes=(torch.float32,))
    check_shape("momenta.w2", momenta.w2, (B, D, E), "like params.w2")
    lr = check_float("lr", lr, low=0.0)
    beta = check_float("beta", beta, low=0.0, high=1.0)
    if not isinstance(precond, bool):
        raise TypeError(f"precond must be a bool, got {type(precond).__name__}")
    rec = backends.resolve_backend(OP, dev, backend, CMSCall(dev, B, C, D, E, precond))
    if rec.name == "reference":
        return cms_update_naive(params, momenta, x, delta, lr, beta, precond, inplace)
    with torch.no_grad():
        w1, w2, m1, m2 = cms_update_op(*params, *momenta, x, delta, lr, beta, precond, rec.name)
        return finish_update(params, momenta, CMSParams(w1, w2), CMSParams(m1, m2), inplace)
