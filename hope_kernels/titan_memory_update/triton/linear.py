"""Triton state pass of the linear memory M(x) = W x, rules ``titans`` and ``dgd``, forward and backward.

Two kernels carry the state, one program per (value block, batch * head), looping over chunks with W and S [BV, Dk]
on chip (the chunk terms come from ``chunk.chunk_terms``; docs/kernels/titan_memory.md, "kernel split"):

- ``_linear_fwd_kernel``: outputs and the final state; in the backward pass it is re-run to store the chunk-start
  states (nothing but the inputs is kept between forward and backward).
- ``_linear_bwd_kernel``: walks the chunks in reverse with the gradient of the state on chip and writes the
  gradients of q, k, k^, v, every chunk term and the initial state. Gradients that sum over the value dimension are
  written per value block and summed afterwards (no atomics).

``rows`` is read at offsets ``i * C`` for the per-token weights in ``chunk.ROW_NAMES`` order (Bc, c, Bp, cp, wg, wp,
wb), ``ends`` at 0, 1, 2 for B_L, c_L, A_L.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hope_kernels.titan_memory_update.chunk import ROW_NAMES
from hope_kernels.titan_memory_update.triton import launch
from hope_kernels.titan_memory_update.triton.launch import LAST_KERNELS, TUNING

N_ROWS = len(ROW_NAMES)


@triton.jit
def _linear_fwd_kernel(
    p_q, p_k, p_kh, p_v, p_aqk, p_akk, p_tinv, p_aqw, p_vec, p_end, p_w0, p_s0,
    p_o, p_wT, p_sT, p_states,
    T, Tp, NC, C, Dk, Dv,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DGD: tl.constexpr,
    WRITE_OUT: tl.constexpr, STORE_STATES: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < Dk
    m_v = o_v < Dv
    m_state = m_v[:, None] & m_k[None, :]
    o_state = i_bh * Dv * Dk + o_v[:, None] * Dk + o_k[None, :]
    b_W = tl.load(p_w0 + o_state, mask=m_state, other=0.0).to(tl.float32)
    b_S = tl.load(p_s0 + o_state, mask=m_state, other=0.0).to(tl.float32)
    for i_c in range(0, NC):
        t0 = i_c * C
        m_t = (o_t < C) & (t0 + o_t < T)
        m_tt = m_t[:, None] & m_t[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        if STORE_STATES:
            o_st = (i_bh * NC + i_c) * 2 * Dv * Dk + o_v[:, None] * Dk + o_k[None, :]
            tl.store(p_states + o_st, b_W, mask=m_state)
            tl.store(p_states + o_st + Dv * Dk, b_S, mask=m_state)
        o_tk = i_bh * T * Dk + (t0 + o_t)[:, None] * Dk + o_k[None, :]
        o_tv = i_bh * T * Dv + (t0 + o_t)[:, None] * Dv + o_v[None, :]
        o_tt = (i_bh * NC + i_c) * C * C + o_t[:, None] * C + o_t[None, :]
        o_vec = (i_bh * NC + i_c) * 7 * C + o_t  # 7 rows: ROW_NAMES
        o_end = (i_bh * NC + i_c) * 3
        b_k = tl.load(p_k + o_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(p_v + o_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_wg = tl.load(p_vec + o_vec + 4 * C, mask=m_t, other=0.0)
        b_wp = tl.load(p_vec + o_vec + 5 * C, mask=m_t, other=0.0)
        b_BL = tl.load(p_end + o_end)
        b_cL = tl.load(p_end + o_end + 1)
        b_AL = tl.load(p_end + o_end + 2)
        # errors of every token of the chunk at the chunk-start state: E = K W^T - V
        b_E = tl.dot(b_k, tl.trans(b_W), input_precision=PRECISION) - b_v
        if WRITE_OUT:
            b_q = tl.load(p_q + o_tk, mask=m_tk, other=0.0).to(tl.float32)
            b_Bc = tl.load(p_vec + o_vec, mask=m_t, other=0.0)
            b_c = tl.load(p_vec + o_vec + C, mask=m_t, other=0.0)
            b_aqk = tl.load(p_aqk + o_tt, mask=m_tt, other=0.0)
            b_o = (b_Bc[:, None] * tl.dot(b_q, tl.trans(b_W), input_precision=PRECISION)
                   + b_c[:, None] * tl.dot(b_q, tl.trans(b_S), input_precision=PRECISION)
                   - tl.dot(b_aqk, b_E, input_precision=PRECISION))
        b_Wn = b_BL * b_W + b_cL * b_S - tl.dot(tl.trans(b_E * b_wg[:, None]), b_k, input_precision=PRECISION)
        if DGD:
            # pseudo-values w_t = W_{t-1} k^_t by the UT transform: w = (I + M)^-1 R
            o_tkh = i_bh * Tp * Dk + (t0 + o_t)[:, None] * Dk + o_k[None, :]
            b_kh = tl.load(p_kh + o_tkh, mask=m_tk, other=0.0)
            b_Bp = tl.load(p_vec + o_vec + 2 * C, mask=m_t, other=0.0)
            b_cp = tl.load(p_vec + o_vec + 3 * C, mask=m_t, other=0.0)
            b_wb = tl.load(p_vec + o_vec + 6 * C, mask=m_t, other=0.0)
            b_akk = tl.load(p_akk + o_tt, mask=m_tt, other=0.0)
            b_tinv = tl.load(p_tinv + o_tt, mask=m_tt, other=0.0)
            b_R = (b_Bp[:, None] * tl.dot(b_kh, tl.trans(b_W), input_precision=PRECISION)
                   + b_cp[:, None] * tl.dot(b_kh, tl.trans(b_S), input_precision=PRECISION)
                   - tl.dot(b_akk, b_E, input_precision=PRECISION))
            b_w = tl.dot(b_tinv, b_R, input_precision=PRECISION)
            if WRITE_OUT:
                b_aqw = tl.load(p_aqw + o_tt, mask=m_tt, other=0.0)
                b_o -= tl.dot(b_aqw, b_w, input_precision=PRECISION)
            b_Wn -= tl.dot(tl.trans(b_w * b_wb[:, None]), b_kh, input_precision=PRECISION)
        if WRITE_OUT:
            tl.store(p_o + o_tv, b_o.to(p_o.dtype.element_ty), mask=m_tv)
        b_S = b_AL * b_S - tl.dot(tl.trans(b_E * b_wp[:, None]), b_k, input_precision=PRECISION)
        b_W = b_Wn
    tl.store(p_wT + o_state, b_W, mask=m_state)
    tl.store(p_sT + o_state, b_S, mask=m_state)


@triton.jit
def _linear_bwd_kernel(
    p_q, p_k, p_kh, p_v, p_aqk, p_akk, p_tinv, p_aqw, p_vec, p_end, p_states,
    p_do, p_dwT, p_dsT,
    p_dq, p_dk, p_dkh, p_dv, p_daqk, p_dakk, p_dtinv, p_daqw, p_dvec, p_dend, p_dw0, p_ds0,
    T, Tp, NC, C, Dk, Dv, B_H,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DGD: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < Dk
    m_v = o_v < Dv
    m_state = m_v[:, None] & m_k[None, :]
    o_state = i_bh * Dv * Dk + o_v[:, None] * Dk + o_k[None, :]
    # gradient of the state after the current chunk (starts as that of the final state)
    b_dW = tl.load(p_dwT + o_state, mask=m_state, other=0.0)
    b_dS = tl.load(p_dsT + o_state, mask=m_state, other=0.0)
    # partial (per value block) outputs live at i_v * (size of one copy)
    part_tk = i_v * B_H * Tp * Dk
    part_tt = i_v * B_H * NC * C * C
    part_vec = i_v * B_H * NC * 7 * C
    part_end = i_v * B_H * NC * 3
    for i_r in range(0, NC):
        i_c = NC - 1 - i_r
        t0 = i_c * C
        m_t = (o_t < C) & (t0 + o_t < T)
        m_tt = m_t[:, None] & m_t[None, :]
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        o_st = (i_bh * NC + i_c) * 2 * Dv * Dk + o_v[:, None] * Dk + o_k[None, :]
        b_W = tl.load(p_states + o_st, mask=m_state, other=0.0)
        b_S = tl.load(p_states + o_st + Dv * Dk, mask=m_state, other=0.0)
        o_tk = i_bh * T * Dk + (t0 + o_t)[:, None] * Dk + o_k[None, :]
        o_tkp = i_bh * Tp * Dk + (t0 + o_t)[:, None] * Dk + o_k[None, :]
        o_tv = i_bh * T * Dv + (t0 + o_t)[:, None] * Dv + o_v[None, :]
        o_tt = (i_bh * NC + i_c) * C * C + o_t[:, None] * C + o_t[None, :]
        o_vec = (i_bh * NC + i_c) * 7 * C + o_t  # 7 rows: ROW_NAMES
        o_end = (i_bh * NC + i_c) * 3
        b_q = tl.load(p_q + o_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(p_k + o_tk, mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(p_v + o_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_do = tl.load(p_do + o_tv, mask=m_tv, other=0.0).to(tl.float32)
        b_aqk = tl.load(p_aqk + o_tt, mask=m_tt, other=0.0)
        b_Bc = tl.load(p_vec + o_vec, mask=m_t, other=0.0)
        b_c = tl.load(p_vec + o_vec + C, mask=m_t, other=0.0)
        b_wg = tl.load(p_vec + o_vec + 4 * C, mask=m_t, other=0.0)
        b_wp = tl.load(p_vec + o_vec + 5 * C, mask=m_t, other=0.0)
        b_BL = tl.load(p_end + o_end)
        b_cL = tl.load(p_end + o_end + 1)
        b_AL = tl.load(p_end + o_end + 2)

        b_E = tl.dot(b_k, tl.trans(b_W), input_precision=PRECISION) - b_v
        b_QW = tl.dot(b_q, tl.trans(b_W), input_precision=PRECISION)
        b_QS = tl.dot(b_q, tl.trans(b_S), input_precision=PRECISION)
        b_kdW = tl.dot(b_k, tl.trans(b_dW), input_precision=PRECISION)  # row i: dW_L k_i
        b_kdS = tl.dot(b_k, tl.trans(b_dS), input_precision=PRECISION)
        # titans part: O = diag(Bc) Q W^T + diag(c) Q S^T - Aqk E; W_L, S_L as in the forward kernel
        b_dE = (-tl.dot(tl.trans(b_aqk), b_do, input_precision=PRECISION)
                - b_wg[:, None] * b_kdW - b_wp[:, None] * b_kdS)
        b_daqk = -tl.dot(b_do, tl.trans(b_E), input_precision=PRECISION)
        b_dBc = tl.sum(b_do * b_QW, axis=1)
        b_dc = tl.sum(b_do * b_QS, axis=1)
        b_dwg = -tl.sum(b_E * b_kdW, axis=1)
        b_dwp = -tl.sum(b_E * b_kdS, axis=1)
        b_dBL = tl.sum(tl.sum(b_dW * b_W, axis=1), axis=0)
        b_dcL = tl.sum(tl.sum(b_dW * b_S, axis=1), axis=0)
        b_dAL = tl.sum(tl.sum(b_dS * b_S, axis=1), axis=0)
        b_dq = (b_Bc[:, None] * tl.dot(b_do, b_W, input_precision=PRECISION)
                + b_c[:, None] * tl.dot(b_do, b_S, input_precision=PRECISION))
        b_dk = (-tl.dot(b_E * b_wg[:, None], b_dW, input_precision=PRECISION)
                - tl.dot(b_E * b_wp[:, None], b_dS, input_precision=PRECISION))
        b_dW0 = tl.dot(tl.trans(b_do * b_Bc[:, None]), b_q, input_precision=PRECISION) + b_BL * b_dW
        b_dS0 = (tl.dot(tl.trans(b_do * b_c[:, None]), b_q, input_precision=PRECISION)
                 + b_cL * b_dW + b_AL * b_dS)
        if DGD:
            b_kh = tl.load(p_kh + o_tkp, mask=m_tk, other=0.0)
            b_Bp = tl.load(p_vec + o_vec + 2 * C, mask=m_t, other=0.0)
            b_cp = tl.load(p_vec + o_vec + 3 * C, mask=m_t, other=0.0)
            b_wb = tl.load(p_vec + o_vec + 6 * C, mask=m_t, other=0.0)
            b_akk = tl.load(p_akk + o_tt, mask=m_tt, other=0.0)
            b_tinv = tl.load(p_tinv + o_tt, mask=m_tt, other=0.0)
            b_aqw = tl.load(p_aqw + o_tt, mask=m_tt, other=0.0)
            b_KhW = tl.dot(b_kh, tl.trans(b_W), input_precision=PRECISION)
            b_KhS = tl.dot(b_kh, tl.trans(b_S), input_precision=PRECISION)
            b_R = b_Bp[:, None] * b_KhW + b_cp[:, None] * b_KhS - tl.dot(b_akk, b_E, input_precision=PRECISION)
            b_w = tl.dot(b_tinv, b_R, input_precision=PRECISION)
            b_khdW = tl.dot(b_kh, tl.trans(b_dW), input_precision=PRECISION)
            # O -= Aqw w and W_L -= w^T diag(wb) K^
            b_dw = -tl.dot(tl.trans(b_aqw), b_do, input_precision=PRECISION) - b_wb[:, None] * b_khdW
            b_daqw = -tl.dot(b_do, tl.trans(b_w), input_precision=PRECISION)
            b_dwb = -tl.sum(b_w * b_khdW, axis=1)
            b_dkh = -tl.dot(b_w * b_wb[:, None], b_dW, input_precision=PRECISION)
            # w = Tinv R
            b_dR = tl.dot(tl.trans(b_tinv), b_dw, input_precision=PRECISION)
            b_dtinv = tl.dot(b_dw, tl.trans(b_R), input_precision=PRECISION)
            # R = diag(Bp) K^ W^T + diag(cp) K^ S^T - Akk E
            b_dBp = tl.sum(b_dR * b_KhW, axis=1)
            b_dcp = tl.sum(b_dR * b_KhS, axis=1)
            b_dkh += (b_Bp[:, None] * tl.dot(b_dR, b_W, input_precision=PRECISION)
                      + b_cp[:, None] * tl.dot(b_dR, b_S, input_precision=PRECISION))
            b_dW0 += tl.dot(tl.trans(b_dR * b_Bp[:, None]), b_kh, input_precision=PRECISION)
            b_dS0 += tl.dot(tl.trans(b_dR * b_cp[:, None]), b_kh, input_precision=PRECISION)
            b_dakk = -tl.dot(b_dR, tl.trans(b_E), input_precision=PRECISION)
            b_dE -= tl.dot(tl.trans(b_akk), b_dR, input_precision=PRECISION)
            tl.store(p_dkh + part_tk + o_tkp, b_dkh, mask=m_tk)
            tl.store(p_daqw + part_tt + o_tt, b_daqw, mask=m_tt)
            tl.store(p_dtinv + part_tt + o_tt, b_dtinv, mask=m_tt)
            tl.store(p_dakk + part_tt + o_tt, b_dakk, mask=m_tt)
            tl.store(p_dvec + part_vec + o_vec + 2 * C, b_dBp, mask=m_t)
            tl.store(p_dvec + part_vec + o_vec + 3 * C, b_dcp, mask=m_t)
            tl.store(p_dvec + part_vec + o_vec + 6 * C, b_dwb, mask=m_t)
        # E = K W^T - V
        b_dk += tl.dot(b_dE, b_W, input_precision=PRECISION)
        b_dW0 += tl.dot(tl.trans(b_dE), b_k, input_precision=PRECISION)
        tl.store(p_dv + o_tv, (-b_dE).to(p_dv.dtype.element_ty), mask=m_tv)
        tl.store(p_dq + part_tk + o_tkp, b_dq, mask=m_tk)
        tl.store(p_dk + part_tk + o_tkp, b_dk, mask=m_tk)
        tl.store(p_daqk + part_tt + o_tt, b_daqk, mask=m_tt)
        tl.store(p_dvec + part_vec + o_vec, b_dBc, mask=m_t)
        tl.store(p_dvec + part_vec + o_vec + C, b_dc, mask=m_t)
        tl.store(p_dvec + part_vec + o_vec + 4 * C, b_dwg, mask=m_t)
        tl.store(p_dvec + part_vec + o_vec + 5 * C, b_dwp, mask=m_t)
        tl.store(p_dend + part_end + o_end, b_dBL)
        tl.store(p_dend + part_end + o_end + 1, b_dcL)
        tl.store(p_dend + part_end + o_end + 2, b_dAL)
        b_dW = b_dW0
        b_dS = b_dS0
    tl.store(p_dw0 + o_state, b_dW, mask=m_state)
    tl.store(p_ds0 + o_state, b_dS, mask=m_state)


def _blocks(C: int, Dk: int, Dv: int, backward: bool = False, dgd: bool = False) -> tuple[int, int, int]:
    """(BT, BK, BV): tl.dot needs every dimension >= 16. The state tiles [BV, BK] fp32 stay in registers
    (forward: W, S; backward: W, S, dW, dS), so BV shrinks as Dk grows."""
    BT = max(16, triton.next_power_of_2(C))
    BK = max(16, triton.next_power_of_2(Dk))
    cap = TUNING["bwd_bv"] if backward else TUNING["fwd_bv"]
    if BK > 64:
        cap = min(cap, 32)
    if backward and dgd and BK > 64 and BT > 32:
        # compiled for sm_90 (bench/triton_resources.py, Triton 3.6): 264 KiB of shared memory at BV 32, the
        # H100 has 227 KiB (it failed there); 204 KiB at BV 16
        cap = min(cap, 16)
    BV = max(16, min(cap, triton.next_power_of_2(Dv)))
    return BT, BK, BV


#: the largest key head dim the linear kernels take (their [C, Dk] tiles and [BV, Dk] state tiles stay on chip)
MAX_HEAD_DIM = 128


def why_not(Dk: int, Dv: int, chunk_size: int, rule: str, backward: bool) -> str | None:
    """None when the Triton kernels run this call, else why not (the dispatcher's per-shape check).

    Every launch at Dk <= 128 fits an H100 (bench/triton_resources.py; the dgd backward at Dk > 64, C 64 once
    asked for 264 KiB there and now runs value blocks of 16, 204 KiB: ``_blocks``)."""
    if Dk > MAX_HEAD_DIM:
        return f"takes Dk <= {MAX_HEAD_DIM} (its [C, Dk] tiles stay on chip), got Dk={Dk}"
    return None


def _launch_options(dgd: bool) -> dict:
    opts = {"num_warps": TUNING["num_warps"]}
    # dgd loads four [C, C] score tiles per chunk: Triton's default 3-stage pipelining of the chunk loop asked
    # for 339 KiB of shared memory on the H100 (227 KiB there), so dgd runs unpipelined unless tuned otherwise
    stages = TUNING["dgd_num_stages"] if dgd and TUNING["num_stages"] is None else TUNING["num_stages"]
    if stages is not None:
        opts["num_stages"] = stages
    return opts


def _run_fwd(q, k, v, terms, state, C, write_out, store_states):
    kh, aqk, _gth, akk, tinv, aqw, rows, ends = terms
    W0, S0 = state
    dgd = kh.numel() > 0
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    NC = rows.shape[2]
    Tp = NC * C
    BT, BK, BV = _blocks(C, Dk, Dv)
    dev = q.device
    out = launch.empty(B, H, T, Dv, device=dev, dtype=q.dtype) if write_out else q.new_empty(0)
    WT = launch.empty(B, H, Dv, Dk, device=dev, dtype=torch.float32)
    ST = launch.empty(B, H, Dv, Dk, device=dev, dtype=torch.float32)
    states = (launch.empty(B, H, NC, 2, Dv, Dk, device=dev, dtype=torch.float32) if store_states
              else WT.new_empty(0))
    grid = (triton.cdiv(Dv, BV), B * H)
    LAST_KERNELS["fwd"] = _linear_fwd_kernel[grid](
        q, k, kh if dgd else k, v, aqk, akk if dgd else aqk, tinv if dgd else aqk, aqw if dgd else aqk,
        rows, ends, W0, S0, out, WT, ST, states,
        T, Tp, NC, C, Dk, Dv,
        BT=BT, BK=BK, BV=BV, DGD=dgd, WRITE_OUT=write_out, STORE_STATES=store_states,
        PRECISION=launch.precision(q.dtype), **_launch_options(dgd),
    )
    return out, WT, ST, states


def forward(q, k, v, terms, state, chunk_size):
    """[out, W_T, S_T] (the kernel contract of ``chunk.py``)."""
    out, WT, ST, _ = _run_fwd(q, k, v, terms, state, chunk_size, write_out=True, store_states=False)
    return [out, WT, ST]


def backward(grads, q, k, v, terms, state, chunk_size):
    """[dq, dk, dv, *dterms, dW0, dS0] (the kernel contract of ``chunk.py``)."""
    do, dWT, dST = grads
    kh, aqk, gth, akk, tinv, aqw, rows, ends = terms
    dgd = kh.numel() > 0
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    NC = rows.shape[2]
    C = chunk_size
    Tp = NC * C
    BT, BK, BV = _blocks(C, Dk, Dv, backward=True, dgd=dgd)
    NV = triton.cdiv(Dv, BV)
    dev = q.device
    # recompute the chunk-start states (the forward pass kept only its inputs)
    *_, states = _run_fwd(q, k, v, terms, state, C, write_out=False, store_states=True)
    f32 = dict(device=dev, dtype=torch.float32)
    dq = torch.zeros(NV, B, H, Tp, Dk, **f32)
    dk = torch.zeros_like(dq)
    dkh = torch.zeros_like(dq) if dgd else dq.new_empty(0)
    dv = launch.empty(B, H, T, Dv, device=dev, dtype=v.dtype)
    dmat = lambda: torch.zeros(NV, B, H, NC, C, C, **f32)  # noqa: E731
    daqk = dmat()
    dakk, dtinv, daqw = (dmat(), dmat(), dmat()) if dgd else (daqk.new_empty(0) for _ in range(3))
    drows = torch.zeros(NV, B, H, NC, N_ROWS, C, **f32)
    dends = torch.zeros(NV, B, H, NC, 3, **f32)
    dW0 = launch.empty(B, H, Dv, Dk, **f32)
    dS0 = launch.empty(B, H, Dv, Dk, **f32)
    LAST_KERNELS["bwd"] = _linear_bwd_kernel[(NV, B * H)](
        q, k, kh if dgd else k, v, aqk, akk if dgd else aqk, tinv if dgd else aqk, aqw if dgd else aqk,
        rows, ends, states, do, dWT, dST,
        dq, dk, dkh if dgd else dq, dv, daqk, dakk if dgd else daqk, dtinv if dgd else daqk,
        daqw if dgd else daqk, drows, dends, dW0, dS0,
        T, Tp, NC, C, Dk, Dv, B * H,
        BT=BT, BK=BK, BV=BV, DGD=dgd, PRECISION=launch.precision(q.dtype), **_launch_options(dgd),
    )
    red = lambda x: x.sum(0) if x.numel() else x  # noqa: E731  (sum the per-value-block partials)
    dq = red(dq)[:, :, :T].to(q.dtype).contiguous()
    dk = red(dk)[:, :, :T].to(k.dtype).contiguous()
    return [dq, dk, dv, red(dkh), red(daqk), gth.new_empty(0), red(dakk), red(dtinv), red(daqw), red(drows),
            red(dends), dW0, dS0]
