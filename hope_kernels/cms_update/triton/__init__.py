"""Triton CMS level update: one launch per level per buffer fill (NL eq. 70-71; nl_l2_precond NL eq. 27-29).

Program (b, e-block) owns rows e-block of W1 [E, D] and columns e-block of W2 [D, E] of sample b; the
two weight gradients split along E, so no program needs another's result (docs/kernels/cms_update.md).

Phase 1 (loop over C chunks): n = rmsnorm(x_c) via one D loop that also accumulates ||x||^2,
    h = n @ W1[eblk]^T, dz = delta @ W2[:, eblk], a = gelu(h), dh = dz * gelu'(h);
    a and dh [C, BLOCK_E] go to a per-call scratch (this program's own columns), and the column sums of
    h give W1 xbar = mean_c h_c for the preconditioner at no extra pass over W1.
Phase 2 (loop over D blocks, inner loop over C chunks): g1 = dh^T n, g2 = delta^T a, xbar = mean_c n;
    then m = beta m + g, W <- W - lr m (- lr (W1 xbar) xbar^T), written to fresh buffers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hope_kernels.backends import Backend, triton_runs_on
from hope_kernels.cms_update.naive import RMS_EPS

OP = "cms_update"


@triton.jit
def _cms_update_kernel(
    p_x, p_delta, p_w1, p_w2, p_m1, p_m2,
    p_w1_out, p_w2_out, p_m1_out, p_m2_out,
    p_a, p_dh, p_rstd,
    C, D, E, lr, beta, eps,
    PRECOND: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_b, i_e = tl.program_id(0), tl.program_id(1)
    n_e = tl.num_programs(1)
    o_e = i_e * BLOCK_E + tl.arange(0, BLOCK_E)
    m_e = o_e < E
    # per-sample bases (int64: B E D can pass 2^31 elements)
    p_x += i_b.to(tl.int64) * C * D
    p_delta += i_b.to(tl.int64) * C * D
    w_base = i_b.to(tl.int64) * E * D
    p_a += i_b.to(tl.int64) * C * E
    p_dh += i_b.to(tl.int64) * C * E
    p_rstd += (i_b.to(tl.int64) * n_e + i_e) * C

    # ---- phase 1: activations and dh on this program's E columns, all C tokens ----
    b_hsum = tl.zeros([BLOCK_E], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_hraw = tl.zeros([BLOCK_C, BLOCK_E], tl.float32)
        b_dz = tl.zeros([BLOCK_C, BLOCK_E], tl.float32)
        b_sq = tl.zeros([BLOCK_C], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            m_cd = m_c[:, None] & m_d[None, :]
            b_x = tl.load(p_x + o_c[:, None] * D + o_d[None, :], mask=m_cd, other=0.0).to(tl.float32)
            b_dl = tl.load(p_delta + o_c[:, None] * D + o_d[None, :], mask=m_cd, other=0.0).to(tl.float32)
            # W1[eblk, dblk] read transposed as [BLOCK_D, BLOCK_E]; W2[dblk, eblk] read as is
            b_w1t = tl.load(p_w1 + w_base + o_e[None, :] * D + o_d[:, None], mask=m_e[None, :] & m_d[:, None], other=0.0)
            b_w2 = tl.load(p_w2 + w_base + o_d[:, None] * E + o_e[None, :], mask=m_d[:, None] & m_e[None, :], other=0.0)
            b_sq += tl.sum(b_x * b_x, axis=1)
            b_hraw = tl.dot(b_x, b_w1t, b_hraw, input_precision=PRECISION)
            b_dz = tl.dot(b_dl, b_w2, b_dz, input_precision=PRECISION)
        # rmsnorm is a per-token scale, so it commutes with the matmul: h = rstd * (x @ W1^T)
        b_rstd = 1.0 / tl.sqrt(b_sq / D + eps)
        b_h = b_hraw * b_rstd[:, None]
        b_cdf = 0.5 * (1.0 + tl.math.erf(b_h * 0.7071067811865476))
        b_pdf = tl.exp(-0.5 * b_h * b_h) * 0.3989422804014327
        b_act = b_h * b_cdf
        b_dh = b_dz * (b_cdf + b_h * b_pdf)
        b_hsum += tl.sum(b_h, axis=0)
        m_ce = m_c[:, None] & m_e[None, :]
        tl.store(p_a + o_c[:, None] * E + o_e[None, :], b_act, mask=m_ce)
        tl.store(p_dh + o_c[:, None] * E + o_e[None, :], b_dh, mask=m_ce)
        tl.store(p_rstd + o_c, b_rstd, mask=m_c)
    # phase 2 reads back what other threads of this program stored
    tl.debug_barrier()
    b_w1xbar = b_hsum / C  # W1 xbar = mean_c W1 n_c = mean_c h_c

    # ---- phase 2: gradients as reductions over the chunk, momentum and weight update per D block ----
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_g1 = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
        b_g2 = tl.zeros([BLOCK_D, BLOCK_E], tl.float32)
        b_nsum = tl.zeros([BLOCK_D], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            m_cd = m_c[:, None] & m_d[None, :]
            m_ce = m_c[:, None] & m_e[None, :]
            b_rstd = tl.load(p_rstd + o_c, mask=m_c, other=0.0)
            b_n = tl.load(p_x + o_c[:, None] * D + o_d[None, :], mask=m_cd, other=0.0).to(tl.float32) * b_rstd[:, None]
            b_dl = tl.load(p_delta + o_c[:, None] * D + o_d[None, :], mask=m_cd, other=0.0).to(tl.float32)
            b_act = tl.load(p_a + o_c[:, None] * E + o_e[None, :], mask=m_ce, other=0.0)
            b_dh = tl.load(p_dh + o_c[:, None] * E + o_e[None, :], mask=m_ce, other=0.0)
            # g = sum_t J_W f(x_t)^T delta_t (NL eq. 70): dW1 = dh^T n, dW2 = delta^T a
            b_g1 = tl.dot(tl.trans(b_dh), b_n, b_g1, input_precision=PRECISION)
            b_g2 = tl.dot(tl.trans(b_dl), b_act, b_g2, input_precision=PRECISION)
            b_nsum += tl.sum(b_n, axis=0)
        m_ed = m_e[:, None] & m_d[None, :]
        o_w1 = w_base + o_e[:, None] * D + o_d[None, :]
        b_w1 = tl.load(p_w1 + o_w1, mask=m_ed, other=0.0)
        b_m1 = beta * tl.load(p_m1 + o_w1, mask=m_ed, other=0.0) + b_g1
        b_w1_new = b_w1 - lr * b_m1
        if PRECOND:
            # nl_l2_precond (NL eq. 27-29): W1 (I - lr xbar xbar^T) = W1 - lr (W1 xbar) xbar^T
            b_w1_new -= lr * b_w1xbar[:, None] * (b_nsum / C)[None, :]
        tl.store(p_m1_out + o_w1, b_m1, mask=m_ed)
        tl.store(p_w1_out + o_w1, b_w1_new, mask=m_ed)

        m_de = m_d[:, None] & m_e[None, :]
        o_w2 = w_base + o_d[:, None] * E + o_e[None, :]
        b_w2 = tl.load(p_w2 + o_w2, mask=m_de, other=0.0)
        b_m2 = beta * tl.load(p_m2 + o_w2, mask=m_de, other=0.0) + b_g2
        b_w2_new = b_w2 - lr * b_m2
        tl.store(p_m2_out + o_w2, b_m2, mask=m_de)
        tl.store(p_w2_out + o_w2, b_w2_new, mask=m_de)


def _config(device: torch.device, C: int, D: int, E: int, gpu: bool | None = None) -> dict:
    """Fixed tiles: tensor-core sized on GPU, the smallest legal dot tiles under the interpreter (``gpu`` overrides
    the device check: bench/triton_resources.py compiles the GPU tiles without a GPU)."""
    if not (device.type == "cuda" if gpu is None else gpu):
        return dict(BLOCK_C=16, BLOCK_D=16 if D <= 16 else 32, BLOCK_E=16 if E <= 16 else 32, num_warps=4)
    block_c = 16 if C <= 16 else (32 if C <= 32 else 64)
    return dict(BLOCK_C=block_c, BLOCK_D=64, BLOCK_E=32, num_warps=4)


def _precision() -> str:
    # fp32 weights: exact fp32 products unless the caller allowed TF32 (torch's own matmul switch)
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def cms_update_kernel(w1, w2, m1, m2, x, delta, lr: float, beta: float, precond: bool):
    """The launcher (inputs contiguous fp32, checked by ``cms_update``): ``(w1_new, w2_new, m1_new, m2_new)``."""
    B, C, D = x.shape
    E = w1.shape[1]
    outs = tuple(torch.empty_like(t) for t in (w1, w2, m1, m2))
    if B * C * D * E == 0:  # nothing to reduce: the momentum decays and the weights follow it
        m1_new, m2_new = beta * m1, beta * m2
        return w1 - lr * m1_new, w2 - lr * m2_new, m1_new, m2_new
    cfg = _config(x.device, C, D, E)
    n_e = triton.cdiv(E, cfg["BLOCK_E"])
    scratch_a = torch.empty(B, C, E, device=x.device, dtype=torch.float32)
    scratch_dh = torch.empty_like(scratch_a)
    scratch_rstd = torch.empty(B, n_e, C, device=x.device, dtype=torch.float32)
    _cms_update_kernel[(B, n_e)](
        x, delta, w1, w2, m1, m2, *outs, scratch_a, scratch_dh, scratch_rstd,
        C, D, E, float(lr), float(beta), RMS_EPS,
        PRECOND=bool(precond), BLOCK_C=cfg["BLOCK_C"], BLOCK_D=cfg["BLOCK_D"], BLOCK_E=cfg["BLOCK_E"],
        PRECISION=_precision(), num_warps=cfg["num_warps"],
    )
    return outs


BACKEND = Backend(OP, "triton", priority=20, kernel=cms_update_kernel, runs_on=triton_runs_on, env="HOPE_USE_TRITON")
