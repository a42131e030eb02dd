"""Continuum Memory System (NL sec. 7, eq. 70-71; F2): a chain of MLP levels, level l updated every
``period_l`` tokens from the teach signal.

Level f(x) = x + W2 gelu(W1 rmsnorm(x)) (``hope_kernels.cms_update.cms_forward``). Slow weights are
nn.Parameters (trained by the outer optimizer); each stream carries a per-sample *offset* (fast
weights = slow + offset, the offset detached), so the outer loss always reaches the slow weights.
Each level buffers its inputs and teach-signal deltas; when the buffer holds ``period`` tokens it
fires one ``cms_update`` and clears the buffer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hope.layers.norms import check_input
from hope_kernels.cms_update import CMSParams, cms_forward, rmsnorm


@dataclass
class CMSLevelState:
    """Per-stream state of one level: fast-weight offset, momenta, token buffer, telemetry."""

    off1: torch.Tensor  # [B, E, D] fast W1 - slow W1
    off2: torch.Tensor  # [B, D, E]
    mom1: torch.Tensor  # [B, E, D]
    mom2: torch.Tensor  # [B, D, E]
    buf_x: torch.Tensor  # [B, period, D] buffered level inputs
    buf_delta: torch.Tensor  # [B, period, D] buffered errors at the level output
    fill: int = 0
    update_count: int = 0
    update_norm: float = 0.0  # L2 norm of the last update (W1 and W2 together, mean over samples)
    teach_signal_norm: float = 0.0  # norm of the deltas fed in the last push

    def detach_copy(self) -> "CMSLevelState":
        return CMSLevelState(self.off1.detach(), self.off2.detach(), self.mom1.detach(), self.mom2.detach(),
                             self.buf_x.detach().clone(), self.buf_delta.detach().clone(), self.fill,
                             self.update_count, self.update_norm, self.teach_signal_norm)


class CMSLevel(nn.Module):
    def __init__(self, dim: int, hidden: int, period: int, init_std: float = 0.02, out_scale: float = 1.0):
        super().__init__()
        self.period = period
        self.w1 = nn.Parameter(torch.randn(hidden, dim) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(dim, hidden) * init_std * out_scale)
        # momenta of the slow-weight inner updates (apply_parallel_inner_updates); checkpointed
        self.register_buffer("mom1", torch.zeros(hidden, dim))
        self.register_buffer("mom2", torch.zeros(dim, hidden))

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

    def forward(self, x: torch.Tensor, state: CMSLevelState | None = None) -> torch.Tensor:
        check_input("x", x, self.w1.shape[1])
        if state is not None and not isinstance(state, CMSLevelState):
            raise TypeError(f"state must be a CMSLevelState or None, got {type(state).__name__}")
        if state is None:  # shared slow weights: plain matmuls (same math as cms_forward, autocast-friendly)
            h = F.linear(rmsnorm(x.float()).to(x.dtype), self.w1.to(x.dtype))
            return x + F.linear(F.gelu(h), self.w2.to(x.dtype))
        w1, w2 = self.weights(x.shape[0], state)
        return cms_forward(w1, w2, x)

    @torch.no_grad()
    def push(self, state: CMSLevelState, x: torch.Tensor, delta: torch.Tensor, *, lr: float, beta: float,
             precond: bool, backend: str = "auto", flush: bool = False) -> CMSLevelState:
        """Append tokens x, delta [B, S, D] to the buffer; fire ``cms_update`` each time it fills.

        ``flush=True`` also fires on a partly filled buffer at the end (test-time memorisation).
        Returns the new state (the given one is not modified).
        """
        st = state.detach_copy()
        B, S, D = x.shape
        C = self.period
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
        """One cms_update on the buffered tokens, then clear the buffer (NL eq. 70-71)."""
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
        st.buf_x.zero_()
        st.buf_delta.zero_()


class CMSChain(nn.Module):
    """Levels applied in sequence, fastest first: x -> f_1(x) -> f_2(...)."""

    def __init__(self, dim: int, hidden: int, periods: Sequence[int], init_std: float = 0.02, out_scale: float = 1.0):
        super().__init__()
        self.levels = nn.ModuleList(CMSLevel(dim, hidden, p, init_std, out_scale) for p in periods)

    def forward(self, x: torch.Tensor, states=None, collect: bool = False):
        """Returns (y, level inputs, level outputs) (the lists empty unless ``collect``)."""
        inputs, outputs = [], []
        for j, level in enumerate(self.levels):
            if collect:
                inputs.append(x.detach())
            x = level(x, None if states is None else states[j])
            if collect:
                outputs.append(x)
        return x, inputs, outputs
