"""Continuum Memory System (NL sec. 7, eq. 70-71; F2): a chain of MLP levels, level l updated in context every
``period_l`` tokens from its teach signal.

Level f(x) = x + W2 gelu(W1 rmsnorm(x)) (``hope_kernels.cms_update.cms_forward``). Slow weights are nn.Parameters
(trained by the outer optimizer as the initial state of every sequence); a stream carries a per-sample fast state:
an offset (fast weights = slow + offset, the offset detached: first-order, the outer gradient reaches the slow
weights through every token's forward), the update's momentum and the (input, error) pairs of the block not yet
complete. Block m of a level holds the tokens between its m-th and (m+1)-th boundary; an update fires at every
boundary (NL eq. 71: momentum SGD on the error of the block's tokens, ``cms_update``).

Two ways to run a level over a segment (docs/equations.md, "Continual CMS"):
- ``continual``: chunk-parallel. All of the segment's updates take their gradients at the weights the segment
  starts with (as Titans takes its gradients at the chunk-start state), so the weights of block m are
  W(m) = W_0 - lr (c_m M + sum_{j<m} C(m-j) g_j), and the output is read in the dual form without materialising
  a weight per block (one [T, S] score matrix per weight, no Python loop over tokens or blocks).
- ``forward`` + ``push``: the weights held fixed over a segment that ends at or before the next boundary, then the
  block's update fired from the weights current at the boundary (the exact, sequential form).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hope.layers.norms import check_input
from hope_kernels.cms_update import CMSParams, cms_forward, rmsnorm


def gelu_grad(h: torch.Tensor) -> torch.Tensor:
    """d gelu(h) / dh of the exact (erf) GELU."""
    return 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0))) + h * torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)


@dataclass
class CMSLevelState:
    """Per-stream state of one level: fast-weight offset (``off1``, ``off2``), momenta, the open block's tokens,
    telemetry. A chunk-parallel segment leaves the offsets to be summed when first read (``defer_offsets``): a caller
    that drops the state, as a training step does, never pays for them."""

    _off1: torch.Tensor  # [B, E, D] fast W1 - slow W1
    _off2: torch.Tensor  # [B, D, E]
    mom1: torch.Tensor  # [B, E, D]
    mom2: torch.Tensor  # [B, D, E]
    buf_x: torch.Tensor  # [B, period, D] inputs of the open block's tokens
    buf_delta: torch.Tensor  # [B, period, D] their errors at the level output
    fill: int = 0
    update_count: int = 0
    update_norm: float = 0.0  # L2 norm of the last update (W1 and W2 together, mean over samples)
    teach_signal_norm: float = 0.0  # norm of the errors fed in the last call
    _pending: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    def defer_offsets(self, make: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``make()`` gives (off1, off2), called once, when either is first read."""
        self._pending = make

    def _resolve(self) -> None:
        if self._pending is not None:
            make, self._pending = self._pending, None
            self._off1, self._off2 = make()

    def _offset(name: str) -> property:  # run in the class body: builds the off1 / off2 properties
        """An offset read or written after the deferred one (if any) is summed."""

        def get(self) -> torch.Tensor:
            self._resolve()
            return getattr(self, name)

        def put(self, value: torch.Tensor) -> None:
            self._resolve()
            setattr(self, name, value)

        return property(get, put)

    off1 = _offset("_off1")
    off2 = _offset("_off2")
    del _offset

    def detach_copy(self) -> "CMSLevelState":
        return CMSLevelState(self.off1.detach(), self.off2.detach(), self.mom1.detach(), self.mom2.detach(),
                             self.buf_x.detach().clone(), self.buf_delta.detach().clone(), self.fill,
                             self.update_count, self.update_norm, self.teach_signal_norm)

    @property
    def is_fresh(self) -> bool:
        """No update ever fired: the fast weights are the slow weights, the momenta zero."""
        return self.update_count == 0


def block_coefficients(beta: float, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Momentum-SGD over blocks in closed form (m_j = beta m_{j-1} + g_j, W(j+1) = W(j) - lr m_j):
    W(m) = W(0) - lr (c[m] M + sum_{j<m} C[m - j] g_j), momentum after n updates beta^n M + sum_j P[n-1-j] g_j.
    Returns C [n + 1] (C[d] = sum_{i<d} beta^i, C[0] = 0), c [n + 1] (c[m] = beta C[m]), P [n + 1] (beta^d)."""
    d = torch.arange(n + 1, dtype=torch.float64, device=device)
    powers = beta ** d
    C = d.clone() if beta == 1.0 else (1.0 - powers) / (1.0 - beta)
    return C.float(), (beta * C).float(), powers.float()


def _rows_from(r0: int, x: torch.Tensor) -> torch.Tensor:
    """x [B, T - r0, F] as rows r0.. of a [B, T, F] tensor whose first r0 rows are zero."""
    return F.pad(x, (0, 0, r0, 0)) if r0 else x


class CMSLevel(nn.Module):
    def __init__(self, dim: int, hidden: int, period: int, init_std: float = 0.02, out_scale: float = 1.0):
        super().__init__()
        self.period = period
        self.w1 = nn.Parameter(torch.randn(hidden, dim) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(dim, hidden) * init_std * out_scale)

    def fresh_state(self, batch_size: int, device) -> CMSLevelState:
        E, D = self.w1.shape
        z1 = torch.zeros(batch_size, E, D, device=device)
        z2 = torch.zeros(batch_size, D, E, device=device)
        zb = torch.zeros(batch_size, self.period, D, device=device)
        return CMSLevelState(z1, z2, z1.clone(), z2.clone(), zb, zb.clone())

    def weights(self, batch_size: int, state: CMSLevelState | None):
        """Per-sample fast weights (graph to the slow weights kept)."""
        w1 = self.w1.float().unsqueeze(0).expand(batch_size, *self.w1.shape)
        w2 = self.w2.float().unsqueeze(0).expand(batch_size, *self.w2.shape)
        if state is not None:
            w1, w2 = w1 + state.off1, w2 + state.off2
        return w1, w2

    def _check(self, x, state):
        check_input("x", x, self.w1.shape[1])
        if state is not None and not isinstance(state, CMSLevelState):
            raise TypeError(f"state must be a CMSLevelState or None, got {type(state).__name__}")

    def forward(self, x: torch.Tensor, state: CMSLevelState | None = None) -> torch.Tensor:
        """The level with the stream's current weights (the slow ones when ``state`` is None or fresh)."""
        self._check(x, state)
        if state is None or state.is_fresh:  # shared slow weights: plain matmuls (same math as cms_forward)
            h = F.linear(rmsnorm(x.float()).to(x.dtype), self.w1.to(x.dtype))
            return x + F.linear(F.gelu(h), self.w2.to(x.dtype))
        w1, w2 = self.weights(x.shape[0], state)
        return cms_forward(w1, w2, x)

    # ------------------------------------------------------------------------------- chunk-parallel form
    def continual(self, x: torch.Tensor, teach_x: torch.Tensor, teach_delta: torch.Tensor,
                  state: CMSLevelState | None, *, lr: float, beta: float):
        """Read ``x`` [B, T, D] with the weights of each token's block while the updates of the segment fire at its
        boundaries, every gradient taken at the segment-start weights W_0 (chunk-parallel form, NL eq. 71 with
        Titans' chunk-start gradients). ``teach_x``, ``teach_delta`` [B, T, D]: the level's inputs and the errors
        at its output for the same tokens, from the teach pass. Returns ``(y, new_state)``.

        y_t = x_t + W2(m) gelu(W1(m) n_t), n = rmsnorm(x), with W(m) = W_0 - lr (c_m M + sum_{j<m} C(m-j) g_j),
        g1_j = sum_{s in j} dh_s n'_s^T, g2_j = sum_{s in j} delta_s a'_s^T (n', a', dh of the teach inputs at W_0),
        so W1(m) n_t = W1_0 n_t - lr c_m M1 n_t - lr sum_s C(m - j_s) (n'_s . n_t) dh_s (and alike for W2)."""
        self._check(x, state)
        B, T, D = x.shape
        P = self.period
        st = state if state is not None else self.fresh_state(B, x.device)
        fresh = st.is_fresh
        S = st.fill + T
        n_fire = S // P
        with torch.no_grad():  # the update: first-order, its factors are constants of the outer graph
            X1 = torch.cat([st.buf_x[:, :st.fill], teach_x.detach().float()], 1)  # [B, S, D]
            D1 = torch.cat([st.buf_delta[:, :st.fill], teach_delta.detach().float()], 1)
            w1_0, w2_0 = (t.detach() for t in self.weights(B, None if fresh else st))
            n1 = rmsnorm(X1)
            h1 = torch.einsum("bed,bsd->bse", w1_0, n1)
            a1 = F.gelu(h1)
            dh = torch.einsum("bde,bsd->bse", w2_0, D1) * gelu_grad(h1)
            C, c, powers = block_coefficients(beta, n_fire, x.device)
            s_block = torch.arange(S, device=x.device) // P  # block of each teach token
            t_block = (st.fill + torch.arange(T, device=x.device)) // P  # block of each query token
            gap = t_block[:, None] - s_block[None, :]
            K = torch.where(gap > 0, C[gap.clamp(0, n_fire)], torch.zeros((), device=x.device))  # [T, S]
            # K's nonzero block: queries after the segment's first boundary, keys before the last query's block
            r0, c1 = max(0, P - st.fill), (S - 1) // P * P
            K = K[r0:, :c1]
            c_t = c[t_block]  # momentum carried into this segment, weight per query token
        n = rmsnorm(x.float())
        h = F.linear(n, self.w1.float())
        if not fresh:
            h = h + torch.einsum("bed,btd->bte", st.off1, n) - lr * c_t[None, :, None] * torch.einsum(
                "bed,btd->bte", st.mom1, n)
        if n_fire > 0:
            h = h - lr * _rows_from(r0, (K * torch.einsum("btd,bsd->bts", n[:, r0:], n1[:, :c1])) @ dh[:, :c1])
        a = F.gelu(h)
        y = x.float() + F.linear(a, self.w2.float())
        if not fresh:
            y = y + torch.einsum("bde,bte->btd", st.off2, a) - lr * c_t[None, :, None] * torch.einsum(
                "bde,bte->btd", st.mom2, a)
        if n_fire > 0:
            y = y - lr * _rows_from(r0, (K * torch.einsum("bte,bse->bts", a[:, r0:], a1[:, :c1])) @ D1[:, :c1])
        return y.to(x.dtype), self._advance(st, X1, D1, n1, a1, dh, n_fire, C, c, powers, lr=lr)

    @torch.no_grad()
    def _advance(self, st, X1, D1, n1, a1, dh, n_fire, C, c, powers, *, lr) -> CMSLevelState:
        """The state after the segment: its n_fire updates summed, each token's gradient (dh_s n1_s^T, delta_s a1_s^T:
        ``cms_update``'s at W_0, from the read's own n1, a1, dh) weighted for the end weights and for the end
        momentum in one product per weight; the open block's tokens."""
        B, S, D = X1.shape
        P = self.period
        new = st.detach_copy()
        new.teach_signal_norm = float(D1[:, st.fill:].norm())
        if n_fire > 0:
            nf = n_fire * P
            blk = torch.arange(nf, device=X1.device) // P
            dh, n1, D1f, a1 = dh[:, :nf], n1[:, :nf], D1[:, :nf], a1[:, :nf]

            def summed(weight):  # each fired token's gradient, weighted by its block: (sum dh n1^T, sum delta a1^T)
                w = weight[None, :, None]
                return (torch.einsum("bse,bsd->bed", dh * w, n1), torch.einsum("bsd,bse->bde", D1f * w, a1))

            G1m, G2m = summed(powers[n_fire - 1 - blk])  # the end momentum (telemetry reads it)
            off1, off2, mom1, mom2, cn = st.off1, st.off2, st.mom1, st.mom2, c[n_fire]

            @torch.no_grad()
            def end_offsets():  # the end weights: summed when first read
                G1, G2 = summed(C[n_fire - blk])
                return off1 - lr * (cn * mom1 + G1), off2 - lr * (cn * mom2 + G2)

            new.defer_offsets(end_offsets)
            new.mom1 = powers[n_fire] * st.mom1 + G1m
            new.mom2 = powers[n_fire] * st.mom2 + G2m
            new.update_count = st.update_count + n_fire
            # the last update is -lr times the momentum it leaves
            new.update_norm = float(lr * (new.mom1.flatten(1).norm(dim=1).pow(2)
                                          + new.mom2.flatten(1).norm(dim=1).pow(2)).sqrt().mean())
        tail = S - n_fire * P
        new.buf_x = torch.zeros_like(st.buf_x)
        new.buf_delta = torch.zeros_like(st.buf_delta)
        new.buf_x[:, :tail] = X1[:, n_fire * P:]
        new.buf_delta[:, :tail] = D1[:, n_fire * P:]
        new.fill = tail
        return new

    # ------------------------------------------------------------------------------------ sequential form
    @torch.no_grad()
    def push(self, state: CMSLevelState, x: torch.Tensor, delta: torch.Tensor, *, lr: float, beta: float,
             precond: bool, backend: str = "auto", flush: bool = False) -> CMSLevelState:
        """Append tokens x, delta [B, S, D] to the open block; fire ``cms_update`` at the weights current then, each
        time the block fills. ``flush=True`` also fires on a partly filled block at the end (test-time
        memorisation). Returns the new state (the given one is not modified)."""
        st = state.detach_copy()
        B, S, D = x.shape
        C = self.period
        if S > 0:
            st.teach_signal_norm = float(delta.float().norm())
        i = 0
        while i < S:
            take = min(C - st.fill, S - i)
            st.buf_x[:, st.fill:st.fill + take] = x[:, i:i + take].float()
            st.buf_delta[:, st.fill:st.fill + take] = delta[:, i:i + take].float()
            st.fill += take
            i += take
            if st.fill == C:
                self._fire(st, lr, beta, precond, backend)
        if flush and st.fill > 0:
            self._fire(st, lr, beta, precond, backend)
        return st

    @torch.no_grad()
    def _fire(self, st: CMSLevelState, lr: float, beta: float, precond: bool, backend: str) -> None:
        """One cms_update on the open block's tokens, then clear it (NL eq. 70-71)."""
        from hope_kernels import cms_update

        n = st.fill
        slow1, slow2 = self.w1.detach().float(), self.w2.detach().float()
        params = CMSParams((slow1 + st.off1).contiguous(), (slow2 + st.off2).contiguous())
        new_p, new_m, stats = cms_update(params, CMSParams(st.mom1, st.mom2), st.buf_x[:, :n].contiguous(),
                                         st.buf_delta[:, :n].contiguous(), lr=lr, beta=beta, precond=precond,
                                         backend=backend)
        st.off1, st.off2 = new_p.w1 - slow1, new_p.w2 - slow2
        st.mom1, st.mom2 = new_m.w1, new_m.w2
        st.update_count += 1
        st.update_norm = float((stats.w1_update_norm.pow(2) + stats.w2_update_norm.pow(2)).sqrt().mean())
        st.fill = 0
        st.buf_x = torch.zeros_like(st.buf_x)
        st.buf_delta = torch.zeros_like(st.buf_delta)


class CMSChain(nn.Module):
    """Levels applied in sequence, fastest first: x -> f_1(x) -> f_2(...)."""

    def __init__(self, dim: int, hidden: int, periods: Sequence[int], init_std: float = 0.02, out_scale: float = 1.0):
        super().__init__()
        self.levels = nn.ModuleList(CMSLevel(dim, hidden, p, init_std, out_scale) for p in periods)

    def forward(self, x: torch.Tensor, states=None, collect: bool = False):
        """Static read with each stream's current weights. Returns (y, level inputs, level outputs) (the lists
        empty unless ``collect``)."""
        inputs, outputs = [], []
        for j, level in enumerate(self.levels):
            if collect:
                inputs.append(x.detach())
            x = level(x, None if states is None else states[j])
            if collect:
                outputs.append(x)
        return x, inputs, outputs

    def continual(self, x: torch.Tensor, teach, states, *, lr: float, beta: float, collect: bool = False):
        """Chunk-parallel continual read (``CMSLevel.continual``); ``teach``: per level (inputs, errors) of the teach
        pass. Returns (y, new states, level inputs, level outputs)."""
        new_states, inputs, outputs = [], [], []
        for j, level in enumerate(self.levels):
            if collect:
                inputs.append(x.detach())
            x, st = level.continual(x, teach[j][0], teach[j][1], None if states is None else states[j], lr=lr,
                                    beta=beta)
            new_states.append(st)
            if collect:
                outputs.append(x)
        return x, new_states, inputs, outputs
