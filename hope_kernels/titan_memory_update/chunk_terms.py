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
    """

    aqk: torch.Tensor
    akk: torch.Tensor | None
    tinv: torch.Tensor | None
    aqw: torch.Tensor | None
    vec: torch.Tensor
    end: torch.Tensor
    khat: torch.Tensor | None


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


def linear_chunk_terms(q, k, lr, momentum, decay, chunk_size: int, dgd: bool) -> LinearChunkTerms:
    """All state-independent terms for every chunk (fp32, differentiable w.r.t. q, k and the gates)."""
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
    aqk = G * th_row * (qc @ kc.transpose(-1, -2))

    # index of each chunk's last valid token
    chunks = torch.arange(NC, device=q.device)
    last = torch.full((NC,), C - 1, device=q.device, dtype=torch.long)
    last[-1] = T - (NC - 1) * C - 1
    pick_row = lambda m: m[..., chunks, last, :]  # noqa: E731  [B,H,NC,C]
    pick = lambda v: v[..., chunks, last]  # noqa: E731  [B,H,NC]
    wg = pick_row(G * th_row)
    wp = pick_row(P * th_row)
    end = torch.stack([pick(Bc), pick(c), pick(A)], dim=-1)

    if not dgd:
        zeros = torch.zeros_like(Bc)
        vec = torch.stack([Bc, c, zeros, zeros, wg, wp, zeros], dim=-2)
        return LinearChunkTerms(aqk, None, None, None, vec, end, None)

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
    return LinearChunkTerms(aqk, akk, tinv, aqw, vec, end, kh.reshape(B, H, Tp, Dk))


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


__all__ = ["LinearChunkTerms", "linear_state_pass", "linear_chunk_terms", "pad_tokens", "VEC_ROWS", "END_COLS"]
