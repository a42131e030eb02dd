"""The naive ``titan_memory_update``: chunk-parallel PyTorch, the readable ground truth and the "reference" backend
(see docs/kernels/titan_memory.md).

Titans (arXiv 2501.00663) eq. 12-14 with chunk-start gradients (sec. 3.2); DGD rule of Nested
Learning (arXiv 2512.24695) eq. 56-57.

- rule ``titans``: the dual form; per chunk a handful of [L, L] / [L, D] matmuls, no per-token
  weight matrices. The L x L decay matrix G and the vector c come from masked cumulative products
  (never from dividing cumulative products), so gates at exactly 0 are fine.
- rule ``dgd``: a per-token recursion inside each chunk on running weight states (all gradients are
  still taken at the chunk-start state W_c); the compact UT/Lambda form is left to the kernels.

Loops over chunks (dgd: also over the tokens of a chunk) run in Python, vectorised over batch and
head. Computes in fp32 (float64 when q is float64); plain autograd gives gradients.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hope_kernels.backends import Backend


class LinearMemoryState(NamedTuple):
    """Linear memory M(x) = W x."""

    W: torch.Tensor  # [B, H, Dv, Dk]
    S: torch.Tensor  # [B, H, Dv, Dk] momentum ("surprise")


class MLPMemoryState(NamedTuple):
    """Residual 2-layer memory M(x) = x + W1 gelu(W2 x)."""

    W1: torch.Tensor  # [B, H, D, E]
    W2: torch.Tensor  # [B, H, E, D]
    S1: torch.Tensor  # [B, H, D, E]
    S2: torch.Tensor  # [B, H, E, D]


def zero_linear_state(B: int, H: int, Dv: int, Dk: int, device) -> LinearMemoryState:
    W = torch.zeros(B, H, Dv, Dk, dtype=torch.float32, device=device)
    return LinearMemoryState(W, torch.zeros_like(W))


_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
KEY_NORM_EPS = 1e-6


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU."""
    return F.gelu(x)


def gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx gelu(x) = Phi(x) + x phi(x), written out so autograd can differentiate through it."""
    return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0)))) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def memory_apply(state, x: torch.Tensor, memory: str) -> torch.Tensor:
    """Read the memory: M(x) for x [B, H, T, Dk] at a fixed state (weights [B, H, ...])."""
    if memory == "linear":
        return x @ state.W.transpose(-1, -2)
    if memory == "mlp":
        return x + gelu(x @ state.W2.transpose(-1, -2)) @ state.W1.transpose(-1, -2)
    raise ValueError(f"memory must be one of ('linear', 'mlp'), got {memory!r}")


def unit_keys(k: torch.Tensor) -> torch.Tensor:
    """k^ = k / max(||k||, 1e-6) (a zero key gives no preconditioning instead of NaN)."""
    return k / k.norm(dim=-1, keepdim=True).clamp_min(KEY_NORM_EPS)


def segment_products(g: torch.Tensor) -> torch.Tensor:
    """R[..., t, j] = prod_{j < m <= t} g_m for j <= t (1 on the diagonal), 0 above it.

    A masked cumulative product: exact for gates at 0 (no logs, no division), no loop over tokens.
    """
    C = g.shape[-1]
    idx = torch.arange(C, device=g.device)
    after = idx[:, None] > idx[None, :]  # [m, j]: m > j
    factors = torch.where(after, g[..., :, None], torch.ones((), dtype=g.dtype, device=g.device))
    return torch.cumprod(factors, dim=-2).tril()


def chunk_decay_terms(eta: torch.Tensor, keep: torch.Tensor):
    """Per-chunk decay coefficients of the dual form (docs/kernels/titan_memory.md).

    eta, keep (= 1 - alpha): [B, H, L]. Returns
      P [B, H, L, L]: P[t, i] = prod_{i<j<=t} eta_j (i <= t, else 0)   -- momentum carry,
      G [B, H, L, L]: G[t, i] = keep_t G[t-1, i] + P[t, i] = sum_j Br[t, j] P[j, i]  -- weight carry of theta_i u_i,
      A, Bk, c [B, H, L]: A_t = prod eta, Bk_t = prod keep, c_t = keep_t c_{t-1} + A_t = sum_j Br[t, j] A_j,
      Br [B, H, L, L]: Br[t, j] = prod_{j<m<=t} keep_m (the dgd kernels' carry).
    Products, never quotients, so gates at exactly 0 are fine.
    """
    P = segment_products(eta)
    Br = segment_products(keep)
    A = torch.cumprod(eta, -1)
    Bk = torch.cumprod(keep, -1)
    return P, Br @ P, A, Bk, (Br @ A[..., None])[..., 0], Br


def _dual_read(W0, S0, x_q, x_k, err, theta, G, Bk, c):
    """W_t x_q for every t of a chunk, W_t = Bk_t W0 + c_t S0 - sum_{i<=t} G[t,i] theta_i err_i x_k_i^T."""
    scores = (G * theta[..., None, :]) * (x_q @ x_k.transpose(-1, -2))  # [B, H, L, L], lower triangular
    return (Bk[..., None] * (x_q @ W0.transpose(-1, -2)) + c[..., None] * (x_q @ S0.transpose(-1, -2))
            - scores @ err)


def _dual_end(W0, S0, x_k, err, theta, P, G, A, Bk, c):
    """End-of-chunk (W_L, S_L) of the dual form: two matmuls per weight."""
    wG = (G[..., -1, :] * theta)[..., None]  # [B, H, L, 1]
    wP = (P[..., -1, :] * theta)[..., None]
    W_end = Bk[..., -1, None, None] * W0 + c[..., -1, None, None] * S0 - err.transpose(-1, -2) @ (wG * x_k)
    S_end = A[..., -1, None, None] * S0 - err.transpose(-1, -2) @ (wP * x_k)
    return W_end, S_end


def _titans_chunk(memory, st, q, k, v, theta, eta, keep):
    P, G, A, Bk, c, _ = chunk_decay_terms(eta, keep)
    if memory == "linear":
        err = k @ st.W.transpose(-1, -2) - v  # e_i = W_c k_i - v_i
        out = _dual_read(st.W, st.S, q, k, err, theta, G, Bk, c)
        W, S = _dual_end(st.W, st.S, k, err, theta, P, G, A, Bk, c)
        return out, LinearMemoryState(W, S)
    W1, W2, S1, S2 = st
    h = k @ W2.transpose(-1, -2)  # [B, H, L, E]
    a = gelu(h)
    err = k + a @ W1.transpose(-1, -2) - v  # [B, H, L, D]
    g = (err @ W1) * gelu_grad(h)  # dl/dh: u2_i = g_i k_i^T, u1_i = e_i a_i^T
    hq = _dual_read(W2, S2, q, k, g, theta, G, Bk, c)
    aq = gelu(hq)
    out = q + _dual_read(W1, S1, aq, a, err, theta, G, Bk, c)
    W1n, S1n = _dual_end(W1, S1, a, err, theta, P, G, A, Bk, c)
    W2n, S2n = _dual_end(W2, S2, k, g, theta, P, G, A, Bk, c)
    return out, MLPMemoryState(W1n, W2n, S1n, S2n)


def _outer(col, row):
    return col[..., :, None] * row[..., None, :]


def _dgd_chunk(memory, st, q, k, v, theta, eta, keep):
    """Per-token recursion on running weights; gradients all at the chunk-start state st."""
    L = q.shape[-2]
    k_hat = unit_keys(k)
    outs = []
    if memory == "linear":
        err = k @ st.W.transpose(-1, -2) - v
        W, S = st.W, st.S
        for t in range(L):
            th, b = theta[..., t, None, None], keep[..., t, None, None]
            S = eta[..., t, None, None] * S - th * _outer(err[..., t, :], k[..., t, :])
            # W (b I - theta k^ k^T) = b W - theta (W k^) k^T
            W = b * W - th * _outer((W @ k_hat[..., t, :, None])[..., 0], k_hat[..., t, :]) + S
            outs.append((W @ q[..., t, :, None])[..., 0])
        return torch.stack(outs, -2), LinearMemoryState(W, S)
    W1, W2, S1, S2 = st
    h = k @ W2.transpose(-1, -2)
    a = gelu(h)
    err = k + a @ W1.transpose(-1, -2) - v
    g = (err @ W1) * gelu_grad(h)
    for t in range(L):
        th, b, m = theta[..., t, None, None], keep[..., t, None, None], eta[..., t, None, None]
        S1 = m * S1 - th * _outer(err[..., t, :], a[..., t, :])
        S2 = m * S2 - th * _outer(g[..., t, :], k[..., t, :])
        W1 = b * W1 + S1
        W2 = b * W2 - th * _outer((W2 @ k_hat[..., t, :, None])[..., 0], k_hat[..., t, :]) + S2
        q_t = q[..., t, :]
        hq = (W2 @ q_t[..., None])[..., 0]
        outs.append(q_t + (W1 @ gelu(hq)[..., None])[..., 0])
    return torch.stack(outs, -2), MLPMemoryState(W1, W2, S1, S2)


#: the per-chunk step of each rule (a caller may pass compiled versions through ``chunk_fns``)
CHUNK_FNS = {"titans": _titans_chunk, "dgd": _dgd_chunk}


def titan_memory_update_naive(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state, *, chunk_fns=None):
    """Chunk-parallel reference; same contract as ``titan_memory_update`` (arguments already checked).
    ``chunk_fns`` replaces CHUNK_FNS (e.g. the benchmark's torch.compile of each chunk step)."""
    dt = compute_dtype(q)
    q_, k_, v_ = q.to(dt), k.to(dt), v.to(dt)
    theta, eta, keep = lr.to(dt), momentum.to(dt), 1.0 - decay.to(dt)
    st = type(state)(*(x.to(dt) for x in state))
    chunk_fn = (chunk_fns or CHUNK_FNS)[rule]
    T = q.shape[-2]
    outs = []
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        out_c, st = chunk_fn(memory, st, q_[..., s:e, :], k_[..., s:e, :], v_[..., s:e, :],
                             theta[..., s:e], eta[..., s:e], keep[..., s:e])
        outs.append(out_c)
    return torch.cat(outs, -2).to(q.dtype), st


BACKEND = Backend("titan_memory_update", "reference", priority=0, kernel=titan_memory_update_naive)

__all__ = ["titan_memory_update_naive", "LinearMemoryState", "MLPMemoryState", "zero_linear_state", "CHUNK_FNS",
           "memory_apply", "gelu", "gelu_grad", "unit_keys",
           "chunk_decay_terms", "segment_products", "compute_dtype"]
