"""Triton kernels of the mlp memory's state pass, M(x) = x + W1 gelu(W2 x), rules ``titans`` and ``dgd``.

The math is tests/kernels/titan_oracle.py's ``mlp_state_pass`` (docs/kernels/titan_memory.md, "mlp memory in
Triton"); the launchers follow the kernels. One program per (batch, head) walks
the chunks; the state W1, S1 [D, E], W2, S2 [E, D] (4 D E fp32, too large for registers at E = 2-4 D) lives in a
per-(b, h) working copy in global memory (L2-resident) and is visited in tiles of BE hidden units. Everything in a
chunk is separable over the hidden units except two sums over E: the errors Err = K + gelu(K W2^T) W1^T - V and the
score Z = gelu(Hq) gelu(Hk)^T of the W1 read-out, so the forward makes two passes over the E tiles per chunk
(errors; then reads, score and the in-place state update) and the backward four (errors; score; dErr; the rest).
Per-tile intermediates are recomputed in each pass (``_mlp_tile``), never stored. ``tl.debug_barrier`` separates
a tile's loads from its in-place store and one pass from the next: a store by one thread must not overtake a load
of the same element by another.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hope_kernels.titan_memory_update.chunk import ROW_NAMES
from hope_kernels.titan_memory_update.triton import launch
from hope_kernels.titan_memory_update.triton.launch import LAST_KERNELS, TUNING

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))


@triton.jit
def _gelu_grad(x):
    """gelu'(x) = Phi(x) + x phi(x)."""
    return 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2)) + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI


@triton.jit
def _gelu_grad2(x):
    """gelu''(x) = phi(x) (2 - x^2)."""
    return tl.exp(-0.5 * x * x) * _INV_SQRT_2PI * (2.0 - x * x)


@triton.jit
def _mlp_tile(b_q, b_k, b_kh, b_err, b_w1, b_w2, b_s2, b_aqk, b_akk, b_tinv, b_aqw, b_Bc, b_c, b_Bp, b_cp,
              DGD: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of hidden units at the chunk-start state: Hk = K W2^T, A = gelu(Hk), U = Err W1, G = U gelu'(Hk),
    [dgd: R, w = Tinv R], Hq, Aq = gelu(Hq); also Q W2^T, Q S2^T, K^ W2^T, K^ S2^T (their gradients need them)."""
    b_hk = tl.dot(b_k, tl.trans(b_w2), input_precision=PRECISION)
    b_a = _gelu(b_hk)
    b_u = tl.dot(b_err, b_w1, input_precision=PRECISION)
    b_g = b_u * _gelu_grad(b_hk)
    b_qw2 = tl.dot(b_q, tl.trans(b_w2), input_precision=PRECISION)
    b_qs2 = tl.dot(b_q, tl.trans(b_s2), input_precision=PRECISION)
    b_hq = b_Bc[:, None] * b_qw2 + b_c[:, None] * b_qs2 - tl.dot(b_aqk, b_g, input_precision=PRECISION)
    b_khw2 = b_hk
    b_khs2 = b_hk
    b_r = b_hk
    b_w = b_hk
    if DGD:
        # pseudo-values w_t = W2_{t-1} k^_t by the UT transform (as the linear kernel, errors -> G)
        b_khw2 = tl.dot(b_kh, tl.trans(b_w2), input_precision=PRECISION)
        b_khs2 = tl.dot(b_kh, tl.trans(b_s2), input_precision=PRECISION)
        b_r = b_Bp[:, None] * b_khw2 + b_cp[:, None] * b_khs2 - tl.dot(b_akk, b_g, input_precision=PRECISION)
        b_w = tl.dot(b_tinv, b_r, input_precision=PRECISION)
        b_hq -= tl.dot(b_aqw, b_w, input_precision=PRECISION)
    b_aq = _gelu(b_hq)
    return b_hk, b_a, b_u, b_g, b_r, b_w, b_hq, b_aq, b_qw2, b_qs2, b_khw2, b_khs2


@triton.jit
def _chunk_offsets(i_bh, i_c, T, Tp, NC, C, D, E, o_t, o_d, m_d):
    """Masks and offsets of chunk i_c of (b, h) i_bh: valid rows, [C, C] / [C, D] masks, token rows in [T, D] and
    padded [Tp, D] tensors, the [C, C] terms, vec rows, end scalars and the chunk's stored state [4, D E]."""
    t0 = i_c * C
    m_t = (o_t < C) & (t0 + o_t < T)
    m_tt = m_t[:, None] & m_t[None, :]
    m_td = m_t[:, None] & m_d[None, :]
    o_td = i_bh * T * D + (t0 + o_t)[:, None] * D + o_d[None, :]
    o_tdp = i_bh * Tp * D + (t0 + o_t)[:, None] * D + o_d[None, :]
    o_tt = (i_bh * NC + i_c) * C * C + o_t[:, None] * C + o_t[None, :]
    o_vec = (i_bh * NC + i_c) * 7 * C + o_t
    o_end = (i_bh * NC + i_c) * 3
    o_st = (i_bh * NC + i_c) * 4 * D * E
    return m_t, m_tt, m_td, o_td, o_tdp, o_tt, o_vec, o_end, o_st


@triton.jit
def _chunk_inputs(p_q, p_k, p_kh, p_v, p_aqk, p_akk, p_tinv, p_aqw, p_vec, o_td, o_tdp, o_tt, o_vec, m_t, m_td, m_tt, C,
                  DGD: tl.constexpr, VOLATILE: tl.constexpr = False):
    """The chunk's tokens (fp32) and state-independent terms; without DGD its terms are stand-ins, never read.
    VOLATILE inside a tile loop: the compiler would hoist plain loads out of the loop, and with them their dot operands'
    shared-memory copies, which then stay allocated across the whole loop beside every tile's own."""
    b_q = tl.load(p_q + o_td, mask=m_td, other=0.0, volatile=VOLATILE).to(tl.float32)
    b_k = tl.load(p_k + o_td, mask=m_td, other=0.0, volatile=VOLATILE).to(tl.float32)
    b_v = tl.load(p_v + o_td, mask=m_td, other=0.0, volatile=VOLATILE).to(tl.float32)
    b_aqk = tl.load(p_aqk + o_tt, mask=m_tt, other=0.0, volatile=VOLATILE)
    b_Bc = tl.load(p_vec + o_vec, mask=m_t, other=0.0, volatile=VOLATILE)
    b_c = tl.load(p_vec + o_vec + C, mask=m_t, other=0.0, volatile=VOLATILE)
    b_wg = tl.load(p_vec + o_vec + 4 * C, mask=m_t, other=0.0, volatile=VOLATILE)
    b_wp = tl.load(p_vec + o_vec + 5 * C, mask=m_t, other=0.0, volatile=VOLATILE)
    b_kh = b_k
    b_akk = b_aqk
    b_tinv = b_aqk
    b_aqw = b_aqk
    b_Bp = b_Bc
    b_cp = b_c
    b_wb = b_wg
    if DGD:
        b_kh = tl.load(p_kh + o_tdp, mask=m_td, other=0.0, volatile=VOLATILE)
        b_akk = tl.load(p_akk + o_tt, mask=m_tt, other=0.0, volatile=VOLATILE)
        b_tinv = tl.load(p_tinv + o_tt, mask=m_tt, other=0.0, volatile=VOLATILE)
        b_aqw = tl.load(p_aqw + o_tt, mask=m_tt, other=0.0, volatile=VOLATILE)
        b_Bp = tl.load(p_vec + o_vec + 2 * C, mask=m_t, other=0.0, volatile=VOLATILE)
        b_cp = tl.load(p_vec + o_vec + 3 * C, mask=m_t, other=0.0, volatile=VOLATILE)
        b_wb = tl.load(p_vec + o_vec + 6 * C, mask=m_t, other=0.0, volatile=VOLATILE)
    return b_q, b_k, b_v, b_aqk, b_Bc, b_c, b_wg, b_wp, b_kh, b_akk, b_tinv, b_aqw, b_Bp, b_cp, b_wb


@triton.jit
def _state_tiles(p_w1, p_w2, p_s1, p_s2, e0, o_d, o_e, m_d, D, E):
    """Hidden units e0 .. e0 + BE of a state: W1, S1 [D, E] and W2, S2 [E, D] tiles, with their offsets and masks."""
    m_e = e0 + o_e < E
    o_de = o_d[:, None] * E + (e0 + o_e)[None, :]
    o_ed = (e0 + o_e)[:, None] * D + o_d[None, :]
    m_de = m_d[:, None] & m_e[None, :]
    m_ed = m_e[:, None] & m_d[None, :]
    b_w1 = tl.load(p_w1 + o_de, mask=m_de, other=0.0)
    b_w2 = tl.load(p_w2 + o_ed, mask=m_ed, other=0.0)
    b_s1 = tl.load(p_s1 + o_de, mask=m_de, other=0.0)
    b_s2 = tl.load(p_s2 + o_ed, mask=m_ed, other=0.0)
    return o_de, o_ed, m_de, m_ed, b_w1, b_w2, b_s1, b_s2


@triton.jit
def _tile_cotangents(b_do, b_dz, b_k, b_kh, b_a, b_hq, b_w1, b_s1, b_aqk, b_aqw, b_Bc, b_c, b_wg, b_wp, b_wb,
                     p_dw1, p_dw2, p_ds1, p_ds2, o_de, o_ed, m_de, m_ed,
                     READOUT: tl.constexpr, DGD: tl.constexpr, PRECISION: tl.constexpr):
    """What flows into one tile of hidden units from the backward's cotangent: the read-out's (dO, dZ) or the
    update's (the end-of-chunk state gradient dW1', dW2', dS1', dS2', loaded here): dHq (read-out), dG before the
    UT correction, dw (dgd), and the products the caller reuses. Stand-ins fill what the other mode has."""
    b_dhq = b_a
    b_dw = b_a
    b_dow1 = b_a
    b_dos1 = b_a
    b_dw1 = b_w1
    b_ds1 = b_w1
    b_kdw2 = b_a
    b_kds2 = b_a
    b_khdw2 = b_a
    if READOUT:
        b_dow1 = tl.dot(b_do, b_w1, input_precision=PRECISION)
        b_dos1 = tl.dot(b_do, b_s1, input_precision=PRECISION)
        b_dhq = (b_Bc[:, None] * b_dow1 + b_c[:, None] * b_dos1
                 + tl.dot(b_dz, b_a, input_precision=PRECISION)) * _gelu_grad(b_hq)
        b_dg = -tl.dot(tl.trans(b_aqk), b_dhq, input_precision=PRECISION)
        if DGD:
            b_dw = -tl.dot(tl.trans(b_aqw), b_dhq, input_precision=PRECISION)
        b_dw2 = tl.trans(b_w1)
        b_ds2 = b_dw2
    else:
        b_dw1 = tl.load(p_dw1 + o_de, mask=m_de, other=0.0)
        b_ds1 = tl.load(p_ds1 + o_de, mask=m_de, other=0.0)
        b_dw2 = tl.load(p_dw2 + o_ed, mask=m_ed, other=0.0)
        b_ds2 = tl.load(p_ds2 + o_ed, mask=m_ed, other=0.0)
        b_kdw2 = tl.dot(b_k, tl.trans(b_dw2), input_precision=PRECISION)
        b_kds2 = tl.dot(b_k, tl.trans(b_ds2), input_precision=PRECISION)
        b_dg = -b_wg[:, None] * b_kdw2 - b_wp[:, None] * b_kds2
        if DGD:
            b_khdw2 = tl.dot(b_kh, tl.trans(b_dw2), input_precision=PRECISION)
            b_dw = -b_wb[:, None] * b_khdw2
    return b_dhq, b_dg, b_dw, b_dow1, b_dos1, b_dw1, b_ds1, b_dw2, b_ds2, b_kdw2, b_kds2, b_khdw2


@triton.jit
def _mlp_fwd_kernel(
    p_q, p_k, p_kh, p_v, p_aqk, p_gth, p_akk, p_tinv, p_aqw, p_vec, p_end,
    p_w1, p_w2, p_s1, p_s2, p_o, p_states,
    T, Tp, NC, C, D, E,
    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, DGD: tl.constexpr,
    UPDATE: tl.constexpr, READOUT: tl.constexpr, STORE_STATES: tl.constexpr, PRECISION: tl.constexpr,
):
    """UPDATE: one program per (b, h) walks the chunks and updates the working state p_w1 .. p_s2 in place (the
    initial state on entry, the final state on exit), storing every chunk-start state in p_states when STORE_STATES.
    READOUT: writes the outputs; without UPDATE one program per (b, h, chunk) reads its chunk-start state from
    p_states (all chunks in parallel)."""
    i_bh = tl.program_id(0).to(tl.int64)  # the [B H, NC, 4, D, E] state buffers can pass 2^31 elements
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    m_d = o_d < D
    o_base = i_bh * D * E
    if UPDATE:
        c_lo = 0
        n_c = NC
    else:
        c_lo = tl.program_id(1)
        n_c = 1
    for i_r in range(0, n_c):
        i_c = c_lo + i_r
        m_t, m_tt, m_td, o_td, o_tdp, o_tt, o_vec, o_end, o_st = _chunk_offsets(i_bh, i_c, T, Tp, NC, C, D, E, o_t,
                                                                                o_d, m_d)
        # where this chunk's start state is read: the working copy (UPDATE) or the stored states
        if UPDATE:
            p_cw1 = p_w1 + o_base
            p_cw2 = p_w2 + o_base
            p_cs1 = p_s1 + o_base
            p_cs2 = p_s2 + o_base
        else:
            p_cw1 = p_states + o_st
            p_cw2 = p_states + o_st + D * E
            p_cs1 = p_states + o_st + 2 * D * E
            p_cs2 = p_states + o_st + 3 * D * E
        b_q, b_k, b_v, b_aqk, b_Bc, b_c, b_wg, b_wp, b_kh, b_akk, b_tinv, b_aqw, b_Bp, b_cp, b_wb = _chunk_inputs(
            p_q, p_k, p_kh, p_v, p_aqk, p_akk, p_tinv, p_aqw, p_vec, o_td, o_tdp, o_tt, o_vec, m_t, m_td, m_tt, C, DGD)
        b_BL = tl.load(p_end + o_end)
        b_cL = tl.load(p_end + o_end + 1)
        b_AL = tl.load(p_end + o_end + 2)

        # pass 1: errors at the chunk-start state, Err = K + gelu(K W2^T) W1^T - V (a sum over E)
        b_err = b_k - b_v
        for e0 in range(0, E, BE):
            o_de, o_ed, m_de, m_ed, b_w1, b_w2, b_s1, b_s2 = _state_tiles(
                p_cw1, p_cw2, p_cs1, p_cs2, e0, o_d, o_e, m_d, D, E)
            b_hk = tl.dot(b_k, tl.trans(b_w2), input_precision=PRECISION)
            b_err += tl.dot(_gelu(b_hk), tl.trans(b_w1), input_precision=PRECISION)

        # pass 2: the read-out's per-tile parts and its score Z = Aq A^T; the state update in place
        b_acc = tl.zeros([BT, BD], dtype=tl.float32)
        b_z = tl.zeros([BT, BT], dtype=tl.float32)
        for e0 in range(0, E, BE):
            o_de, o_ed, m_de, m_ed, b_w1, b_w2, b_s1, b_s2 = _state_tiles(
                p_cw1, p_cw2, p_cs1, p_cs2, e0, o_d, o_e, m_d, D, E)
            b_hk, b_a, b_u, b_g, b_r, b_w, b_hq, b_aq, b_qw2, b_qs2, b_khw2, b_khs2 = _mlp_tile(
                b_q, b_k, b_kh, b_err, b_w1, b_w2, b_s2, b_aqk, b_akk, b_tinv, b_aqw, b_Bc, b_c, b_Bp, b_cp,
                DGD, PRECISION)
            if READOUT:
                b_acc += (b_Bc[:, None] * tl.dot(b_aq, tl.trans(b_w1), input_precision=PRECISION)
                          + b_c[:, None] * tl.dot(b_aq, tl.trans(b_s1), input_precision=PRECISION))
                b_z += tl.dot(b_aq, tl.trans(b_a), input_precision=PRECISION)
            if UPDATE:
                if STORE_STATES:
                    tl.store(p_states + o_st + o_de, b_w1, mask=m_de)
                    tl.store(p_states + o_st + D * E + o_ed, b_w2, mask=m_ed)
                    tl.store(p_states + o_st + 2 * D * E + o_de, b_s1, mask=m_de)
                    tl.store(p_states + o_st + 3 * D * E + o_ed, b_s2, mask=m_ed)
                b_w1n = (b_BL * b_w1 + b_cL * b_s1
                         - tl.dot(tl.trans(b_err), b_a * b_wg[:, None], input_precision=PRECISION))
                b_s1n = b_AL * b_s1 - tl.dot(tl.trans(b_err), b_a * b_wp[:, None], input_precision=PRECISION)
                b_w2n = (b_BL * b_w2 + b_cL * b_s2
                         - tl.dot(tl.trans(b_g * b_wg[:, None]), b_k, input_precision=PRECISION))
                if DGD:
                    b_w2n -= tl.dot(tl.trans(b_w * b_wb[:, None]), b_kh, input_precision=PRECISION)
                b_s2n = b_AL * b_s2 - tl.dot(tl.trans(b_g * b_wp[:, None]), b_k, input_precision=PRECISION)
                tl.debug_barrier()
                tl.store(p_cw1 + o_de, b_w1n, mask=m_de)
                tl.store(p_cs1 + o_de, b_s1n, mask=m_de)
                tl.store(p_cw2 + o_ed, b_w2n, mask=m_ed)
                tl.store(p_cs2 + o_ed, b_s2n, mask=m_ed)
        if UPDATE:
            tl.debug_barrier()
        if READOUT:
            b_gth = tl.load(p_gth + o_tt, mask=m_tt, other=0.0)
            b_o = b_q + b_acc - tl.dot(b_gth * b_z, b_err, input_precision=PRECISION)
            tl.store(p_o + o_td, b_o.to(p_o.dtype.element_ty), mask=m_td)


@triton.jit
def _mlp_bwd_kernel(
    p_q, p_k, p_kh, p_v, p_aqk, p_gth, p_akk, p_tinv, p_aqw, p_vec, p_end, p_states, p_do,
    p_dw1, p_dw2, p_ds1, p_ds2, p_dstates,
    p_dq, p_dk, p_dkh, p_dv, p_dk_r, p_dv_r, p_daqk, p_dgth, p_dakk, p_dtinv, p_daqw, p_dvec, p_dend,
    T, Tp, NC, C, D, E,
    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, DGD: tl.constexpr, READOUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The backward is linear in the cotangents, so it splits into two launches (docs/kernels/titan_memory.md):

    READOUT, one program per (b, h, chunk), all chunks in parallel: what flows from a chunk's outputs dO through its
    read-out, at its chunk-start state (p_states): dq; the read-out's parts of dk, dv (fp32 p_dk_r, p_dv_r), dk^, the
    [C, C] terms and vec rows; and of the chunk-start state (p_dstates, [NC, 4, D E] per (b, h)).
    Otherwise (the update), one program per (b, h) walks the chunks in reverse with the state gradient p_dw1 ..
    p_ds2 in place (that of the final state on entry, of the initial state on exit): what flows through each chunk's
    state update, plus the read-out's state gradient of that chunk; it completes dk, dv, dk^, dtinv, dakk, vec, end.
    """
    i_bh = tl.program_id(0).to(tl.int64)  # the [B H, NC, 4, D, E] state buffers can pass 2^31 elements
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    m_d = o_d < D
    o_base = i_bh * D * E
    if READOUT:
        c_lo = tl.program_id(1)
        n_c = 1
    else:
        c_lo = 0
        n_c = NC
    for i_r in range(0, n_c):
        if READOUT:
            i_c = c_lo
        else:
            i_c = NC - 1 - i_r
        m_t, m_tt, m_td, o_td, o_tdp, o_tt, o_vec, o_end, o_st = _chunk_offsets(i_bh, i_c, T, Tp, NC, C, D, E, o_t,
                                                                                o_d, m_d)
        b_q, b_k, b_v, b_aqk, b_Bc, b_c, b_wg, b_wp, b_kh, b_akk, b_tinv, b_aqw, b_Bp, b_cp, b_wb = _chunk_inputs(
            p_q, p_k, p_kh, p_v, p_aqk, p_akk, p_tinv, p_aqw, p_vec, o_td, o_tdp, o_tt, o_vec, m_t, m_td, m_tt, C, DGD)
        p_cw1 = p_states + o_st  # the chunk-start state W1, W2, S1, S2
        p_cw2 = p_cw1 + D * E
        p_cs1 = p_cw1 + 2 * D * E
        p_cs2 = p_cw1 + 3 * D * E

        # pass 1: errors Err at the chunk-start state
        b_err = b_k - b_v
        for e0 in range(0, E, BE):
            o_de, o_ed, m_de, m_ed, b_w1, b_w2, b_s1, b_s2 = _state_tiles(
                p_cw1, p_cw2, p_cs1, p_cs2, e0, o_d, o_e, m_d, D, E)
            b_hk = tl.dot(b_k, tl.trans(b_w2), input_precision=PRECISION)
            b_err += tl.dot(_gelu(b_hk), tl.trans(b_w1), input_precision=PRECISION)

        if READOUT:
            # Err and dErr are parked in dk_r / dv_r (written for good only at the end) and reloaded in each tile
            # of passes 3 and 4 with the chunk's inputs: held across the passes, their dot operands would keep
            # their shared memory beside every tile's
            tl.store(p_dk_r + o_td, b_err, mask=m_td)
            # pass 2: the score Z = Aq A^T; O = ... - (gth * Z) Err gives dZ, dgth and dErr's first part
            b_do = tl.load(p_do + o_td, mask=m_td, other=0.0).to(tl.float32)
            b_gth = tl.load(p_gth + o_tt, mask=m_tt, other=0.0)
            b_z = tl.zeros([BT, BT], dtype=tl.float32)
            for e0 in range(0, E, BE):
                o_de, o_ed, m_de, m_ed, b_w1, b_w2, b_s1, b_s2 = _state_tiles(
                    p_cw1, p_cw2, p_cs1, p_cs2, e0, o_d, o_e, m_d, D, E)
                b_hk, b_a, b_u, b_g, b_r, b_w, b_hq, b_aq, b_qw2, b_qs2, b_khw2, b_khs2 = _mlp_tile(
                    b_q, b_k, b_kh, b_err, b_w1, b_w2, b_s2, b_aqk, b_akk, b_tinv, b_aqw, b_Bc, b_c, b_Bp, b_cp,
                    DGD, PRECISION)
                b_z += tl.dot(b_aq, tl.trans(b_a), input_precision=PRECISION)
            b_doerr = tl.dot(b_do, tl.trans(b_err), input_precision=PRECISION)  # -dAaa
            b_dz = -b_gth * b_doerr
            tl.store(p_dgth + o_tt, -b_doerr * b_z, mask=m_tt)
            b_derr = -tl.dot(tl.trans(b_gth * b_z), b_do, input_precision=PRECISION)
            tl.debug_barrier()
        else:
            b_BL = tl.load(p_end + o_end)
            b_cL = tl.load(p_end + o_end + 1)
            b_AL = tl.load(p_end + o_end + 2)
            b_do = b_q  # unused: the update's cotangent is the state gradient
            b_dz = b_aqk
            b_derr = tl.zeros([BT, BD], dtype=tl.float32)

        # pass 3: the rest of dErr (a sum over E), through U = Err W1 [and the W1 / S1 updates]
        for e0 in range(0, E, BE):
            b_q, b_k, b_v, b_aqk, b_Bc, b_c, b_wg, b_wp, b_kh, b_akk, b_tinv, b_aqw, b_Bp, b_cp, b_wb = _chunk_inputs(
                p_q, p_k, p_kh, p_v, p_aqk, p_akk, p_tinv, p_aqw, p_vec, o_td, o_tdp, o_tt, o_vec, m_t, m_td, m_tt, C,
                DGD, True)
            if READOUT:
                b_err = tl.load(p_dk_r + o_td, mask=m_td, other=0.0, volatile=True)
                b_do = tl.load(p_do + o_td, mask=m_td, other=0.0, volatile=True).to(tl.float32)
            o_de, o_ed, m_de, m_ed, b_w1, b_w2, b_s1, b_s2 = _state_tiles(
                p_cw1, p_cw2, p_cs1, p_cs2, e0, o_d, o_e, m_d, D, E)
            b_hk, b_a, b_u, b_g, b_r, b_w, b_hq, b_aq, b_qw2, b_qs2, b_khw2, b_khs2 = _mlp_tile(
                b_q, b_k, b_kh, b_err, b_w1, b_w2, b_s2, b_aqk, b_akk, b_tinv, b_aqw, b_Bc, b_c, b_Bp, b_cp,
                DGD, PRECISION)
            b_dhq, b_dg, b_dw, b_dow1, b_dos1, b_dw1, b_ds1, b_dw2, b_ds2, b_kdw2, b_kds2, b_khdw2 = _tile_cotangents(
                b_do, b_dz, b_k, b_kh, b_a, b_hq, b_w1, b_s1, b_aqk, b_aqw, b_Bc, b_c, b_wg, b_wp, b_wb,
                p_dw1 + o_base, p_dw2 + o_base, p_ds1 + o_base, p_ds2 + o_base, o_de, o_ed, m_de, m_ed,
                READOUT, DGD, PRECISION)
            if not READOUT:  # W1' and S1' read A
                b_derr -= (b_wg[:, None] * tl.dot(b_a, tl.trans(b_dw1), input_precision=PRECISION)
                           + b_wp[:, None] * tl.dot(b_a, tl.trans(b_ds1), input_precision=PRECISION))
            if DGD:
                b_dg -= tl.dot(tl.trans(b_akk), tl.dot(tl.trans(b_tinv), b_dw, input_precision=PRECISION),
                               input_precision=PRECISION)
            b_derr += tl.dot(b_dg * _gelu_grad(b_hk), tl.trans(b_w1), input_precision=PRECISION)

        # pass 4: every other gradient, and the chunk-start state's
        if READOUT:
            tl.store(p_dv_r + o_td, -b_derr, mask=m_td)
            tl.debug_barrier()
        b_dk = b_derr
        b_dq = b_do
        b_daqk = tl.zeros([BT, BT], dtype=tl.float32)
        b_daqw = tl.zeros([BT, BT], dtype=tl.float32)
        b_dtinv = tl.zeros([BT, BT], dtype=tl.float32)
        b_dakk = tl.zeros([BT, BT], dtype=tl.float32)
        b_dkh = tl.zeros([BT, BD], dtype=tl.float32)
        b_dv1 = tl.zeros([BT], dtype=tl.float32)  # dBc (read-out) / dwg (update)
        b_dv2 = tl.zeros([BT], dtype=tl.float32)  # dc / dwp
        b_dBp = tl.zeros([BT], dtype=tl.float32)
        b_dcp = tl.zeros([BT], dtype=tl.float32)
        b_dwb = tl.zeros([BT], dtype=tl.float32)
        b_dBL = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
        b_dcL = b_dBL
        b_dAL = b_dBL
        for e0 in range(0, E, BE):
            b_q, b_k, b_v, b_aqk, b_Bc, b_c, b_wg, b_wp, b_kh, b_akk, b_tinv, b_aqw, b_Bp, b_cp, b_wb = _chunk_inputs(
                p_q, p_k, p_kh, p_v, p_aqk, p_akk, p_tinv, p_aqw, p_vec, o_td, o_tdp, o_tt, o_vec, m_t, m_td, m_tt, C,
                DGD, True)
            if READOUT:
                b_err = tl.load(p_dk_r + o_td, mask=m_td, other=0.0, volatile=True)
                b_derr = -tl.load(p_dv_r + o_td, mask=m_td, other=0.0, volatile=True)
                b_do = tl.load(p_do + o_td, mask=m_td, other=0.0, volatile=True).to(tl.float32)
            o_de, o_ed, m_de, m_ed, b_w1, b_w2, b_s1, b_s2 = _state_tiles(
                p_cw1, p_cw2, p_cs1, p_cs2, e0, o_d, o_e, m_d, D, E)
            b_hk, b_a, b_u, b_g, b_r, b_w, b_hq, b_aq, b_qw2, b_qs2, b_khw2, b_khs2 = _mlp_tile(
                b_q, b_k, b_kh, b_err, b_w1, b_w2, b_s2, b_aqk, b_akk, b_tinv, b_aqw, b_Bc, b_c, b_Bp, b_cp,
                DGD, PRECISION)
            b_dhq, b_dg, b_dw, b_dow1, b_dos1, b_dw1, b_ds1, b_dw2, b_ds2, b_kdw2, b_kds2, b_khdw2 = _tile_cotangents(
                b_do, b_dz, b_k, b_kh, b_a, b_hq, b_w1, b_s1, b_aqk, b_aqw, b_Bc, b_c, b_wg, b_wp, b_wb,
                p_dw1 + o_base, p_dw2 + o_base, p_ds1 + o_base, p_ds2 + o_base, o_de, o_ed, m_de, m_ed,
                READOUT, DGD, PRECISION)
            b_da = tl.dot(b_derr, b_w1, input_precision=PRECISION)
            if READOUT:
                if DGD:
                    b_daqw -= tl.dot(b_dhq, tl.trans(b_w), input_precision=PRECISION)
                b_da += tl.dot(tl.trans(b_dz), b_aq, input_precision=PRECISION)
                b_dq += (b_Bc[:, None] * tl.dot(b_dhq, b_w2, input_precision=PRECISION)
                         + b_c[:, None] * tl.dot(b_dhq, b_s2, input_precision=PRECISION))
                b_daqk -= tl.dot(b_dhq, tl.trans(b_g), input_precision=PRECISION)
                b_dv1 += tl.sum(b_dow1 * b_aq, axis=1) + tl.sum(b_dhq * b_qw2, axis=1)
                b_dv2 += tl.sum(b_dos1 * b_aq, axis=1) + tl.sum(b_dhq * b_qs2, axis=1)
            else:
                if DGD:
                    b_dkh -= tl.dot(b_w * b_wb[:, None], b_dw2, input_precision=PRECISION)
                    b_dwb -= tl.sum(b_w * b_khdw2, axis=1)
                b_errdw1 = tl.dot(b_err, b_dw1, input_precision=PRECISION)
                b_errds1 = tl.dot(b_err, b_ds1, input_precision=PRECISION)
                b_da -= b_wg[:, None] * b_errdw1 + b_wp[:, None] * b_errds1
                b_dk -= (tl.dot(b_g * b_wg[:, None], b_dw2, input_precision=PRECISION)
                         + tl.dot(b_g * b_wp[:, None], b_ds2, input_precision=PRECISION))
                b_dv1 -= tl.sum(b_errdw1 * b_a, axis=1) + tl.sum(b_g * b_kdw2, axis=1)
                b_dv2 -= tl.sum(b_errds1 * b_a, axis=1) + tl.sum(b_g * b_kds2, axis=1)
                b_dBL += tl.sum(tl.sum(b_dw1 * b_w1, axis=1), axis=0) + tl.sum(tl.sum(b_dw2 * b_w2, axis=1), axis=0)
                b_dcL += tl.sum(tl.sum(b_dw1 * b_s1, axis=1), axis=0) + tl.sum(tl.sum(b_dw2 * b_s2, axis=1), axis=0)
                b_dAL += tl.sum(tl.sum(b_ds1 * b_s1, axis=1), axis=0) + tl.sum(tl.sum(b_ds2 * b_s2, axis=1), axis=0)
            b_dr = b_dg
            if DGD:  # w = Tinv R, R = diag(Bp) K^ W2^T + diag(cp) K^ S2^T - Akk G
                b_dr = tl.dot(tl.trans(b_tinv), b_dw, input_precision=PRECISION)
                b_dg -= tl.dot(tl.trans(b_akk), b_dr, input_precision=PRECISION)
                b_dkh += (b_Bp[:, None] * tl.dot(b_dr, b_w2, input_precision=PRECISION)
                          + b_cp[:, None] * tl.dot(b_dr, b_s2, input_precision=PRECISION))
                b_dtinv += tl.dot(b_dw, tl.trans(b_r), input_precision=PRECISION)
                b_dakk -= tl.dot(b_dr, tl.trans(b_g), input_precision=PRECISION)
                b_dBp += tl.sum(b_dr * b_khw2, axis=1)
                b_dcp += tl.sum(b_dr * b_khs2, axis=1)
            b_du = b_dg * _gelu_grad(b_hk)
            # Hk = K W2^T feeds A = gelu(Hk) and G = U gelu'(Hk)
            b_dhk = b_da * _gelu_grad(b_hk) + b_dg * b_u * _gelu_grad2(b_hk)
            b_dk += tl.dot(b_dhk, b_w2, input_precision=PRECISION)
            # gradient of the chunk-start state through Err, U, Hk [R], and the read-out (O, Hq) or the update
            b_dw1n = (tl.dot(tl.trans(b_err), b_du, input_precision=PRECISION)
                      + tl.dot(tl.trans(b_derr), b_a, input_precision=PRECISION))
            b_dw2n = tl.dot(tl.trans(b_dhk), b_k, input_precision=PRECISION)
            b_ds2n = tl.zeros([BE, BD], dtype=tl.float32)
            if DGD:
                b_dw2n += tl.dot(tl.trans(b_dr * b_Bp[:, None]), b_kh, input_precision=PRECISION)
                b_ds2n += tl.dot(tl.trans(b_dr * b_cp[:, None]), b_kh, input_precision=PRECISION)
            if READOUT:
                b_dw1n += tl.dot(tl.trans(b_do * b_Bc[:, None]), b_aq, input_precision=PRECISION)
                b_ds1n = tl.dot(tl.trans(b_do * b_c[:, None]), b_aq, input_precision=PRECISION)
                b_dw2n += tl.dot(tl.trans(b_dhq * b_Bc[:, None]), b_q, input_precision=PRECISION)
                b_ds2n += tl.dot(tl.trans(b_dhq * b_c[:, None]), b_q, input_precision=PRECISION)
                tl.store(p_dstates + o_st + o_de, b_dw1n, mask=m_de)
                tl.store(p_dstates + o_st + D * E + o_ed, b_dw2n, mask=m_ed)
                tl.store(p_dstates + o_st + 2 * D * E + o_de, b_ds1n, mask=m_de)
                tl.store(p_dstates + o_st + 3 * D * E + o_ed, b_ds2n, mask=m_ed)
            else:
                # W1' = B_L W1 + c_L S1 - ..., S1' = A_L S1 - ...; plus the read-out's part (its launch ran first)
                b_dw1n += b_BL * b_dw1 + tl.load(p_dstates + o_st + o_de, mask=m_de, other=0.0)
                b_ds1n = (b_cL * b_dw1 + b_AL * b_ds1
                          + tl.load(p_dstates + o_st + 2 * D * E + o_de, mask=m_de, other=0.0))
                b_dw2n += b_BL * b_dw2 + tl.load(p_dstates + o_st + D * E + o_ed, mask=m_ed, other=0.0)
                b_ds2n += (b_cL * b_dw2 + b_AL * b_ds2
                           + tl.load(p_dstates + o_st + 3 * D * E + o_ed, mask=m_ed, other=0.0))
                tl.debug_barrier()
                tl.store(p_dw1 + o_base + o_de, b_dw1n, mask=m_de)
                tl.store(p_ds1 + o_base + o_de, b_ds1n, mask=m_de)
                tl.store(p_dw2 + o_base + o_ed, b_dw2n, mask=m_ed)
                tl.store(p_ds2 + o_base + o_ed, b_ds2n, mask=m_ed)

        if READOUT:
            tl.debug_barrier()
            tl.store(p_dq + o_td, b_dq.to(p_dq.dtype.element_ty), mask=m_td)
            tl.store(p_dk_r + o_td, b_dk, mask=m_td)
            tl.store(p_daqk + o_tt, b_daqk, mask=m_tt)
            tl.store(p_dvec + o_vec, b_dv1, mask=m_t)
            tl.store(p_dvec + o_vec + C, b_dv2, mask=m_t)
            if DGD:
                tl.store(p_daqw + o_tt, b_daqw, mask=m_tt)
                tl.store(p_dkh + o_tdp, b_dkh, mask=m_td)
                tl.store(p_dtinv + o_tt, b_dtinv, mask=m_tt)
                tl.store(p_dakk + o_tt, b_dakk, mask=m_tt)
                tl.store(p_dvec + o_vec + 2 * C, b_dBp, mask=m_t)
                tl.store(p_dvec + o_vec + 3 * C, b_dcp, mask=m_t)
        else:
            tl.debug_barrier()
            b_dk += tl.load(p_dk_r + o_td, mask=m_td, other=0.0)
            b_dv = tl.load(p_dv_r + o_td, mask=m_td, other=0.0) - b_derr
            tl.store(p_dk + o_td, b_dk.to(p_dk.dtype.element_ty), mask=m_td)
            tl.store(p_dv + o_td, b_dv.to(p_dv.dtype.element_ty), mask=m_td)
            tl.store(p_dvec + o_vec + 4 * C, b_dv1, mask=m_t)
            tl.store(p_dvec + o_vec + 5 * C, b_dv2, mask=m_t)
            tl.store(p_dend + o_end, b_dBL)
            tl.store(p_dend + o_end + 1, b_dcL)
            tl.store(p_dend + o_end + 2, b_dAL)
            if DGD:
                b_dkh += tl.load(p_dkh + o_tdp, mask=m_td, other=0.0)
                b_dtinv += tl.load(p_dtinv + o_tt, mask=m_tt, other=0.0)
                b_dakk += tl.load(p_dakk + o_tt, mask=m_tt, other=0.0)
                b_dBp += tl.load(p_dvec + o_vec + 2 * C, mask=m_t, other=0.0)
                b_dcp += tl.load(p_dvec + o_vec + 3 * C, mask=m_t, other=0.0)
                tl.store(p_dkh + o_tdp, b_dkh, mask=m_td)
                tl.store(p_dtinv + o_tt, b_dtinv, mask=m_tt)
                tl.store(p_dakk + o_tt, b_dakk, mask=m_tt)
                tl.store(p_dvec + o_vec + 2 * C, b_dBp, mask=m_t)
                tl.store(p_dvec + o_vec + 3 * C, b_dcp, mask=m_t)
                tl.store(p_dvec + o_vec + 6 * C, b_dwb, mask=m_t)


# ------------------------------------------------------------------------------------------------ launchers
#: the largest chunk size (as its power-of-two tile) the mlp kernels take, per (head-dim tile, rule, backward):
#: every launch compiled for sm_90 (Triton 3.6 as on our H100, and 3.9) needs at most the H100's 227 KiB of shared
#: memory there (bench/triton_resources.py; tests/kernels/test_triton_resources.py keeps it so). Each step up
#: would not fit, e.g. the titans read-out backward at D 128, C 64 on fp32 inputs (exact fp32 products) needs 228 KiB,
#: the dgd one 292 KiB on bf16 inputs.
MLP_MAX_CHUNK = {(64, "titans", False): 64, (64, "titans", True): 64, (64, "dgd", False): 64, (64, "dgd", True): 64,
                 (128, "titans", False): 64, (128, "titans", True): 32, (128, "dgd", False): 32,
                 (128, "dgd", True): 32}
MLP_MAX_HEAD_DIM = 128


def why_not_mlp(D: int, E: int, chunk_size: int, rule: str, backward: bool) -> str | None:
    """None when the mlp kernels run this call, else why not (any hidden width E: it is tiled)."""
    if D > MLP_MAX_HEAD_DIM:
        return f"runs memory='mlp' with D <= {MLP_MAX_HEAD_DIM} (its [C, D] tiles stay on chip), got D={D}"
    cap = MLP_MAX_CHUNK[(max(64, triton.next_power_of_2(D)), rule, backward)]
    if triton.next_power_of_2(chunk_size) <= cap:
        return None
    return (f"runs memory='mlp', rule={rule!r} at D={D} with chunk_size <= {cap}"
            f"{' when a backward is needed' if backward else ''} (larger chunks need more shared memory than an "
            f"H100 has), got chunk_size={chunk_size}")


def _mlp_blocks(C: int, D: int, E: int, backward: bool = False) -> tuple[int, int, int]:
    """(BT, BD, BE): tl.dot needs every dimension >= 16; E is visited in tiles of BE hidden units (fewer in the
    backward's launches, whose tiles keep more [C, D] operands on chip)."""
    BT = max(16, triton.next_power_of_2(C))
    BD = max(16, triton.next_power_of_2(D))
    BE = max(16, min(TUNING["mlp_bwd_be" if backward else "mlp_be"], triton.next_power_of_2(E)))
    return BT, BD, BE


def _mlp_launch_options() -> dict:
    return {"num_warps": TUNING["mlp_num_warps"], "num_stages": TUNING["mlp_num_stages"]}


def _mlp_fused_forward(D: int) -> bool:
    """Whether the forward runs the update and the read-out in one sequential launch (else: the update, then the
    read-out of all chunks in parallel from the stored chunk-start states). The fused launch keeps the read-out's
    tiles on chip beside the update's; compiled for sm_90 (bench/triton_resources.py) it fits an H100's shared
    memory at D <= 64 (176 KiB under dgd at C 64), not at D 128."""
    return TUNING["mlp_fused_fwd"] and D <= 64


def _kernel_terms(terms):
    """The kernels' leading chunk-term arguments (k^ and dgd's terms replaced by a stand-in when absent)."""
    kh, aqk, gth, akk, tinv, aqw, rows, ends = terms
    if kh.numel() == 0:
        return (aqk.new_zeros(1), aqk, gth, aqk, aqk, aqk, rows, ends)
    return (kh, aqk, gth, akk, tinv, aqw, rows, ends)


def _run_fwd(q, k, v, terms, state, C, write_out, store_states):
    """The forward launches: (out, W1_T, W2_T, S1_T, S2_T, chunk-start states or an empty tensor)."""
    kh, aqk, gth, akk, tinv, aqw, rows, ends = _kernel_terms(terms)
    dgd = terms[0].numel() > 0
    B, H, T, D = q.shape
    E = state[0].shape[-1]
    NC = rows.shape[2]
    BT, BD, BE = _mlp_blocks(C, D, E)
    dev = q.device
    fused = write_out and not store_states and _mlp_fused_forward(D)
    store_states = store_states or (write_out and not fused)  # the parallel read-out reads the stored states
    # the kernel updates the state in place: these copies of the initial state end as the final state
    W1T, W2T, S1T, S2T = (x.to(torch.float32, copy=True).contiguous() for x in state)
    out = launch.empty(B, H, T, D, device=dev, dtype=q.dtype) if write_out else q.new_empty(0)
    states = (launch.empty(B, H, NC, 4, D, E, device=dev, dtype=torch.float32) if store_states
              else W1T.new_empty(0))
    common = dict(BT=BT, BD=BD, BE=BE, DGD=dgd, PRECISION=launch.precision(q.dtype), **_mlp_launch_options())
    args = (q, k, kh if dgd else k, v, aqk, gth, akk, tinv, aqw, rows, ends)
    sizes = (T, NC * C, NC, C, D, E)
    LAST_KERNELS["mlp_fwd"] = _mlp_fwd_kernel[(B * H,)](
        *args, W1T, W2T, S1T, S2T, out, states, *sizes,
        UPDATE=True, READOUT=fused, STORE_STATES=store_states, **common)
    if write_out and not fused:
        LAST_KERNELS["mlp_readout"] = _mlp_fwd_kernel[(B * H, NC)](
            *args, W1T, W2T, S1T, S2T, out, states, *sizes,
            UPDATE=False, READOUT=True, STORE_STATES=False, **common)
    return out, W1T, W2T, S1T, S2T, states


def forward(q, k, v, terms, state, chunk_size):
    """[out, W1_T, W2_T, S1_T, S2_T] (the kernel contract of ``chunk.py``)."""
    return list(_run_fwd(q, k, v, terms, state, chunk_size, write_out=True, store_states=False)[:5])


def backward(grads, q, k, v, terms, state, chunk_size):
    """[dq, dk, dv, *dterms, dW1, dW2, dS1, dS2] (the kernel contract of ``chunk.py``): three launches, the
    forward's update (recomputing the chunk-start states), the read-out's backward for all chunks in parallel, then
    the update's backward carrying the state gradient through the chunks in reverse."""
    kh, aqk, gth, akk, tinv, aqw, rows, ends = _kernel_terms(terms)
    dgd = terms[0].numel() > 0
    B, H, T, D = q.shape
    E = state[0].shape[-1]
    NC = rows.shape[2]
    C = chunk_size
    Tp = NC * C
    BT, BD, BE = _mlp_blocks(C, D, E, backward=True)
    dev = q.device
    *_, states = _run_fwd(q, k, v, terms, state, C, write_out=False, store_states=True)
    do = grads[0]
    # the update's backward carries the state gradient in place: copies of the final state's end as the initial's
    dW1, dW2, dS1, dS2 = (x.to(torch.float32, copy=True).contiguous() for x in grads[1:])
    f32 = dict(device=dev, dtype=torch.float32)
    dq = launch.empty(B, H, T, D, device=dev, dtype=q.dtype)
    dk = launch.empty(B, H, T, D, device=dev, dtype=k.dtype)
    dv = launch.empty(B, H, T, D, device=dev, dtype=v.dtype)
    dk_r, dv_r = launch.empty(B, H, T, D, **f32), launch.empty(B, H, T, D, **f32)  # the read-out's parts
    dstates = launch.empty(B, H, NC, 4, D, E, **f32)  # the read-out's gradient of each chunk-start state
    # masked stores skip the padded rows of the last chunk: their gradients are zeros
    dmat = lambda: torch.zeros(B, H, NC, C, C, **f32)  # noqa: E731
    daqk, dgth = dmat(), dmat()
    dkh = torch.zeros(B, H, Tp, D, **f32) if dgd else dq.new_empty(0, dtype=torch.float32)
    dakk, dtinv, daqw = (dmat(), dmat(), dmat()) if dgd else (daqk.new_empty(0) for _ in range(3))
    drows = torch.zeros(B, H, NC, len(ROW_NAMES), C, **f32)
    dends = launch.empty(B, H, NC, 3, **f32)
    args = (q, k, kh if dgd else k, v, aqk, gth, akk, tinv, aqw, rows, ends, states, do, dW1, dW2, dS1, dS2, dstates,
            dq, dk, dkh if dgd else dq, dv, dk_r, dv_r, daqk, dgth, dakk if dgd else daqk, dtinv if dgd else daqk,
            daqw if dgd else daqk, drows, dends, T, Tp, NC, C, D, E)
    common = dict(BT=BT, BD=BD, BE=BE, DGD=dgd, PRECISION=launch.precision(q.dtype), **_mlp_launch_options())
    LAST_KERNELS["mlp_bwd_readout"] = _mlp_bwd_kernel[(B * H, NC)](*args, READOUT=True, **common)
    LAST_KERNELS["mlp_bwd"] = _mlp_bwd_kernel[(B * H,)](*args, READOUT=False, **common)
    return [dq, dk, dv, dkh, daqk, dgth, dakk, dtinv, daqw, drows, dends, dW1, dW2, dS1, dS2]
