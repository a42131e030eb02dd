"""Naive CMS level update (NL eq. 70-71; nl_l2_precond: NL eq. 27-29): the readable ground truth and the "reference"
backend."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hope_kernels.backends import Backend

RMS_EPS = 1e-6


class CMSParams(NamedTuple):
    """Per-sample weights of one CMS level f(x) = x + W2 gelu(W1 rmsnorm(x))."""

    w1: torch.Tensor  # [B, E, D]
    w2: torch.Tensor  # [B, D, E]


class CMSStats(NamedTuple):
    """What one update did (telemetry for logs)."""

    update_count: int  # updates applied by this call (one per filled buffer)
    w1_update_norm: torch.Tensor  # [B] ||W1_new - W1_old||_F per sample
    w2_update_norm: torch.Tensor  # [B]


def rmsnorm(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim (the level's gain lives outside the fast weights)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def gelu_grad(h: torch.Tensor) -> torch.Tensor:
    """d gelu(h) / dh for the exact (erf) GELU."""
    cdf = 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    return cdf + h * pdf


def cms_forward(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f(x) = x + W2 gelu(W1 rmsnorm(x)) with per-sample weights; x [B, T, D] -> [B, T, D]."""
    n = rmsnorm(x.float())
    h = torch.einsum("bed,btd->bte", w1.float(), n)
    return (x.float() + torch.einsum("bde,bte->btd", w2.float(), F.gelu(h))).to(x.dtype)


@torch.no_grad()
def cms_update_naive(
    params: CMSParams,
    momenta: CMSParams,
    x: torch.Tensor,
    delta: torch.Tensor,
    lr: float,
    beta: float,
    precond: bool,
    inplace: bool = False,
) -> tuple[CMSParams, CMSParams, CMSStats]:
    """``cms_update``'s contract with its arguments checked: g = sum_t J_W f(x_t)^T delta_t, m = beta m + g,
    W <- W - lr m (nl_l2_precond: W1 <- W1 (I - lr xbar xbar^T) - lr m)."""
    w1, w2 = params.w1.float(), params.w2.float()
    n = rmsnorm(x.float())  # [B, C, D]
    d = delta.float()
    h = torch.einsum("bed,bcd->bce", w1, n)  # [B, C, E]
    a = F.gelu(h)
    # g = sum_t J_W f(x_t)^T delta_t: one reduction over the C buffered tokens per weight
    g2 = torch.einsum("bcd,bce->bde", d, a)  # dW2 [B, D, E]
    dh = torch.einsum("bde,bcd->bce", w2, d) * gelu_grad(h)
    g1 = torch.einsum("bce,bcd->bed", dh, n)  # dW1 [B, E, D]
    m1 = beta * momenta.w1.float() + g1
    m2 = beta * momenta.w2.float() + g2
    if precond:
        # nl_l2_precond (NL eq. 27-29): W1 <- W1 (I - lr xbar xbar^T) - lr m
        xbar = n.mean(dim=1)  # [B, D]
        w1_new = w1 - lr * torch.einsum("bed,bd->be", w1, xbar)[:, :, None] * xbar[:, None, :] - lr * m1
    else:
        w1_new = w1 - lr * m1
    w2_new = w2 - lr * m2
    return finish_update(params, momenta, CMSParams(w1_new, w2_new), CMSParams(m1, m2), inplace)


def finish_update(
    params: CMSParams, momenta: CMSParams, new_params: CMSParams, new_momenta: CMSParams, inplace: bool
) -> tuple[CMSParams, CMSParams, CMSStats]:
    """Shared by every backend: update-norm telemetry, then write back in place or return fresh tensors."""
    stats = CMSStats(
        update_count=1,
        w1_update_norm=(new_params.w1.float() - params.w1.float()).flatten(1).norm(dim=1),
        w2_update_norm=(new_params.w2.float() - params.w2.float()).flatten(1).norm(dim=1),
    )
    if inplace:
        params.w1.copy_(new_params.w1)
        params.w2.copy_(new_params.w2)
        momenta.w1.copy_(new_momenta.w1)
        momenta.w2.copy_(new_momenta.w2)
        return params, momenta, stats
    fresh_params = CMSParams(new_params.w1.to(params.w1.dtype), new_params.w2.to(params.w2.dtype))
    fresh_momenta = CMSParams(new_momenta.w1.to(momenta.w1.dtype), new_momenta.w2.to(momenta.w2.dtype))
    return fresh_params, fresh_momenta, stats


BACKEND = Backend("cms_update", "reference", priority=0, kernel=cms_update_naive)
