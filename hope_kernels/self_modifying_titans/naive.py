"""Readable ground truth of ``self_modifying_titans``: the self-modifying Titans layer's memory recurrences (NL sec. 8,
eq. 83-97), written from the per-token equations with plain loops over chunks and tokens (docs/kernels/
self_modifying_titans.md). Autograd gives its gradients. Slow (a Python loop per token); tests and the ``reference``
backend only.

Per (batch, head), with head dim D and hidden width E, every memory is M(x) = x + W1 gelu(W2 x) with momentum:

1. Generator pass, chunks of ``gen_chunk_size`` tokens. With the generators' chunk-start weights (order
   ``GENERATORS`` = k, v, eta, alpha[, q]; stacked [B, G * H, ...] as g * H + h; G = 5 with an adaptive q, else 4):
   k_t = l2n(M_k(xk_t)), v_t = M_v(xv_t) (l2n(M_v(xv_t)) with ``normalize_v``), q_t = l2n(M_q(xq_t)) (G = 5) or
   l2n(xq_t) (G = 4), eta_t = sigmoid(<r_eta, M_eta(xk_t)> + b_eta),
   alpha_t = sigmoid(<r_alpha, M_alpha(xk_t)> + b_alpha)                                                  (eq. 83-87)
   and every generator takes one chunk step with keys k, its self-generated targets v^_t = M_box(v_t) read at the
   chunk start (eq. 88-90), lr eta, decay alpha and the head's generator momentum; that step's change is then
   bounded to ``gen_update_clip`` x the weights' norm (0: unbounded).
2. Memory pass, chunks of ``mem_chunk_size``: M_mem takes the same chunk steps with keys k, values v, lr eta, decay
   alpha and its own momentum, bounded per chunk by ``mem_update_clip``, and reads y_t = M_mem(q_t) with the state
   after token t (``readout_before=False``) or before it (``readout_before=True``: the state after token t - 1 of
   the chunk, the chunk-start state for its first token) (eq. 91-94).

One chunk step (Titans eq. 12-14, gradients at the chunk-start weights W_c, Titans sec. 3.2): for each token t of
the chunk, h_t = W2_c k_t, a_t = gelu(h_t), e_t = k_t + W1_c a_t - v_t, u1_t = e_t a_t^T,
u2_t = ((W1_c^T e_t) * gelu'(h_t)) k_t^T, and per token
S_t = m S_{t-1} - eta_t u_t,  W_t = (1 - alpha_t) W_{t-1} + S_t                                (rule ``titans``)
W2_t = W2_{t-1} ((1 - alpha_t) I - eta_t k^_t k^_t^T) + S2_t,  k^ = k / max(||k||, 1e-6)
                                                                  (rule ``dgd``, NL eq. 56-57; W1 as titans).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hope_kernels.backends import Backend
from hope_kernels.titan_memory_update.naive import MLPMemoryState

GENERATORS = ("k", "v", "eta", "alpha", "q")
#: which input each generator reads (xq, xk, xv index)
GENERATOR_INPUT = {"k": "xk", "v": "xv", "eta": "xk", "alpha": "xk", "q": "xq"}
NORM_EPS = 1e-6


def l2n(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def read(W1: torch.Tensor, W2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """M(x) = x + W1 gelu(W2 x); W1 [..., D, E], W2 [..., E, D], x [..., L, D]."""
    return x + F.gelu(x @ W2.transpose(-1, -2)) @ W1.transpose(-1, -2)


def gelu_grad(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x * 0.7071067811865476)) + x * torch.exp(-0.5 * x * x) * 0.3989422804014327


def _outer(col, row):
    return col[..., :, None] * row[..., None, :]


def chunk_step(st: MLPMemoryState, k, v, lr, momentum, keep, dgd: bool, q=None, readout_before: bool = False):
    """One chunk of a memory, per token; st [..., D, E] / [..., E, D], k, v, q [..., L, D], lr, keep [..., L],
    momentum [...] (one per memory). Returns (reads of q with the state after (before) each token or None, end
    state)."""
    W1, W2, S1, S2 = st
    h = k @ W2.transpose(-1, -2)
    a = F.gelu(h)
    e = k + a @ W1.transpose(-1, -2) - v
    g = (e @ W1) * gelu_grad(h)
    k_hat = l2n(k)
    m = momentum[..., None, None]
    outs = []
    for t in range(k.shape[-2]):
        if q is not None and readout_before:
            outs.append(read(W1, W2, q[..., t:t + 1, :]))
        th, b = lr[..., t, None, None], keep[..., t, None, None]
        S1 = m * S1 - th * _outer(e[..., t, :], a[..., t, :])
        S2 = m * S2 - th * _outer(g[..., t, :], k[..., t, :])
        W1 = b * W1 + S1
        if dgd:
            W2 = b * W2 - th * _outer((W2 @ k_hat[..., t, :, None])[..., 0], k_hat[..., t, :]) + S2
        else:
            W2 = b * W2 + S2
        if q is not None and not readout_before:
            outs.append(read(W1, W2, q[..., t:t + 1, :]))
    return (torch.cat(outs, -2) if q is not None else None), MLPMemoryState(W1, W2, S1, S2)


def bound_update(old: MLPMemoryState, new: MLPMemoryState, max_ratio: float) -> MLPMemoryState:
    """||W_new - W_old|| <= max_ratio ||W_old|| over (W1, W2) per memory, by rescaling the step (momenta too)."""
    if max_ratio <= 0:
        return new
    d2 = sum((n - o).pow(2).sum(dim=(-2, -1)) for n, o in zip(new[:2], old[:2]))
    w2 = sum(o.pow(2).sum(dim=(-2, -1)) for o in old[:2])
    scale = (max_ratio * w2.clamp_min(1e-12).sqrt() / d2.clamp_min(1e-24).sqrt()).clamp(max=1.0)[..., None, None]
    return MLPMemoryState(*(o + scale * (n - o) for n, o in zip(new, old)))


def generate(gen: MLPMemoryState, xq, xk, xv, gate_readout, gate_bias, normalize_v: bool):
    """k, v, q [B, H, L, D], eta, alpha [B, H, L] from the generators' weights ``gen`` [B, G, H, ...]."""
    x = {"xq": xq, "xk": xk, "xv": xv}
    G = gen.W1.shape[1]
    out = [read(gen.W1[:, i], gen.W2[:, i], x[GENERATOR_INPUT[name]]) for i, name in enumerate(GENERATORS[:G])]
    gates = [torch.sigmoid((out[2 + j] * gate_readout[j][None, :, None, :]).sum(-1) + gate_bias[j][None, :, None])
             for j in range(2)]
    v = l2n(out[1]) if normalize_v else out[1]
    q = l2n(out[4]) if G == 5 else l2n(xq)
    return l2n(out[0]), v, q, gates[0], gates[1]


def self_modifying_titans_naive(xq, xk, xv, gen: MLPMemoryState, mem: MLPMemoryState, gate_readout, gate_bias,
                                momentum, *, gen_chunk_size: int, mem_chunk_size: int, gen_update_clip: float,
                                mem_update_clip: float, rule: str, normalize_v: bool = True,
                                readout_before: bool = False):
    """Same contract as ``self_modifying_titans`` (arguments checked): returns
    ``(y [B, H, T, D], gen_T, mem_T, eta [B, H, T])``; computes in xq's dtype (fp32 or float64). G = 5 generators
    (gen [B, 5 H, ...]) make q adaptive, G = 4 read q = l2n(xq)."""
    B, H, T, D = xq.shape
    G = gen.W1.shape[1] // H
    dgd = rule == "dgd"
    gen = MLPMemoryState(*(s.reshape(B, G, H, *s.shape[-2:]) for s in gen))
    m_gen = momentum[0][None, None, :].expand(B, G, H)
    ks, vs, qs, etas, alphas = [], [], [], [], []
    for c0 in range(0, T, gen_chunk_size):
        sl = slice(c0, min(T, c0 + gen_chunk_size))
        k, v, q, eta, alpha = generate(gen, xq[:, :, sl], xk[:, :, sl], xv[:, :, sl], gate_readout, gate_bias,
                                       normalize_v)
        targets = read(gen.W1, gen.W2, v[:, None])  # v^_box = M_box(v), at the chunk start
        rep = lambda t: t[:, None].expand(B, G, *t.shape[1:])  # noqa: E731  shared by the generators
        _, new = chunk_step(gen, rep(k), targets, rep(eta), m_gen, rep(1.0 - alpha), dgd)
        gen = bound_update(gen, new, gen_update_clip)
        ks.append(k), vs.append(v), qs.append(q), etas.append(eta), alphas.append(alpha)
    k, v, q, eta, alpha = (torch.cat(x, 2) for x in (ks, vs, qs, etas, alphas))
    m_mem = momentum[1][None, :].expand(B, H)
    ys = []
    for c0 in range(0, T, mem_chunk_size):
        sl = slice(c0, min(T, c0 + mem_chunk_size))
        y, new = chunk_step(mem, k[:, :, sl], v[:, :, sl], eta[:, :, sl], m_mem, 1.0 - alpha[:, :, sl], dgd,
                            q=q[:, :, sl], readout_before=readout_before)
        mem = bound_update(mem, new, mem_update_clip)
        ys.append(y)
    gen = MLPMemoryState(*(s.reshape(B, G * H, *s.shape[-2:]) for s in gen))
    return torch.cat(ys, 2), gen, mem, eta


BACKEND = Backend("self_modifying_titans", "reference", priority=0, kernel=self_modifying_titans_naive)

__all__ = ["self_modifying_titans_naive", "GENERATORS", "chunk_step", "bound_update", "generate", "read"]
