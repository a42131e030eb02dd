"""Self-modifying Titans (NL sec. 8, eq. 83-97): a Titans memory M_mem whose keys, values, queries,
learning rates and decays are produced by memories M_k, M_v, M_q, M_eta, M_alpha that update
themselves in context.

Per head, every memory is a 2-layer residual MLP M(x) = x + W1 gelu(W2 x) whose initial weights are
learnable (expanded over the batch). Inputs: x -> W_in -> causal depthwise conv (window 4) -> SiLU ->
x_q, x_k, x_v per head. For each small chunk (``gen_chunk_size``, default 8), read with the
generator memories' chunk-start states:
  k_t = l2norm(M_k(x_k,t)), v_t = M_v(x_v,t), q_t = l2norm(M_q(x_q,t)),
  eta_t = sigmoid(<w_eta, M_eta(x_k,t)> + b_eta), alpha_t = sigmoid(<w_alpha, M_alpha(x_k,t)> + b_alpha)
and update every generator M_box with key k_t and its self-generated target v^_box,t = M_box(v_t)
(eq. 88-90; read at chunk start), gates eta_t, alpha_t and a learned momentum. The generators share
keys and gates, so they are stacked along the head dim into ONE ``titan_memory_update`` call per
chunk; one chunk's update is bounded to ``gen_update_clip`` (M_mem: ``mem_update_clip``) x the weights'
norm per sample and head (``clip_memory_update``: our addition; outlier chunks otherwise ran away).
M_mem does not feed back into the generators, so it reads the whole segment with chunk
``mem_chunk_size`` (default 64; one call per chunk when its updates are bounded): y_t = M_mem,t(q_t)
(eq. 91-93).
``selfmod=False`` (ablation): the generators keep their initial weights (static MLP projections).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hope.layers.conv import CausalDepthwiseConv
from hope.layers.norms import RMSNorm, check_input, l2_normalize
from hope.layers.titan_memory import clip_memory_update, init_memory_params, initial_memory_state, memory_delta_norm

GENERATORS = ("k", "v", "eta", "alpha", "q")  # stacking order of the generator memories


def mlp_read(W1: torch.Tensor, W2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """M(x) = x + W1 gelu(W2 x) for stacked per-head memories: W1 [..., D, E], W2 [..., E, D], x [..., L, D]."""
    h = torch.einsum("...ed,...ld->...le", W2, x)
    return x + torch.einsum("...de,...le->...ld", W1, F.gelu(h))


class SelfModifyingTitans(nn.Module):
    """``forward(x, state) -> (y, state, metrics)``; state keys ``conv``, ``gen``, ``mem``."""

    def __init__(self, dim: int, n_heads: int, *, expansion: int = 2, mem_chunk_size: int = 64,
                 gen_chunk_size: int = 8, gen_update_clip: float = 0.1,
                 mem_update_clip: float = 0.5, conv_window: int = 4, rule: str = "titans", selfmod: bool = True,
                 adaptive_q: bool = True, backend: str = "auto"):
        super().__init__()
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.mem_chunk_size, self.gen_chunk_size = mem_chunk_size, gen_chunk_size
        self.gen_update_clip, self.mem_update_clip = gen_update_clip, mem_update_clip
        self.rule, self.selfmod, self.adaptive_q, self.backend = rule, selfmod, adaptive_q, backend
        Dh, E = self.head_dim, expansion * self.head_dim
        self.inp = nn.Linear(dim, 3 * dim, bias=False)  # inputs of the q, k, v generators
        self.conv = CausalDepthwiseConv(3 * dim, conv_window)
        init_memory_params(self, "gen", len(GENERATORS) * n_heads, Dh, E, "mlp")
        init_memory_params(self, "mem", n_heads, Dh, E, "mlp")
        # scalar gates per head from the eta / alpha memories' outputs: learned readout + sigmoid
        self.gate_readout = nn.Parameter(torch.randn(2, n_heads, Dh) * 0.02)
        self.gate_bias = nn.Parameter(torch.tensor([[-4.0] * n_heads, [-6.0] * n_heads]))  # eta ~0.018, alpha ~0.0025
        self.momentum_logit = nn.Parameter(torch.full((2, n_heads), 1.0))  # generators, M_mem: ~0.73
        self.out_norm = RMSNorm(Dh)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def _generate(self, W1, W2, xq, xk, xv):
        """Read k, v, q, eta, alpha [B, H, L, *] with generator weights W1/W2 [B, G, H, ...]."""
        xin = torch.stack([xk, xv, xk, xk, xq], dim=1)  # [B, G, H, L, Dh], order = GENERATORS
        out = mlp_read(W1, W2, xin)
        k = l2_normalize(out[:, 0])
        v = l2_normalize(out[:, 1])  # bounded values keep the self-generated targets M(v) from compounding
        gates = torch.sigmoid(torch.einsum("bghld,ghd->bghl", out[:, 2:4], self.gate_readout)
                              + self.gate_bias[None, :, :, None])
        q = l2_normalize(out[:, 4])
        return k, v, q, gates[:, 0], gates[:, 1]

    def forward(self, x: torch.Tensor, state: dict | None = None):
        from hope_kernels import titan_memory_update

        check_input("x", x, self.dim)
        B, T, D = x.shape
        H, Dh, G = self.n_heads, self.head_dim, len(GENERATORS)
        state = state or {}
        xin, conv_cache = self.conv(self.inp(x), state.get("conv"))
        xin = F.silu(xin).float().view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # [3, B, H, T, Dh]
        xq, xk, xv = xin[0], xin[1], xin[2]
        gen0 = state.get("gen")
        if gen0 is None:
            gen0 = initial_memory_state(self, "gen", "mlp", B)  # [B, G*H, ...]
        mom = torch.sigmoid(self.momentum_logit.float())
        backend = self._fused_backend(xq)
        if backend is not None:  # the whole recurrence as one op (hope_kernels.self_modifying_titans)
            return self._fused_forward(x, xq, xk, xv, gen0, mom, state, conv_cache, backend)
        gen = gen0
        if self.selfmod:
            ks, vs, qs, etas, alphas = [], [], [], [], []
            C = self.gen_chunk_size
            q_static = None
            if not self.adaptive_q:
                W1s, W2s = gen0.W1.view(B, G, H, Dh, -1), gen0.W2.view(B, G, H, -1, Dh)
                q_static = l2_normalize(mlp_read(W1s[:, 4], W2s[:, 4], xq))
            for c0 in range(0, T, C):
                sl = slice(c0, min(T, c0 + C))
                L = sl.stop - sl.start
                W1g = gen.W1.reshape(B, G, H, Dh, -1)
                W2g = gen.W2.reshape(B, G, H, -1, Dh)
                k, v, q, eta, alpha = self._generate(W1g, W2g, xq[:, :, sl], xk[:, :, sl], xv[:, :, sl])
                if q_static is not None:
                    q = q_static[:, :, sl]
                # self-generated targets v^_box = M_box(v_t), read at chunk start (NL eq. 88-90)
                v_hat = mlp_read(W1g, W2g, v.unsqueeze(1).expand(B, G, H, L, Dh))
                rep = lambda t: t.unsqueeze(1).expand(B, G, *t.shape[1:]).reshape(B, G * H, *t.shape[2:])  # noqa: E731
                mom_g = mom[0].view(1, H, 1).expand(B, H, L)
                gen_prev = gen
                _, gen = titan_memory_update(rep(k), rep(k), v_hat.reshape(B, G * H, L, Dh), rep(eta), rep(mom_g),
                                             rep(alpha), chunk_size=L, memory="mlp", rule=self.rule, state=gen,
                                             backend=self.backend)
                if self.gen_update_clip > 0:
                    gen = clip_memory_update(gen_prev, gen, self.gen_update_clip)
                ks.append(k), vs.append(v), qs.append(q), etas.append(eta), alphas.append(alpha)
            k, v, q = torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(qs, 2)
            eta, alpha = torch.cat(etas, 2), torch.cat(alphas, 2)
        else:
            k, v, q, eta, alpha = self._generate(gen0.W1.view(B, G, H, Dh, -1), gen0.W2.view(B, G, H, -1, Dh),
                                                 xq, xk, xv)
        mem0 = state.get("mem")
        if mem0 is None:
            mem0 = initial_memory_state(self, "mem", "mlp", B)
        mom_m = mom[1].view(1, H, 1).expand(B, H, T)
        # with a bound, one call per chunk so each chunk's update is clipped (same result when none is);
        # without, one call over the segment
        step = self.mem_chunk_size if self.mem_update_clip > 0 else T
        ys, mem = [], mem0
        for c0 in range(0, T, step):
            sl = slice(c0, min(T, c0 + step))
            y_c, mem_new = titan_memory_update(q[:, :, sl], k[:, :, sl], v[:, :, sl], eta[..., sl], mom_m[..., sl],
                                               alpha[..., sl], chunk_size=self.mem_chunk_size, memory="mlp",
                                               rule=self.rule, state=mem, backend=self.backend)
            mem = clip_memory_update(mem, mem_new, self.mem_update_clip) if self.mem_update_clip > 0 else mem_new
            ys.append(y_c)
        return self._finish(x, torch.cat(ys, 2), conv_cache, gen, gen0, mem, mem0, eta)

    def _finish(self, x, y, conv_cache, gen, gen0, mem, mem0, eta):
        B, T, D = x.shape
        y = self.out_norm(y).transpose(1, 2).reshape(B, T, D).to(x.dtype)
        y = self.out(y * F.silu(self.gate(x)))
        metrics = {"memory_update_norm": memory_delta_norm(mem, mem0),
                   "generator_update_norm": memory_delta_norm(gen, gen0) if self.selfmod else torch.zeros(()),
                   "memory_lr_mean": eta.detach().float().mean()}
        return y, {"conv": conv_cache, "gen": gen, "mem": mem}, metrics

    def _fused_backend(self, xq):
        """The kernel backend of the fused op that runs this layer's call, or None (then the loop below runs);
        ``fused_reason`` keeps why the faster backends did not."""
        from hope_kernels.self_modifying_titans import SelfModifyingTitansCall, kernel_backend

        B, H, T, Dh = xq.shape
        call = SelfModifyingTitansCall(xq.device, xq.dtype, B, H, T, Dh, self.gen_w1.shape[-1], len(GENERATORS),
                                       self.rule, self.gen_chunk_size, self.mem_chunk_size, self.gen_update_clip,
                                       self.mem_update_clip, normalize_v=True, readout_before=False,
                                       selfmod=self.selfmod, other_flags=() if self.adaptive_q else ("adaptive_q=False",))
        self.fused_path, self.fused_reason = kernel_backend(call, self.backend)
        return self.fused_path

    def _fused_forward(self, x, xq, xk, xv, gen0, mom, state, conv_cache, backend):
        from hope_kernels.self_modifying_titans import self_modifying_titans

        mem0 = state.get("mem")
        if mem0 is None:
            mem0 = initial_memory_state(self, "mem", "mlp", x.shape[0])
        r = self_modifying_titans(xq, xk, xv, gen0, mem0, self.gate_readout, self.gate_bias, mom,
                                  gen_chunk_size=self.gen_chunk_size, mem_chunk_size=self.mem_chunk_size,
                                  gen_update_clip=self.gen_update_clip, mem_update_clip=self.mem_update_clip,
                                  rule=self.rule, normalize_v=True, backend=backend)
        return self._finish(x, r.y, conv_cache, r.gen, gen0, r.mem, mem0, r.eta)


__all__ = ["SelfModifyingTitans", "mlp_read", "GENERATORS"]
