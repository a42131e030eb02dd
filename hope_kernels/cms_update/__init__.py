"""``cms_update``: one Continuum Memory System level update from a filled buffer of C tokens."""
from __future__ import annotations

import torch

from hope_kernels import dispatch
from hope_kernels._checks import check_float, check_shape, check_tensor
from hope_kernels.cms_update.reference import (
    CMSParams,
    CMSStats,
    cms_forward,
    cms_update_reference,
    rmsnorm,
)

OP = "cms_update"

dispatch.register(OP, "reference", cms_update_reference)
try:
    from hope_kernels.cms_update import triton as _triton_impl  # noqa: F401
except ImportError:
    pass
try:
    from hope_kernels.cms_update import cuda as _cuda_impl  # noqa: F401
except ImportError:
    pass


def _as_params(name: str, p) -> CMSParams:
    if isinstance(p, CMSParams):
        return p
    if isinstance(p, (tuple, list)) and len(p) == 2:
        return CMSParams(*p)
    raise TypeError(f"{name} must be a CMSParams(w1, w2) (or a pair of tensors), got {type(p).__name__}")


def cms_update(
    params,
    momenta,
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
        lr, beta: step size >= 0 and momentum in [0, 1].
        precond: nl_l2_precond (NL eq. 27-29): W1 <- W1 (I - lr xbar xbar^T) - lr m.
        inplace: write the new weights and momenta into ``params`` / ``momenta``.
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
    impl = dispatch.resolve_backend(OP, dev, backend)
    return impl.fn(params, momenta, x, delta, lr, beta, precond, inplace)


__all__ = ["cms_update", "CMSParams", "CMSStats", "cms_forward", "rmsnorm"]
