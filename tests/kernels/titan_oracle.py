"""Test oracles of ``titan_memory_update``.

:func:`titan_memory_update_oracle`: float64 per-token loops over (b, h, t) with explicit weight matrices, written
from the per-token definition (docs/kernels/titan_memory.md, first section), not from the dual form, so it checks
the chunk-parallel naive function independently. Slow.

:func:`linear_state_pass` / :func:`mlp_state_pass`: what the state-pass kernels compute from the chunk terms, in
plain PyTorch: the spec of the raw kernels (and, in float64 under autograd, of their backward).

Titans (arXiv 2501.00663) eq. 12-14; Nested Learning (arXiv 2512.24695) eq. 56-57 for ``dgd``.
"""
from __future__ import annotations

import math

import torch

from hope_kernels.titan_memory_update.chunk import END_NAMES, ROW_NAMES, ChunkTerms, pad_tokens
from hope_kernels.titan_memory_update.naive import LinearMemoryState, MLPMemoryState, gelu, gelu_grad


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_prime(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _dgd_precondition(W, k, theta, keep):
    """W ((1 - alpha) I - theta k^ k^T), with k^ = k / max(||k||, 1e-6), as an explicit matrix product."""
    k_hat = k / torch.clamp(torch.linalg.vector_norm(k), min=1e-6)
    D = keep * torch.eye(k.shape[0], dtype=k.dtype) - theta * torch.outer(k_hat, k_hat)
    return W @ D


def titan_memory_update_oracle(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state):
    """Same signature and returns as the reference; everything in float64 on the CPU."""
    f64 = torch.float64
    q, k, v, lr, momentum, decay = (x.to("cpu", f64) for x in (q, k, v, lr, momentum, decay))
    state = [x.to("cpu", f64) for x in state]
    B, H, T, _ = q.shape
    out_rows = [[None] * H for _ in range(B)]
    final = [[None] * H for _ in range(B)]
    for b in range(B):
        for h in range(H):
            Ws = [x[b, h] for x in state]  # linear: [W, S]; mlp: [W1, W2, S1, S2]
            chunk_start = list(Ws)
            outs = []
            for t in range(T):
                if t % chunk_size == 0:
                    chunk_start = list(Ws)  # W_c: every gradient of this chunk is taken here
                kt, vt, qt = k[b, h, t], v[b, h, t], q[b, h, t]
                theta, eta, keep = lr[b, h, t], momentum[b, h, t], 1.0 - decay[b, h, t]
                if memory == "linear":
                    Wc = chunk_start[0]
                    u = torch.outer(Wc @ kt - vt, kt)  # grad of 0.5 ||W k - v||^2 at W_c
                    W, S = Ws
                    S = eta * S - theta * u
                    W = (_dgd_precondition(W, kt, theta, keep) if rule == "dgd" else keep * W) + S
                    Ws = [W, S]
                    outs.append(W @ qt)
                else:
                    W1c, W2c = chunk_start[0], chunk_start[1]
                    pre = W2c @ kt
                    act = _gelu(pre)
                    err = kt + W1c @ act - vt
                    u1 = torch.outer(err, act)
                    u2 = torch.outer((W1c.T @ err) * _gelu_prime(pre), kt)
                    W1, W2, S1, S2 = Ws
                    S1 = eta * S1 - theta * u1
                    S2 = eta * S2 - theta * u2
                    W1 = keep * W1 + S1
                    W2 = (_dgd_precondition(W2, kt, theta, keep) if rule == "dgd" else keep * W2) + S2
                    Ws = [W1, W2, S1, S2]
                    outs.append(qt + W1 @ _gelu(W2 @ qt))
            out_rows[b][h] = torch.stack(outs)
            final[b][h] = Ws
    out = torch.stack([torch.stack(row) for row in out_rows])
    n = len(state)
    tensors = [torch.stack([torch.stack([final[b][h][i] for h in range(H)]) for b in range(B)]) for i in range(n)]
    cls = LinearMemoryState if memory == "linear" else MLPMemoryState
    return out, cls(*tensors)


def _row(terms: ChunkTerms, name: str, i: int) -> torch.Tensor:
    """Per-token weight ``name`` of chunk i, [B, H, C] (zeros where the rule does not use it)."""
    t = getattr(terms, name)
    return torch.zeros_like(terms.Bc[:, :, i]) if t is None else t[:, :, i]


def linear_state_pass(q, k, v, terms: ChunkTerms, W0, S0, chunk_size: int):
    """What the linear state-pass kernels compute, in plain PyTorch (their readable spec; float64 under autograd it
    is the oracle of their backward).

    Per chunk, with the chunk-start state (W, S):
      E = K W^T - V;  O = diag(Bc) Q W^T + diag(c) Q S^T - Aqk E
      dgd: R = diag(Bp) K^ W^T + diag(cp) K^ S^T - Akk E;  w = Tinv R;  O -= Aqw w
      W' = B_L W + c_L S - E^T diag(wg) K [- w^T diag(wb) K^];   S' = A_L S - E^T diag(wp) K
    """
    B, H, T, Dk = q.shape
    C = chunk_size
    NC = terms.aqk.shape[2]
    Tp = NC * C
    f32 = terms.aqk.dtype
    qc = pad_tokens(q.to(f32), Tp).view(B, H, NC, C, Dk)
    kc = pad_tokens(k.to(f32), Tp).view(B, H, NC, C, Dk)
    vc = pad_tokens(v.to(f32), Tp).view(B, H, NC, C, -1)
    khc = terms.khat.view(B, H, NC, C, Dk) if terms.khat is not None else None
    W, S = W0.to(f32), S0.to(f32)
    outs = []
    for i in range(NC):
        Bc, c, Bp, cp, wg, wp, wb = (_row(terms, n, i) for n in ROW_NAMES)
        B_L, c_L, A_L = (getattr(terms, n)[:, :, i, None, None] for n in END_NAMES)
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


def mlp_state_pass(q, k, v, terms: ChunkTerms, W1, W2, S1, S2, chunk_size: int):
    """What the mlp memory's state-pass kernels compute, in plain PyTorch (their readable spec; tests use it).

    M(x) = x + W1 gelu(W2 x); W1, S1 [B, H, D, E], W2, S2 [B, H, E, D]; ``terms`` from
    ``chunk_terms(..., mlp=True)``. Per chunk, with the chunk-start state (docs/kernels/titan_memory.md):
      Hk = K W2^T;  A = gelu(Hk);  Err = K + A W1^T - V;  U = Err W1;  G = U * gelu'(Hk)   (u2_i = g_i k_i^T)
      Hq = diag(Bc) Q W2^T + diag(c) Q S2^T - Aqk G
      dgd: R = diag(Bp) K^ W2^T + diag(cp) K^ S2^T - Akk G;  w = Tinv R;  Hq -= Aqw w
      Aq = gelu(Hq);  O = Q + diag(Bc) Aq W1^T + diag(c) Aq S1^T - (gth * Aq A^T) Err
      W1' = B_L W1 + c_L S1 - Err^T diag(wg) A;   S1' = A_L S1 - Err^T diag(wp) A
      W2' = B_L W2 + c_L S2 - G^T diag(wg) K [- w^T diag(wb) K^];   S2' = A_L S2 - G^T diag(wp) K
    Everything but the [C, C] score Aq A^T is separable over the hidden units E, which is how the kernels tile E.
    """
    B, H, T, D = q.shape
    C = chunk_size
    NC = terms.aqk.shape[2]
    Tp = NC * C
    f32 = terms.aqk.dtype
    qc, kc, vc = (pad_tokens(x.to(f32), Tp).view(B, H, NC, C, D) for x in (q, k, v))
    khc = terms.khat.view(B, H, NC, C, D) if terms.khat is not None else None
    W1, W2, S1, S2 = (x.to(f32) for x in (W1, W2, S1, S2))
    tr = lambda x: x.transpose(-1, -2)  # noqa: E731
    outs = []
    for i in range(NC):
        Bc, c, Bp, cp, wg, wp, wb = (_row(terms, n, i)[..., None] for n in ROW_NAMES)
        B_L, c_L, A_L = (getattr(terms, n)[:, :, i, None, None] for n in END_NAMES)
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


