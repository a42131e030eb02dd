"""Self-modifying Titans (NL sec. 8, eq. 83-97): a Titans memory M_mem whose keys, values, learning rates and
decays are produced by memories M_k, M_v, M_eta, M_alpha (and, with ``adaptive_q``, M_q) that update themselves
in context.

Per head, every memory is a 2-layer residual MLP M(x) = x + W1 gelu(W2 x) whose initial weights are learnable
(expanded over the batch). Inputs: x -> W_in -> causal depthwise conv (window 4) -> SiLU -> x_q, x_k, x_v per
head. For each small chunk (``gen_chunk_size``, default 8), read with the generator memories' chunk-start states
(NL eq. 90, the chunk-wise form of eq. 83):
  k_t = l2norm(M_k(x_k,t)), v_t = l2norm(M_v(x_v,t)) (``normalize_v``),
  eta_t = sigmoid(<w_eta, M_eta(x_k,t)> + b_eta), alpha_t = sigmoid(<w_alpha, M_alpha(x_k,t)> + b_alpha),
  q_t = l2norm(x_q,t) (eq. 83: the one non-adaptive projection; ``adaptive_q``: l2norm(M_q(x_q,t)))
and update every generator M_box with key k_t and its self-generated target v^_box,t = M_box(v_t) (eq. 88-90,
read at chunk start), lr eta_t, decay alpha_t, by the ``rule`` (default ``dgd``, eq. 88). The generators share
keys and gates, so they are stacked along the head dim into ONE ``titan_memory_update`` call per chunk.
M_mem does not feed back into the generators, so it reads the whole segment with chunk ``mem_chunk_size``
(default 64) and the same keys, values and gates: o_t = M_mem,t-1(q_t) (eq. 83 / 94: the state before token
t's write; ``mem_readout='after_update'`` reads M_mem,t).

Named deviations from the paper (docs/equations.md, "HOPE: paper vs flags"): ``normalize_v`` (v_t l2-normalised,
the default: the paper's v_t = M_v(x_v,t) let the self-generated targets M_box(v_t) run away), ``adaptive_q``,
``mem_readout='after_update'``, ``momentum`` (Titans eq. 13-14 momentum with a learned per-head rate; eq. 88 has
none), ``gen_update_clip`` / ``mem_update_clip`` (a bound on one chunk's update,
``clip_memory_update``; with a bound M_mem runs one call per chunk). ``selfmod=False`` (ablation): the generators
keep their initial weights (static MLP projections).

The generator recurrence and the M_mem pass run as one fused op (``hope_kernels.self_modifying_titans``: a few
kernel launches per pass instead of a Python loop over chunks) whenever one of its kernel backends computes this
call (``fused=False``: never); otherwise the loop below runs. ``fused_path`` (the backend, or None) and
``fused_reason`` (why not) say which the last forward took; both give the same values, gradients and metrics.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from hope.layers.conv import CausalDepthwiseConv
from hope.layers.norms import RMSNorm, check_input, l2_normalize
from hope.layers.titan_memory import (
    apply_update_scale,
    bounded_memory_pass,
    init_memory_params,
    initial_memory_state,
    memory_delta_norm,
    memory_update_scale,
)

GENERATORS = ("k", "v", "eta", "alpha", "q")  # stacking order of the generator memories ("q" only with adaptive_q)
MEM_READOUTS = ("before_update", "after_update")


def mlp_read(W1: torch.Tensor, W2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """M(x) = x + W1 gelu(W2 x) for stacked per-head memories: W1 [..., D, E], W2 [..., E, D], x [..., L, D]."""
    h = torch.einsum("...ed,...ld->...le", W2, x)
    return x + torch.einsum("...de,...le->...ld", W1, F.gelu(h))


class SelfModifyingTitans(nn.Module):
    """``forward(x, state) -> (y, state, metrics)``; state keys ``conv``, ``gen``, ``mem``."""

    def __init__(self, dim: int, n_heads: int, *, expansion: int = 2, mem_chunk_size: int = 64,
                 gen_chunk_size: int = 8, gen_update_clip: float = 0.0, mem_update_clip: float = 0.0,
                 conv_window: int = 4, rule: str = "dgd", selfmod: bool = True, adaptive_q: bool = False,
                 normalize_v: bool = True, mem_readout: str = "before_update", momentum: bool = False,
                 backend: str = "auto", fused: bool = True):
        super().__init__()
        if mem_readout not in MEM_READOUTS:
            raise ValueError(f"mem_readout must be one of {MEM_READOUTS}, got {mem_readout!r}")
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.mem_chunk_size, self.gen_chunk_size = mem_chunk_size, gen_chunk_size
        self.gen_update_clip, self.mem_update_clip = gen_update_clip, mem_update_clip
        self.rule, self.selfmod, self.adaptive_q, self.backend = rule, selfmod, adaptive_q, backend
        self.normalize_v, self.mem_readout, self.momentum = normalize_v, mem_readout, momentum
        self.generators = GENERATORS if adaptive_q else GENERATORS[:4]
        Dh, E = self.head_dim, expansion * self.head_dim
        self.inp = nn.Linear(dim, 3 * dim, bias=False)  # inputs of the q, k, v generators
        self.conv = CausalDepthwiseConv(3 * dim, conv_window)
        init_memory_params(self, "gen", len(self.generators) * n_heads, Dh, E, "mlp")
        init_memory_params(self, "mem", n_heads, Dh, E, "mlp")
        # scalar gates per head from the eta / alpha memories' outputs: learned readout + sigmoid
        self.gate_readout = nn.Parameter(torch.randn(2, n_heads, Dh) * 0.02)
        self.gate_bias = nn.Parameter(torch.tensor([[-4.0] * n_heads, [-6.0] * n_heads]))  # eta ~0.018, alpha ~0.0025
        if momentum:
            self.momentum_logit = nn.Parameter(torch.full((2, n_heads), 1.0))  # generators, M_mem: ~0.73
        self.fused = fused  # False: always the loop (the fused op's ground truth)
        self.fused_path: str | None = None
        self.fused_reason = ""
        self.out_norm = RMSNorm(Dh)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def _generate(self, W1, W2, xq, xk, xv):
        """k, v, q, eta, alpha [B, H, L, *] read with generator weights W1/W2 [B, G, H, ...] (NL eq. 83, 90)."""
        xin = torch.stack([xk, xv, xk, xk] + ([xq] if self.adaptive_q else []), dim=1)  # order = self.generators
        out = mlp_read(W1, W2, xin)
        k = l2_normalize(out[:, 0])
        v = l2_normalize(out[:, 1]) if self.normalize_v else out[:, 1]
        gates = torch.sigmoid(torch.einsum("bghld,ghd->bghl", out[:, 2:4], self.gate_readout)
                              + self.gate_bias[None, :, :, None])
        q = l2_normalize(out[:, 4] if self.adaptive_q else xq)
        return k, v, q, gates[:, 0], gates[:, 1]

    def _momenta(self, B, H, L, device):
        """Momentum gates [B, H, L] of the generators and of M_mem (zero: eq. 88 has no momentum term)."""
        if not self.momentum:
            z = torch.zeros(B, H, L, device=device)
            return z, z
        mom = torch.sigmoid(self.momentum_logit.float())
        return mom[0].view(1, H, 1).expand(B, H, L), mom[1].view(1, H, 1).expand(B, H, L)

    def forward(self, x: torch.Tensor, state: dict | None = None, *, local_grad: bool = False):
        """``local_grad=True`` (the CMS teach pass): same values, but gradients reach x only along paths that stay at
        the same token: the conv's current tap and the read of q_t (keys, values, gates, generators and memory
        states are constants), so d loss / d x_t carries no other token's loss."""
        from hope_kernels import titan_memory_update

        check_input("x", x, self.dim)
        B, T, D = x.shape
        H, Dh, G = self.n_heads, self.head_dim, len(self.generators)
        state = state or {}
        z = self.inp(x)
        if local_grad:
            xin, conv_cache = self.conv(z.detach(), state.get("conv"))
            xin = xin + (z - z.detach()) * self.conv.weight[:, 0, -1].detach()
        else:
            xin, conv_cache = self.conv(z, state.get("conv"))
        xin = F.silu(xin).float().view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # [3, B, H, T, Dh]
        xq, xk, xv = xin[0], xin[1], xin[2]
        gen0 = state.get("gen")
        if gen0 is None:
            gen0 = initial_memory_state(self, "gen", "mlp", B)  # [B, G*H, ...]
        fused = self._fused_backend(xq)
        if fused is not None:
            return self._fused_forward(x, xq, xk, xv, gen0, state, conv_cache, fused, local_grad)
        gen = gen0
        gen_clipped, gen_chunks = x.new_zeros((), dtype=torch.float32), 0
        q_local = []  # local_grad with adaptive_q: q read again, with grad to x_q, from each chunk's M_q
        with torch.no_grad() if local_grad else contextlib.nullcontext():
            if self.selfmod:
                ks, vs, qs, etas, alphas = [], [], [], [], []
                C = self.gen_chunk_size
                for c0 in range(0, T, C):
                    sl = slice(c0, min(T, c0 + C))
                    L = sl.stop - sl.start
                    W1g = gen.W1.reshape(B, G, H, Dh, -1)
                    W2g = gen.W2.reshape(B, G, H, -1, Dh)
                    k, v, q, eta, alpha = self._generate(W1g, W2g, xq[:, :, sl], xk[:, :, sl], xv[:, :, sl])
                    if local_grad and self.adaptive_q:
                        with torch.enable_grad():
                            q_local.append(l2_normalize(mlp_read(W1g[:, 4], W2g[:, 4], xq[:, :, sl])))
                    # self-generated targets v^_box = M_box(v_t), read at chunk start (NL eq. 88-90)
                    v_hat = mlp_read(W1g, W2g, v.unsqueeze(1).expand(B, G, H, L, Dh))
                    rep = lambda t: t.unsqueeze(1).expand(B, G, *t.shape[1:]).reshape(B, G * H, *t.shape[2:])  # noqa: E731
                    mom_g, _ = self._momenta(B, H, L, x.device)
                    gen_prev = gen
                    _, gen = titan_memory_update(rep(k), rep(k), v_hat.reshape(B, G * H, L, Dh), rep(eta),
                                                 rep(mom_g), rep(alpha), chunk_size=L, memory="mlp", rule=self.rule,
                                                 state=gen, backend=self.backend)
                    if self.gen_update_clip > 0:
                        scale = memory_update_scale(gen_prev, gen, self.gen_update_clip)
                        gen = apply_update_scale(gen_prev, gen, scale)
                        gen_clipped = gen_clipped + (scale.detach() < 1).float().mean()
                        gen_chunks += 1
                    ks.append(k), vs.append(v), qs.append(q), etas.append(eta), alphas.append(alpha)
                k, v, q = torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(qs, 2)
                eta, alpha = torch.cat(etas, 2), torch.cat(alphas, 2)
            else:
                W1s, W2s = gen0.W1.view(B, G, H, Dh, -1), gen0.W2.view(B, G, H, -1, Dh)
                k, v, q, eta, alpha = self._generate(W1s, W2s, xq, xk, xv)
                if local_grad and self.adaptive_q:
                    with torch.enable_grad():
                        q_local.append(l2_normalize(mlp_read(W1s[:, 4], W2s[:, 4], xq)))
        if local_grad:
            q = torch.cat(q_local, 2) if self.adaptive_q else l2_normalize(xq)
        mem0 = state.get("mem")
        if mem0 is None:
            mem0 = initial_memory_state(self, "mem", "mlp", B)
        if local_grad:
            mem0 = type(mem0)(*(t.detach() for t in mem0))
        _, mom_m = self._momenta(B, H, T, x.device)
        before = self.mem_readout == "before_update"
        # o_t = M_{t-1}(q_t): the op reads M_s(q'_s) after token s's write, so feed q'_s = q_{s+1} and take
        # o_{s+1} = out_s; o_0 = M_0(q_0) from the state the segment starts with
        q_in = torch.cat([q[:, :, 1:], q[:, :, -1:]], 2) if before else q
        y, mem, mem_clipped = bounded_memory_pass(q_in, k, v, eta, mom_m, alpha, chunk_size=self.mem_chunk_size,
                                                  memory="mlp", rule=self.rule, state=mem0, backend=self.backend,
                                                  update_clip=self.mem_update_clip)
        if before:
            y = torch.cat([mlp_read(mem0.W1, mem0.W2, q[:, :, :1]), y[:, :, :-1]], 2)
        return self._finish(x, y, conv_cache, gen, gen0, mem, mem0, eta, mem_clipped,
                            gen_clipped / max(1, gen_chunks))

    def _finish(self, x, y, conv_cache, gen, gen0, mem, mem0, eta, mem_clip_fraction, gen_clip_fraction):
        """Output projection and metrics from M_mem's reads y [B, H, T, Dh] (the loop's and the fused op's)."""
        B, T, D = x.shape
        y = self.out_norm(y).transpose(1, 2).reshape(B, T, D).to(x.dtype)
        y = self.out(y * F.silu(self.gate(x)))
        metrics = {"memory_update_norm": memory_delta_norm(mem, mem0),
                   "generator_update_norm": memory_delta_norm(gen, gen0) if self.selfmod else torch.zeros(()),
                   "memory_lr_mean": eta.detach().float().mean(),
                   # fraction of (chunk, sample, head) updates the bound rescaled (0 when no bound is set)
                   "memory_clip_fraction": mem_clip_fraction,
                   "generator_clip_fraction": gen_clip_fraction}
        return y, {"conv": conv_cache, "gen": gen, "mem": mem}, metrics

    def _fused_backend(self, xq: torch.Tensor) -> str | None:
        """The kernel backend of the fused op that computes this call, or None (the loop runs); sets ``fused_path``
        and ``fused_reason``."""
        from hope_kernels.self_modifying_titans import SelfModifyingTitansCall, kernel_backend

        if not self.fused:
            self.fused_path, self.fused_reason = None, "fused=False"
            return None
        B, H, T, Dh = xq.shape
        call = SelfModifyingTitansCall(
            xq.device, xq.dtype, B, H, T, Dh, self.gen_w1.shape[-1], len(self.generators), self.rule,
            self.gen_chunk_size, self.mem_chunk_size, float(self.gen_update_clip), float(self.mem_update_clip),
            normalize_v=self.normalize_v, readout_before=self.mem_readout == "before_update", selfmod=self.selfmod,
            backward=torch.is_grad_enabled() and (xq.requires_grad or any(p.requires_grad for p in self.parameters())))
        self.fused_path, self.fused_reason = kernel_backend(call, self.backend)
        return self.fused_path

    def _fused_forward(self, x, xq, xk, xv, gen0, state, conv_cache, backend: str, local_grad: bool):
        """The generator recurrence and the M_mem pass as one op (same values, gradients and metrics as the loop).
        ``local_grad``: every input but x_q is a constant; x_q reaches the output only through the read of q_t (the
        generators' updates never read it), so the op's gradient of x_q is the same-token path alone."""
        from hope_kernels.self_modifying_titans import self_modifying_titans

        B, H = x.shape[0], self.n_heads
        mem0 = state.get("mem")
        if mem0 is None:
            mem0 = initial_memory_state(self, "mem", "mlp", B)
        momentum = torch.sigmoid(self.momentum_logit.float()) if self.momentum else xq.new_zeros(2, H)
        readout, bias = self.gate_readout, self.gate_bias
        if local_grad:
            xk, xv, readout, bias, momentum = (t.detach() for t in (xk, xv, readout, bias, momentum))
            gen0, mem0 = (type(s)(*(t.detach() for t in s)) for s in (gen0, mem0))
        r = self_modifying_titans(xq, xk, xv, gen0, mem0, readout, bias, momentum,
                                  gen_chunk_size=self.gen_chunk_size, mem_chunk_size=self.mem_chunk_size,
                                  gen_update_clip=self.gen_update_clip, mem_update_clip=self.mem_update_clip,
                                  rule=self.rule, normalize_v=self.normalize_v,
                                  readout_before=self.mem_readout == "before_update", backend=backend)
        no_bound = x.new_zeros((), dtype=torch.float32)
        gen_clip = (r.gen_update_scale < 1).float().mean() if self.gen_update_clip > 0 else no_bound
        mem_clip = (r.mem_update_scale < 1).float().mean() if self.mem_update_clip > 0 else no_bound
        return self._finish(x, r.y, conv_cache, r.gen, gen0, r.mem, mem0, r.eta, mem_clip, gen_clip)


__all__ = ["SelfModifyingTitans", "mlp_read", "GENERATORS", "MEM_READOUTS"]
