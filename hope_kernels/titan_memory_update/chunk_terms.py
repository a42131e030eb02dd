"""State-independent per-chunk terms of the linear memory (docs/kernels/titan_memory.md, "kernel split").

Everything here depends only on q, k and the gates, never on the memory state, so it is computed for all
chunks at once with batched PyTorch ops (and differentiated by autograd). The sequential kernel that
carries the state (``triton.py``) then needs only a few [C, C] and [C, Dk] matmuls per chunk.

Shapes: inputs [B, H, T, ...] are padded to NC * C tokens and viewed as [B, H, NC, C, ...]. Padded
tokens get lr = 0 and momentum = keep = 1, so they leave every valid row unchanged; the end-of-chunk
terms are read at each chunk's last *valid* row.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hope_kernels.titan_memory_update.reference import chunk_decay_terms, unit_keys

#: Rows of ``LinearChunkTerms.vec`` (kept in this order by the kernels).
VEC_ROWS = ("Bc", "c", "Bp", "cp", "wg", "wp", "wb")
#: Columns of ``LinearChunkTerms.end``.
END_COLS = ("B_L", "c_L", "A_L")


class LinearChunkTerms(NamedTuple):
    """Per-chunk matrices of the dual form; [B, H, NC, C, C] matrices, fp32.

    aqk:  G[t, i] theta_i (q_t . k_i)                   -- titans read-out of the chunk's errors
    akk:  G[t-1, i] theta_i (k^_t . k_i)                -- dgd: titans part of W_{t-1} k^_t
    tinv: (I + M)^-1, M[t, j] = Br[t-1, j] theta_j (k^_t . k^_j)  -- dgd: UT transform
    aqw:  Br[t, j] theta_j (q_t . k^_j)                 -- dgd: read-out of the pseudo-values w
    vec:  [B, H, NC, 7, C] rows VEC_ROWS: B_t, c_t, B_{t-1}, c_{t-1}, and the end-of-chunk row weights
          G[L, :] theta, P[L, :] theta, Br[L, :] theta
    end:  [B, H, NC, 3]: B_L, c_L, A_L at the last valid token L of the chunk
    khat: [B, H, NC * C, Dk] unit keys (dgd) or None
    gth:  G[t, i] theta_i                                -- mlp: the decay of the W1 read-out, whose scores
          (gelu(hq_t) . a_i) depend on the state (None for the linear memory)
    """

    aqk: torch.Tensor
    akk: torch.Tensor | None
    tinv: torch.Tensor | None
    aqw: torch.Tensor | None
    vec: torch.Tensor
    end: torch.Tensor
    khat: torch.Tensor | None
    gth: torch.Tensor | None = None


def pad_tokens(x: torch.Tensor, total: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 2 (tokens) of [B, H, T, ...] (gates: [B, H, T]) to ``total`` with ``value``."""
    extra = total - x.shape[2]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 3) + [0, extra]
    return F.pad(x, pad, value=value)


def _shift_rows(x: torch.Tensor, first: float) -> torch.Tensor:
    """y[..., t, :] = x[..., t - 1, :], y[..., 0, :] = first (for [..., C, X])."""
    return torch.cat([torch.full_like(x[..., :1, :], first), x[..., :-1, :]], dim=-2)


def _shift(x: torch.Tensor, first: float) -> torch.Tensor:
    """y[..., t] = x[..., t - 1], y[..., 0] = first."""
    return torch.cat([torch.full_like(x[..., :1], first), x[..., :-1]], dim=-1)


def linear_chunk_terms(q, k, lr, momentum, decay, chunk_size: int, dgd: bool, mlp: bool = False) -> LinearChunkTerms:
    """All state-independent terms for every chunk (fp32, differentiable w.r.t. q, k and the gates); ``mlp`` adds
    ``gth`` (the mlp memory's state passes need it)."""
    B, H, T, Dk = q.shape
    C = chunk_size
    NC = -(-T // C)
    Tp = NC * C
    f32 = torch.float64 if q.dtype == torch.float64 else torch.float32
    theta = pad_tokens(lr.to(f32), Tp, 0.0).view(B, H, NC, C)
    a = pad_tokens(momentum.to(f32), Tp, 1.0).view(B, H, NC, C)
    b = pad_tokens(1.0 - decay.to(f32), Tp, 1.0).view(B, H, NC, C)
    qc = pad_tokens(q.to(f32), Tp).view(B, H, NC, C, Dk)
    kc = pad_tokens(k.to(f32), Tp).view(B, H, NC, C, Dk)

    # momentum carry P, weight carry G = Br P, decay carry Br (docs/kernels/titan_memory.md)
    P, G, A, Bc, c, Br = chunk_decay_terms(a, b)
    th_row = theta[..., None, :]
    gth = G * th_row
    aqk = gth * (qc @ kc.transpose(-1, -2))

    # index of each chunk's last valid token
    chunks = torch.arange(NC, device=q.device)
    last = torch.full((NC,), C - 1, device=q.device, dtype=torch.long)
    last[-1] = T - (NC - 1) * C - 1
    pick_row = lambda m: m[..., chunks, last, :]  # noqa: E731  [B,H,NC,C]
    pick = lambda v: v[..., chunks, last]  # noqa: E731  [B,H,NC]
    wg = pick_row(gth)
    wp = pick_row(P * th_row)
    end = torch.stack([pick(Bc), pick(c), pick(A)], dim=-1)

    if not dgd:
        zeros = torch.zeros_like(Bc)
        vec = torch.stack([Bc, c, zeros, zeros, wg, wp, zeros], dim=-2)
        return LinearChunkTerms(aqk, None, None, None, vec, end, None, gth if mlp else None)

    kh = unit_keys(kc)
    Brp = _shift_rows(Br, 0.0)  # Br[t-1, j]: strictly lower
    Gp = _shift_rows(G, 0.0)
    Bp = _shift(Bc, 1.0)
    cp = _shift(c, 0.0)
    M = Brp * th_row * (kh @ kh.transpose(-1, -2))
    eye = torch.eye(C, dtype=f32, device=q.device)
    tinv = torch.linalg.solve_triangular(eye + M, eye.expand_as(M), upper=False, unitriangular=True)
    akk = Gp * th_row * (kh @ kc.transpose(-1, -2))
    aqw = Br * th_row * (qc @ kh.transpose(-1, -2))
    wb = pick_row(Br * th_row)
    vec = torch.stack([Bc, c, Bp, cp, wg, wp, wb], dim=-2)
    return LinearChunkTerms(aqk, akk, tinv, aqw, vec, end, kh.reshape(B, H, Tp, Dk), gth if mlp else None)


def linear_state_pass(q, k, v, terms: LinearChunkTerms, W0, S0, chunk_size: int):
    """What the sequential kernel computes, in plain PyTorch (the kernel's readable spec; tests use it).

    Per chunk, with the chunk-start state (W, S):
      E = K W^T - V;  O = diag(Bc) Q W^T + diag(c) Q S^T - Aqk E
      dgd: R = diag(Bp) K^ W^T + diag(cp) K^ S^T - Akk E;  w = Tinv R;  O -= Aqw w
      W' = B_L W + c_L S - E^T diag(wg) K [- w^T diag(wb) K^];   S' = A_L S - E^T diag(wp) K
    """
    B, H, T, Dk = q.shape
    C = chunk_size
    NC = terms.vec.shape[2]
    Tp = NC * C
    f32 = terms.vec.dtype
    qc = pad_tokens(q.to(f32), Tp).view(B, H, NC, C, Dk)
    kc = pad_tokens(k.to(f32), Tp).view(B, H, NC, C, Dk)
    vc = pad_tokens(v.to(f32), Tp).view(B, H, NC, C, -1)
    khc = terms.khat.view(B, H, NC, C, Dk) if terms.khat is not None else None
    W, S = W0.to(f32), S0.to(f32)
    outs = []
    for i in range(NC):
        Bc, c, Bp, cp, wg, wp, wb = terms.vec[:, :, i].unbind(-2)
        B_L, c_L, A_L = (x[..., None, None] for x in terms.end[:, :, i].unbind(-1))
        Q, K, V = qc[:, :, i], kc[:, :, i], vc[:, :, i]
        E = K @ W.transpose(-1, -2) - V
        O = Bc[..., None] * (Q @ W.transpose(-1, -2)) + c[..., None] * (Q @ S.transpose(-1, -2)) - terms.aqk[:, :, i] @ E
        W_new = B_L * W + c_L * S - E.transpose(-1, -2) @ (wg[..., None] * K)
        if khc is not None:
            Kh = khc[:, :, i]
            R = (Bp[..., None] * (Kh @ W.transpose(-1, -2)) + cp[..., None] * (Kh @ S.transpose(-1, -2))
                 - terms.akk[:, :, i] @ E)
            w = terms.tinv[:, :, i] @ R
            O = O - terms.aqw[:, :, i] @ w
            W_new = W_new - w.transpose(-1, -2) @ (wb[..., None] * Kh)
        S = A_L * S - E.transpose(-1, -2) @ (wp[..., None] * K)
        W = W_new
        outs.append(O)
    return torch.cat(outs, dim=-2)[:, :, :T], W, S


def mlp_state_pass(q, k, v, terms: LinearChunkTerms, W1, W2, S1, S2, chunk_size: int):
    """What the mlp memory's state-pass kernels compute, in plain PyTorch (their readable spec; tests use it).

    M(x) = x + W1 gelu(W2 x); W1, S1 [B, H, D, E], W2, S2 [B, H, E, D]; ``terms`` from
    ``linear_chunk_terms(..., mlp=True)``. Per chunk, with the chunk-start state (docs/kernels/titan_memory.md):
      Hk = K W2^T;  A = gelu(Hk);  Err = K + A W1^T - V;  U = Err W1;  G = U * gelu'(Hk)   (u2_i = g_i k_i^T)
      Hq = diag(Bc) Q W2^T + diag(c) Q S2^T - Aqk G
      dgd: R = diag(Bp) K^ W2^T + diag(cp) K^ S2^T - Akk G;  w = Tinv R;  Hq -= Aqw w
      Aq = gelu(Hq);  O = Q + diag(Bc) Aq W1^T + diag(c) Aq S1^T - (gth * Aq A^T) Err
      W1' = B_L W1 + c_L S1 - Err^T diag(wg) A;   S1' = A_L S1 - Err^T diag(wp) A
      W2' = B_L W2 + c_L S2 - G^T diag(wg) K [- w^T diag(wb) K^];   S2' = A_L S2 - G^T diag(wp) K
    Everything but the [C, C] score Aq A^T is separable over the hidden units E, which is how the kernels tile E.
    """
    from hope_kernels.titan_memory_update.reference import gelu, gelu_grad

    B, H, T, D = q.shape
    C = chunk_size
    NC = terms.vec.shape[2]
    Tp = NC * C
    f32 = terms.vec.dtype
    qc, kc, vc = (pad_tokens(x.to(f32), Tp).view(B, H, NC, C, D) for x in (q, k, v))
    khc = terms.khat.view(B, H, NC, C, D) if terms.khat is not None else None
    W1, W2, S1, S2 = (x.to(f32) for x in (W1, W2, S1, S2))
    tr = lambda x: x.transpose(-1, -2)  # noqa: E731
    outs = []
    for i in range(NC):
        Bc, c, Bp, cp, wg, wp, wb = (x[..., None] for x in terms.vec[:, :, i].unbind(-2))
        B_L, c_L, A_L = (x[..., None, None] for x in terms.end[:, :, i].unbind(-1))
        Q, K, V = qc[:, :, i], kc[:, :, i], vc[:, :, i]
        Hk = K @ tr(W2)
        A = gelu(Hk)
        Err = K + A @ tr(W1) - V
        G = (Err @ W1) * gelu_grad(Hk)
        Hq = Bc * (Q @ tr(W2)) + c * (Q @ tr(S2)) - terms.aqk[:, :, i] @ G
        W2_new = B_L * W2 + c_L * S2 - tr(G) @ (wg * K)
        if khc is not None:
            Kh = khc[:, :, i]
            R = Bp * (Kh @ tr(W2)) + cp * (Kh @ tr(S2)) - terms.akk[:, :, i] @ G
            w = terms.tinv[:, :, i] @ R
            Hq = Hq - terms.aqw[:, :, i] @ w
            W2_new = W2_new - tr(w) @ (wb * Kh)
        Aq = gelu(Hq)
        O = Q + Bc * (Aq @ tr(W1)) + c * (Aq @ tr(S1)) - (terms.gth[:, :, i] * (Aq @ tr(A))) @ Err
        W1, S1 = B_L * W1 + c_L * S1 - tr(Err) @ (wg * A), A_L * S1 - tr(Err) @ (wp * A)
        W2, S2 = W2_new, A_L * S2 - tr(G) @ (wp * K)
        outs.append(O)
    return torch.cat(outs, dim=-2)[:, :, :T], W1, W2, S1, S2


__all__ = ["LinearChunkTerms", "linear_state_pass", "mlp_state_pass", "linear_chunk_terms", "pad_tokens", "VEC_ROWS", "END_COLS"]
