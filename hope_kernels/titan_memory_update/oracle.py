"""Float64 per-token oracle of ``titan_memory_update``: plain Python loops over (b, h, t) with explicit
weight matrices, written from the per-token definition (docs/kernels/titan_memory.md, first section),
not from the dual form, so it checks the chunk-parallel reference independently. Slow; tests only.

Titans (arXiv 2501.00663) eq. 12-14; Nested Learning (arXiv 2512.24695) eq. 56-57 for ``dgd``.
"""
from __future__ import annotations

import math

import torch

from hope_kernels.titan_memory_update.state import LinearMemoryState, MLPMemoryState


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


__all__ = ["titan_memory_update_oracle"]
