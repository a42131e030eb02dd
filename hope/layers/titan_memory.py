"""Titans neural long-term memory layer (Titans sec. 3.1-3.2) over ``hope_kernels.titan_memory_update``.

x -> q, k, v projections -> causal depthwise conv -> SiLU -> per head; q, k L2-normalised (Titans sec. 4.4), v too
with ``normalize_v`` (our addition, docs/equations.md).
Data-dependent gates per token and head: lr theta_t, momentum eta_t, decay (forget) alpha_t, each
sigmoid(W x + b) (Titans eq. 13-14). The memory (linear or 2-layer residual MLP per head) starts
from learnable weights expanded over the batch, so the outer loss meta-learns its initial state.
Output: RMSNorm(M_t(q_t)) * SiLU(W_g x), then W_out.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hope.layers.conv import CausalDepthwiseConv
from hope.layers.norms import RMSNorm, check_input, l2_normalize
from hope_kernels.titan_memory_update import LinearMemoryState, MLPMemoryState


def init_memory_params(module: nn.Module, prefix: str, n: int, head_dim: int, hidden: int, memory: str):
    """Register the learnable initial weights of ``n`` per-head memories (leading dim n)."""
    if memory == "mlp":
        # M(x) = x + W1 gelu(W2 x): W2 [E, D] reads x, W1 [D, E] writes back; W1 small so M ~ identity
        w1 = torch.randn(n, head_dim, hidden) * 0.02
        w2 = torch.randn(n, hidden, head_dim) / math.sqrt(head_dim)
        module.register_parameter(f"{prefix}_w1", nn.Parameter(w1))
        module.register_parameter(f"{prefix}_w2", nn.Parameter(w2))
    else:
        module.register_parameter(f"{prefix}_w", nn.Parameter(torch.randn(n, head_dim, head_dim) * 0.02))


def initial_memory_state(module: nn.Module, prefix: str, memory: str, batch_size: int):
    """State [B, n, ...] from the learnable initial weights (graph kept), zero momenta."""
    if memory == "mlp":
        w1 = getattr(module, f"{prefix}_w1").float()
        w2 = getattr(module, f"{prefix}_w2").float()
        W1 = w1.unsqueeze(0).expand(batch_size, *w1.shape)
        W2 = w2.unsqueeze(0).expand(batch_size, *w2.shape)
        return MLPMemoryState(W1, W2, torch.zeros_like(W1), torch.zeros_like(W2))
    w = getattr(module, f"{prefix}_w").float()
    W = w.unsqueeze(0).expand(batch_size, *w.shape)
    return LinearMemoryState(W, torch.zeros_like(W))


def memory_update_scale(old, new, max_ratio: float) -> torch.Tensor:
    """Per (sample, head) factor in (0, 1] that bounds one in-context update: ||W_new - W_old|| <= max_ratio *
    ||W_old|| over the weights (W / W1, W2). [B, H, 1, 1]; 1 for updates inside the bound."""
    half = len(new) // 2  # NamedTuple layout: weights first, then their momenta
    d2 = sum((n.float() - o.float()).pow(2).sum(dim=(-2, -1)) for n, o in zip(new[:half], old[:half]))
    w2 = sum(o.float().pow(2).sum(dim=(-2, -1)) for o in old[:half])
    limit = max_ratio * w2.clamp_min(1e-12).sqrt()
    return (limit / d2.clamp_min(1e-24).sqrt()).clamp(max=1.0)[..., None, None]


def apply_update_scale(old, new, scale: torch.Tensor):
    """old + scale * (new - old) for every weight and momentum (differentiable: a rescaling, not a clamp)."""
    return type(new)(*(o + scale * (n - o) for n, o in zip(new, old)))


def clip_memory_update(old, new, max_ratio: float):
    """Bound one in-context update per (sample, head): ||W_new - W_old|| <= max_ratio * ||W_old|| over the
    weights (W / W1, W2), the momenta's change scaled by the same factor. Differentiable (a rescaling, not a
    clamp of values); a no-op for updates inside the bound. Not in the papers: a named option of the layers
    (``gen_update_clip`` / ``mem_update_clip``), off by default (docs/equations.md)."""
    return apply_update_scale(old, new, memory_update_scale(old, new, max_ratio))


def bounded_memory_pass(q, k, v, lr, momentum, decay, *, chunk_size: int, memory: str, rule: str, state,
                        backend: str, update_clip: float):
    """``titan_memory_update`` over a segment with each chunk's update bounded by ``update_clip`` (the rule of
    :func:`clip_memory_update`; 0: no bound). With a bound, one call per chunk (the same result as one call while
    the bound is not reached). Returns ``(y, state, clipped)``: ``clipped`` is the fraction of (chunk, sample,
    head) updates the bound rescaled (0 without one)."""
    from hope_kernels import titan_memory_update

    T = q.shape[2]
    step = chunk_size if update_clip > 0 else T
    ys, clipped, chunks = [], q.new_zeros((), dtype=torch.float32), 0
    for c0 in range(0, T, step):
        sl = slice(c0, min(T, c0 + step))
        y_c, new = titan_memory_update(q[:, :, sl], k[:, :, sl], v[:, :, sl], lr[..., sl], momentum[..., sl],
                                       decay[..., sl], chunk_size=chunk_size, memory=memory, rule=rule, state=state,
                                       backend=backend)
        if update_clip > 0:
            scale = memory_update_scale(state, new, update_clip)
            new = apply_update_scale(state, new, scale)
            clipped, chunks = clipped + (scale.detach() < 1).float().mean(), chunks + 1
        state = new
        ys.append(y_c)
    return torch.cat(ys, 2), state, clipped / max(1, chunks)


def memory_delta_norm(new, old) -> torch.Tensor:
    """||W_end - W_start|| over the weights, per sample (telemetry: memory update magnitude; a detached
    0-d tensor, turned into a float once per forward to avoid one device sync per layer)."""
    with torch.no_grad():
        n = new[0].new_zeros((), dtype=torch.float32)
        for a, b in zip(new, old):
            if a.shape == b.shape and a.dim() == 4 and a is not b:
                n = n + (a.float() - b.float()).pow(2).sum()
        return (n / max(1, new[0].shape[0])).sqrt()


class TitanMemory(nn.Module):
    """Titans memory as a sequence mixer (the LMM layer); ``forward(x, state) -> (y, state, metrics)``."""

    def __init__(self, dim: int, n_heads: int, *, memory: str = "mlp", expansion: int = 2, chunk_size: int = 64,
                 rule: str = "titans", conv_window: int = 4, normalize_v: bool = False, update_clip: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.memory, self.chunk_size, self.rule, self.backend = memory, chunk_size, rule, backend
        self.normalize_v, self.update_clip = normalize_v, update_clip
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = CausalDepthwiseConv(3 * dim, conv_window)
        self.gates = nn.Linear(dim, 3 * n_heads, bias=True)
        init_memory_params(self, "mem", n_heads, self.head_dim, expansion * self.head_dim, memory)
        self.out_norm = RMSNorm(self.head_dim)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self._gate_bias = (-4.0, 1.0, -6.0)  # lr ~0.018, momentum ~0.73, decay ~0.0025 at init

    def reset_gate_bias(self):
        with torch.no_grad():
            H = self.n_heads
            for i, b in enumerate(self._gate_bias):
                self.gates.bias[i * H:(i + 1) * H] = b

    def forward(self, x: torch.Tensor, state: dict | None = None):
        check_input("x", x, self.dim)
        B, T, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        state = state or {}
        qkv, conv_cache = self.conv(self.qkv(x), state.get("conv"))
        qkv = F.silu(qkv).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # [3, B, H, T, Dh]
        q, k = l2_normalize(qkv[0]), l2_normalize(qkv[1])
        v = l2_normalize(qkv[2]) if self.normalize_v else qkv[2]
        gates = torch.sigmoid(self.gates(x).float()).view(B, T, 3, H).permute(2, 0, 3, 1)  # [3, B, H, T]
        mem0 = state.get("mem")
        if mem0 is None:
            mem0 = initial_memory_state(self, "mem", self.memory, B)
        y, mem, clipped = bounded_memory_pass(q, k, v, gates[0], gates[1], gates[2], chunk_size=self.chunk_size,
                                              memory=self.memory, rule=self.rule, state=mem0, backend=self.backend,
                                              update_clip=self.update_clip)
        y = self.out_norm(y).transpose(1, 2).reshape(B, T, D).to(x.dtype)
        y = self.out(y * F.silu(self.gate(x)))
        metrics = {"memory_update_norm": memory_delta_norm(mem, mem0), "memory_lr_mean": gates[0].detach().mean(),
                   "memory_clip_fraction": clipped}
        return y, {"conv": conv_cache, "mem": mem}, metrics
