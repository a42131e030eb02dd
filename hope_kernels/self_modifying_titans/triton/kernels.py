"""Triton kernels of ``self_modifying_titans`` (docs/kernels/self_modifying_titans.md, "Triton").

Four launches per layer: forward ``_gen_fwd_kernel`` (the generator pass) and ``_mem_fwd_kernel`` (the memory
pass), backward ``_mem_bwd_kernel`` then ``_gen_bwd_kernel``; one program per (b, h) walks its chunks in order
(backward: in reverse). A memory's state W1, S1 [D, E], W2, S2 [E, D] (4 D E fp32, packed in that order) lives in a
per-(b, h) working copy in global memory (L2-resident at small batch) and is visited in tiles of BE hidden units;
everything in a chunk is separable over the hidden units except a few sums over E (the reads, the errors, the
read-out's score), so each chunk makes a fixed number of passes over the tiles. The chunk's decay terms ([BT, BT]
and [BT]) are formed from its gates in registers; their backward is a handful of [BT, BT] products
(``_terms_bwd``). Padded rows of a chunk (t >= L) have lr 0 and keep / momentum 1, and zero tokens, so they change
nothing. ``tl.debug_barrier`` separates a tile's loads from its in-place store and one pass from the next. The
memory pass's backward parks each chunk's constant dot operands in global memory and reloads one at every product
(``_operand``): held in registers, their shared-memory copies outlived every tile loop and overflowed an H100.
"""
from __future__ import annotations

import triton
import triton.language as tl

from hope_kernels.titan_memory_update.triton.mlp import _gelu, _gelu_grad, _gelu_grad2

_NORM_EPS = tl.constexpr(1e-6)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _row(x, o_t, r):
    """Row r of a [BT, N] tile as an [N] vector (zeros when r is outside)."""
    return tl.sum(tl.where(o_t[:, None] == r, x, 0.0), axis=0)


@triton.jit
def _at(x, o_t, r):
    """Element r of a [BT] vector (0 when r is outside)."""
    return tl.sum(tl.where(o_t == r, x, 0.0), axis=0)


@triton.jit
def _l2n(x, m_d):
    """Rows of x / max(||x||, 1e-6) and the norms."""
    n = tl.sqrt(tl.sum(x * x, axis=1))
    return x / tl.maximum(n, _NORM_EPS)[:, None], n


@triton.jit
def _l2n_bwd(y, n, dy):
    p = tl.sum(y * dy, axis=1)
    return tl.where((n > _NORM_EPS)[:, None], (dy - y * p[:, None]) / tl.maximum(n, _NORM_EPS)[:, None],
                    dy / _NORM_EPS)


# ------------------------------------------------------------------------------------------------ decay terms
@triton.jit
def _terms(b_a, b_b, BT: tl.constexpr, PRECISION: tl.constexpr):
    """P[t, i] = prod_{i<j<=t} a_j, Br likewise with b (lower, 1 on the diagonal), G = Br P, A = cumprod a,
    Bk = cumprod b, c = Br A. Masked cumulative products: exact at gates 0 (no logs, no division)."""
    o_t = tl.arange(0, BT)
    low = o_t[:, None] >= o_t[None, :]
    P = tl.where(low, tl.cumprod(tl.where(o_t[:, None] > o_t[None, :], b_a[:, None], 1.0), axis=0), 0.0)
    Br = tl.where(low, tl.cumprod(tl.where(o_t[:, None] > o_t[None, :], b_b[:, None], 1.0), axis=0), 0.0)
    Gd = _mm(Br, P, PRECISION)
    A = tl.cumprod(b_a, axis=0)
    Bk = tl.cumprod(b_b, axis=0)
    c = tl.sum(Br * A[None, :], axis=1)
    return P, Br, Gd, A, Bk, c


@triton.jit
def _shift_down(x, o_t, PRECISION: tl.constexpr):
    """Rows moved down by one: y[t] = x[t-1], y[0] = 0 ([BT, N])."""
    return _mm(tl.where(o_t[:, None] == o_t[None, :] + 1, 1.0, 0.0), x, PRECISION)


@triton.jit
def _shift_up(x, o_t, PRECISION: tl.constexpr):
    """Rows moved up by one: y[t] = x[t+1], y[BT-1] = 0 ([BT, N]); the adjoint of ``_shift_down``."""
    return _mm(tl.where(o_t[:, None] + 1 == o_t[None, :], 1.0, 0.0), x, PRECISION)


@triton.jit
def _shift_vec_up(x, o_t):
    """y[t] = x[t+1], y[BT-1] = 0 ([BT])."""
    return tl.sum(tl.where(o_t[:, None] + 1 == o_t[None, :], x[None, :], 0.0), axis=1)


@triton.jit
def _shift_vec(x, o_t, first):
    """y[t] = x[t-1], y[0] = first ([BT])."""
    prev = tl.sum(tl.where(o_t[:, None] == o_t[None, :] + 1, x[None, :], 0.0), axis=1)
    return tl.where(o_t == 0, first, prev)


@triton.jit
def _prod_grad(X, gX, gV, V, o_t, PRECISION: tl.constexpr):
    """Gradient w.r.t. the gates g of X[t, i] = prod_{i<j<=t} g_j and V_t = prod_{j<=t} g_j: dg_j =
    sum_{i<j} X[j-1, i] (X^T gX)[j, i] + V_{j-1} (X^T gV)_j (the product without factor j, as two partial products)."""
    XtgX = _mm(tl.trans(X), gX, PRECISION)
    Xs = _shift_down(X, o_t, PRECISION)
    strict = o_t[None, :] < o_t[:, None]
    g = tl.sum(tl.where(strict, Xs * XtgX, 0.0), axis=1)
    return g + _shift_vec(V, o_t, 1.0) * tl.sum(X * gV[:, None], axis=0)


@triton.jit
def _terms_bwd(P, Br, A, Bk, gP, gBr, gG, gA, gBk, gc, o_t, m_t, PRECISION: tl.constexpr):
    """(da, db) from the gradients of P, Br, G = Br P, A, Bk, c = Br A (padded rows and columns masked)."""
    m_tt = m_t[:, None] & m_t[None, :]
    gG = tl.where(m_tt, gG, 0.0)
    gc = tl.where(m_t, gc, 0.0)
    gBr = tl.where(m_tt, gBr, 0.0) + _mm(gG, tl.trans(P), PRECISION) + gc[:, None] * A[None, :]
    gP = tl.where(m_tt, gP, 0.0) + _mm(tl.trans(Br), gG, PRECISION)
    gA = tl.where(m_t, gA, 0.0) + tl.sum(Br * gc[:, None], axis=0)
    gBk = tl.where(m_t, gBk, 0.0)
    return _prod_grad(P, gP, gA, A, o_t, PRECISION), _prod_grad(Br, gBr, gBk, Bk, o_t, PRECISION)


# ------------------------------------------------------------------------------------------------ state tiles
@triton.jit
def _tile_offsets(e0, o_d, o_e, m_d, D, E):
    m_e = e0 + o_e < E
    o_de = o_d[:, None] * E + (e0 + o_e)[None, :]
    o_ed = (e0 + o_e)[:, None] * D + o_d[None, :]
    return o_de, o_ed, m_d[:, None] & m_e[None, :], m_e[:, None] & m_d[None, :]


@triton.jit
def _load_tiles(p, o_de, o_ed, m_de, m_ed, DE):
    """W1, W2, S1, S2 tiles of the packed state at p ([D, BE], [BE, D], [D, BE], [BE, D])."""
    return (tl.load(p + o_de, mask=m_de, other=0.0), tl.load(p + DE + o_ed, mask=m_ed, other=0.0),
            tl.load(p + 2 * DE + o_de, mask=m_de, other=0.0), tl.load(p + 3 * DE + o_ed, mask=m_ed, other=0.0))


@triton.jit
def _store_tiles(p, o_de, o_ed, m_de, m_ed, DE, w1, w2, s1, s2):
    tl.store(p + o_de, w1, mask=m_de)
    tl.store(p + DE + o_ed, w2, mask=m_ed)
    tl.store(p + 2 * DE + o_de, s1, mask=m_de)
    tl.store(p + 3 * DE + o_ed, s2, mask=m_ed)


@triton.jit
def _copy_state(p_src, p_dst, o_d, o_e, m_d, D, E, BE: tl.constexpr):
    DE = D * E
    for e0 in range(0, E, BE):
        o_de, o_ed, m_de, m_ed = _tile_offsets(e0, o_d, o_e, m_d, D, E)
        w1, w2, s1, s2 = _load_tiles(p_src, o_de, o_ed, m_de, m_ed, DE)
        _store_tiles(p_dst, o_de, o_ed, m_de, m_ed, DE, w1, w2, s1, s2)


@triton.jit
def _read(p, X, o_d, o_e, m_d, D, E, BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
          PRECISION: tl.constexpr):
    """M(X) = X + gelu(X W2^T) W1^T of the memory at p (a sum over the hidden tiles)."""
    DE = D * E
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for e0 in range(0, E, BE):
        o_de, o_ed, m_de, m_ed = _tile_offsets(e0, o_d, o_e, m_d, D, E)
        w1 = tl.load(p + o_de, mask=m_de, other=0.0)
        w2 = tl.load(p + DE + o_ed, mask=m_ed, other=0.0)
        acc += _mm(_gelu(_mm(X, tl.trans(w2), PRECISION)), tl.trans(w1), PRECISION)
    return X + acc


@triton.jit
def _read_bwd(p, p_d, X, dO, o_d, o_e, m_d, D, E, BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
              PRECISION: tl.constexpr):
    """Backward of ``_read`` at p: returns dX; adds the weights' gradients to the gradient state at p_d."""
    DE = D * E
    dX = dO
    for e0 in range(0, E, BE):
        o_de, o_ed, m_de, m_ed = _tile_offsets(e0, o_d, o_e, m_d, D, E)
        w1 = tl.load(p + o_de, mask=m_de, other=0.0)
        w2 = tl.load(p + DE + o_ed, mask=m_ed, other=0.0)
        h = _mm(X, tl.trans(w2), PRECISION)
        dh = _mm(dO, w1, PRECISION) * _gelu_grad(h)
        dX += _mm(dh, w2, PRECISION)
        dw1 = tl.load(p_d + o_de, mask=m_de, other=0.0) + _mm(tl.trans(dO), _gelu(h), PRECISION)
        dw2 = tl.load(p_d + DE + o_ed, mask=m_ed, other=0.0) + _mm(tl.trans(dh), X, PRECISION)
        tl.debug_barrier()
        tl.store(p_d + o_de, dw1, mask=m_de)
        tl.store(p_d + DE + o_ed, dw2, mask=m_ed)
    tl.debug_barrier()
    return dX


# ------------------------------------------------------------------------------------------------ one chunk
#: slots of a chunk's parked dot operands (``_chunk_bwd`` with PARK): [BT, BD] blocks, then [BT, BT] ones
_N_TD_SLOTS = tl.constexpr(6)
_N_TT_SLOTS = tl.constexpr(5)
_K, _KH, _Q, _ERR, _DO, _DERR = (tl.constexpr(i) for i in range(_N_TD_SLOTS))
_AKK, _TINV, _AQK, _AQW, _DZ = (tl.constexpr(_N_TD_SLOTS + i) for i in range(_N_TT_SLOTS))


def park_floats(BT: int, BD: int) -> int:
    """Floats one (b, h) parks: the [BT, BD] and [BT, BT] slots (the memory pass's backward's ``p_park`` stride)."""
    return _N_TD_SLOTS.value * BT * BD + _N_TT_SLOTS.value * BT * BT


@triton.jit
def _slot(p_park, SLOT: tl.constexpr, o_t, o_d, BT: tl.constexpr, BD: tl.constexpr):
    """Pointers of a park slot's block: [BT, BD] for the first slots, [BT, BT] for the rest."""
    if SLOT < _N_TD_SLOTS:
        p_slot = p_park + SLOT * BT * BD + o_t[:, None] * BD + o_d[None, :]
    else:
        p_slot = p_park + _N_TD_SLOTS * BT * BD + (SLOT - _N_TD_SLOTS) * BT * BT + o_t[:, None] * BT + o_t[None, :]
    return p_slot


@triton.jit
def _park(p_park, SLOT: tl.constexpr, x, o_t, o_d, BT: tl.constexpr, BD: tl.constexpr, PARK: tl.constexpr):
    """Stores x (a whole block, padding included) in its slot when PARK."""
    if PARK:
        tl.store(_slot(p_park, SLOT, o_t, o_d, BT, BD), x)


@triton.jit
def _operand(p_park, SLOT: tl.constexpr, x, o_t, o_d, BT: tl.constexpr, BD: tl.constexpr, PARK: tl.constexpr):
    """A chunk-constant dot operand at one use: x, or (PARK) a fresh volatile load of its parked copy. One load per
    use keeps its shared-memory copy alive from that load to that product only; a value held in registers (or a
    plain load, which the compiler hoists and merges) keeps one copy alive from its first product to its last,
    across every tile loop, beside every tile's own."""
    if PARK:
        x = tl.load(_slot(p_park, SLOT, o_t, o_d, BT, BD), volatile=True)
    return x


@triton.jit
def _chunk_terms(b_th, b_a, b_b, b_k, b_q, L, o_t, m_d, BT: tl.constexpr, LOG2_BT: tl.constexpr,
                 DGD: tl.constexpr, READOUT: tl.constexpr, BEFORE: tl.constexpr, PRECISION: tl.constexpr):
    """The chunk's state-independent terms (docs: "dual form"): decay terms, end weights, dgd's K^, M, Akk and
    (I + M)^-1, and the read-out's coefficients Bq, cq, gq, bq with its scores. Stand-ins fill what is not used."""
    P, Br, Gd, A, Bk, c = _terms(b_a, b_b, BT, PRECISION)
    th_row = b_th[None, :]
    wg = _row(Gd, o_t, L - 1) * b_th
    wp = _row(P, o_t, L - 1) * b_th
    wb = _row(Br, o_t, L - 1) * b_th
    BL = _at(Bk, o_t, L - 1)
    cL = _at(c, o_t, L - 1)
    AL = _at(A, o_t, L - 1)
    strict = o_t[None, :] < o_t[:, None]
    low = o_t[None, :] <= o_t[:, None]
    Brs = _shift_down(Br, o_t, PRECISION)
    Gs = _shift_down(Gd, o_t, PRECISION)
    kh = b_k
    kn = tl.sum(b_k, axis=1)
    M = Gd
    Akk = Gd
    Tinv = Gd
    KhKh = Gd
    KhK = Gd
    Bp = Bk
    cp = c
    if DGD:
        kh, kn = _l2n(b_k, m_d)
        KhKh = _mm(kh, tl.trans(kh), PRECISION)
        KhK = _mm(kh, tl.trans(b_k), PRECISION)
        M = tl.where(strict, Brs * th_row * KhKh, 0.0)
        Akk = tl.where(strict, Gs * th_row * KhK, 0.0)
        Bp = _shift_vec(Bk, o_t, 1.0)
        cp = _shift_vec(c, o_t, 0.0)
        # (I + M)^-1 = prod_k (I + (-M)^(2^k)): M is strictly lower (nilpotent), log2(BT) factors
        eye = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
        X = -M
        Tinv = eye + X
        for _ in tl.static_range(1, LOG2_BT):
            X = _mm(X, X, PRECISION)
            Tinv = Tinv + _mm(Tinv, X, PRECISION)
    Bq = Bk
    cq = c
    gq = Gd
    bq = Br
    QK = Gd
    QKh = Gd
    if READOUT:
        if BEFORE:
            Bq = _shift_vec(Bk, o_t, 1.0)
            cq = _shift_vec(c, o_t, 0.0)
            gq = tl.where(strict, Gs * th_row, 0.0)
            bq = tl.where(strict, Brs * th_row, 0.0)
        else:
            gq = tl.where(low, Gd * th_row, 0.0)
            bq = tl.where(low, Br * th_row, 0.0)
        QK = _mm(b_q, tl.trans(b_k), PRECISION)
        if DGD:
            QKh = _mm(b_q, tl.trans(kh), PRECISION)
    return (P, Br, Gd, A, Bk, c, Brs, Gs, wg, wp, wb, BL, cL, AL, kh, kn, KhKh, KhK, M, Akk, Tinv, Bp, cp,
            Bq, cq, gq, bq, QK, QKh)


@triton.jit
def _tile_fwd(w1, w2, s1, s2, b_k, kh, b_q, err, Akk, Tinv, Bp, cp, Aqk, Aqw, Bq, cq, p_park, o_t, o_d,
              BT: tl.constexpr, BD: tl.constexpr, DGD: tl.constexpr, READOUT: tl.constexpr, PARK: tl.constexpr,
              PRECISION: tl.constexpr):
    """One tile of hidden units at the chunk-start state: Hk, Ak, U, Gr [, K^ W2^T, K^ S2^T, R, w]
    [, Q W2^T, Q S2^T, Hq, Aq]. PARK: the chunk's operands are read from p_park at each use (``_operand``)."""
    hk = _mm(_operand(p_park, _K, b_k, o_t, o_d, BT, BD, PARK), tl.trans(w2), PRECISION)
    ak = _gelu(hk)
    u = _mm(_operand(p_park, _ERR, err, o_t, o_d, BT, BD, PARK), w1, PRECISION)
    gr = u * _gelu_grad(hk)
    khw2 = hk
    khs2 = hk
    r = hk
    w = hk
    if DGD:
        khw2 = _mm(_operand(p_park, _KH, kh, o_t, o_d, BT, BD, PARK), tl.trans(w2), PRECISION)
        khs2 = _mm(_operand(p_park, _KH, kh, o_t, o_d, BT, BD, PARK), tl.trans(s2), PRECISION)
        r = (Bp[:, None] * khw2 + cp[:, None] * khs2
             - _mm(_operand(p_park, _AKK, Akk, o_t, o_d, BT, BD, PARK), gr, PRECISION))
        w = _mm(_operand(p_park, _TINV, Tinv, o_t, o_d, BT, BD, PARK), r, PRECISION)
    qw2 = hk
    qs2 = hk
    hq = hk
    aq = hk
    if READOUT:
        qw2 = _mm(_operand(p_park, _Q, b_q, o_t, o_d, BT, BD, PARK), tl.trans(w2), PRECISION)
        qs2 = _mm(_operand(p_park, _Q, b_q, o_t, o_d, BT, BD, PARK), tl.trans(s2), PRECISION)
        hq = (Bq[:, None] * qw2 + cq[:, None] * qs2
              - _mm(_operand(p_park, _AQK, Aqk, o_t, o_d, BT, BD, PARK), gr, PRECISION))
        if DGD:
            hq -= _mm(_operand(p_park, _AQW, Aqw, o_t, o_d, BT, BD, PARK), w, PRECISION)
        aq = _gelu(hq)
    return hk, ak, u, gr, khw2, khs2, r, w, qw2, qs2, hq, aq


@triton.jit
def _tile_new(w1, w2, s1, s2, b_k, kh, err, ak, gr, w, wg, wp, wb, BL, cL, AL, p_park, o_t, o_d, BT: tl.constexpr,
              BD: tl.constexpr, DGD: tl.constexpr, PARK: tl.constexpr, PRECISION: tl.constexpr):
    """The tile's end-of-chunk state (before the bound)."""
    w1n = BL * w1 + cL * s1 - _mm(tl.trans(_operand(p_park, _ERR, err, o_t, o_d, BT, BD, PARK)), ak * wg[:, None],
                                  PRECISION)
    s1n = AL * s1 - _mm(tl.trans(_operand(p_park, _ERR, err, o_t, o_d, BT, BD, PARK)), ak * wp[:, None], PRECISION)
    w2n = BL * w2 + cL * s2 - _mm(tl.trans(gr * wg[:, None]), _operand(p_park, _K, b_k, o_t, o_d, BT, BD, PARK),
                                  PRECISION)
    if DGD:
        w2n -= _mm(tl.trans(w * wb[:, None]), _operand(p_park, _KH, kh, o_t, o_d, BT, BD, PARK), PRECISION)
    s2n = AL * s2 - _mm(tl.trans(gr * wp[:, None]), _operand(p_park, _K, b_k, o_t, o_d, BT, BD, PARK), PRECISION)
    return w1n, w2n, s1n, s2n


@triton.jit
def _errors(p, b_k, b_v, o_d, o_e, m_d, D, E, BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
            PRECISION: tl.constexpr):
    """Err = K + gelu(K W2^T) W1^T - V at the state p."""
    return _read(p, b_k, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION) - b_v


@triton.jit
def _chunk_fwd(p_st, p_new, p_start, b_k, b_v, b_q, rho, L, o_t, o_d, o_e, m_t, m_d, D, E,
               P, Br, Gd, A, Bk, c, wg, wp, wb, BL, cL, AL, kh, Akk, Tinv, Bp, cp, Bq, cq, gq, bq, QK, QKh,
               BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, DGD: tl.constexpr, READOUT: tl.constexpr,
               CLIP: tl.constexpr, STORE_START: tl.constexpr, PRECISION: tl.constexpr):
    """One chunk of one memory at p_st (updated in place); its start state also to p_start (STORE_START).
    Returns the read-out O [BT, BD] (READOUT) and the bound's scale."""
    DE = D * E
    err = _errors(p_st, b_k, b_v, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION)
    Aqk = gq * QK
    Aqw = bq * QKh
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    z = tl.zeros([BT, BT], dtype=tl.float32)
    d2 = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    n2 = d2
    for e0 in range(0, E, BE):
        o_de, o_ed, m_de, m_ed = _tile_offsets(e0, o_d, o_e, m_d, D, E)
        w1, w2, s1, s2 = _load_tiles(p_st, o_de, o_ed, m_de, m_ed, DE)
        if STORE_START:
            _store_tiles(p_start, o_de, o_ed, m_de, m_ed, DE, w1, w2, s1, s2)
        hk, ak, u, gr, khw2, khs2, r, w, qw2, qs2, hq, aq = _tile_fwd(
            w1, w2, s1, s2, b_k, kh, b_q, err, Akk, Tinv, Bp, cp, Aqk, Aqw, Bq, cq, p_st, o_t, o_d, BT, BD, DGD,
            READOUT, False, PRECISION)
        if READOUT:
            acc += (Bq[:, None] * _mm(aq, tl.trans(w1), PRECISION) + cq[:, None] * _mm(aq, tl.trans(s1), PRECISION))
            z += _mm(aq, tl.trans(ak), PRECISION)
        w1n, w2n, s1n, s2n = _tile_new(w1, w2, s1, s2, b_k, kh, err, ak, gr, w, wg, wp, wb, BL, cL, AL, p_st, o_t, o_d,
                                       BT, BD, DGD, False, PRECISION)
        if CLIP:
            d2 += tl.sum(tl.sum((w1n - w1) * (w1n - w1), axis=1), axis=0)
            d2 += tl.sum(tl.sum((w2n - w2) * (w2n - w2), axis=1), axis=0)
            n2 += tl.sum(tl.sum(w1 * w1, axis=1), axis=0) + tl.sum(tl.sum(w2 * w2, axis=1), axis=0)
            _store_tiles(p_new, o_de, o_ed, m_de, m_ed, DE, w1n, w2n, s1n, s2n)
        else:
            tl.debug_barrier()
            _store_tiles(p_st, o_de, o_ed, m_de, m_ed, DE, w1n, w2n, s1n, s2n)
    tl.debug_barrier()
    scale = d2 * 0.0 + 1.0
    if CLIP:
        scale = tl.minimum(rho * tl.sqrt(tl.maximum(n2, 1e-12)) / tl.sqrt(tl.maximum(d2, 1e-24)), 1.0)
        for e0 in range(0, E, BE):
            o_de, o_ed, m_de, m_ed = _tile_offsets(e0, o_d, o_e, m_d, D, E)
            w1, w2, s1, s2 = _load_tiles(p_st, o_de, o_ed, m_de, m_ed, DE)
            w1n, w2n, s1n, s2n = _load_tiles(p_new, o_de, o_ed, m_de, m_ed, DE)
            tl.debug_barrier()
            _store_tiles(p_st, o_de, o_ed, m_de, m_ed, DE, w1 + scale * (w1n - w1), w2 + scale * (w2n - w2),
                         s1 + scale * (s1n - s1), s2 + scale * (s2n - s2))
        tl.debug_barrier()
    out = acc
    if READOUT:
        out = b_q + acc - _mm(gq * z, err, PRECISION)
    return out, scale


@triton.jit
def _chunk_bwd(p_st, p_dst, p_dn, p_park, b_k, b_v, b_q, b_do, rho, L, o_t, o_d, o_e, m_t, m_d, D, E, b_th, b_a,
               b_b, P, Br, Gd, A, Bk, c, Brs, Gs, wg, wp, wb, BL, cL, AL, kh, kn, KhKh, KhK, M, Akk, Tinv, Bp, cp,
               Bq, cq, gq, bq, QK, QKh,
               BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, DGD: tl.constexpr, READOUT: tl.constexpr,
               BEFORE: tl.constexpr, CLIP: tl.constexpr, PARK: tl.constexpr, PRECISION: tl.constexpr):
    """Backward of ``_chunk_fwd`` (docs: "backward"): p_st the chunk-start state (read only); p_dst holds the
    gradient of the bounded end state on entry and that of the chunk-start state on exit; p_dn: scratch for the
    unbounded end state's gradient (CLIP). PARK: the chunk's constant dot operands are parked at p_park (its
    ``_slot``s, ``park_floats`` floats) and each product reloads its operand there (``_operand``).
    Returns dK, dV, dQ [BT, BD] and dtheta, da, db [BT]."""
    DE = D * E
    err = _errors(p_st, b_k, b_v, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION)
    Aqk = gq * QK
    Aqw = bq * QKh
    if PARK:  # the previous chunk's last reads of the park come first
        tl.debug_barrier()
    _park(p_park, _K, b_k, o_t, o_d, BT, BD, PARK)
    _park(p_park, _KH, kh, o_t, o_d, BT, BD, PARK)
    _park(p_park, _Q, b_q, o_t, o_d, BT, BD, PARK)
    _park(p_park, _ERR, err, o_t, o_d, BT, BD, PARK)
    _park(p_park, _DO, b_do, o_t, o_d, BT, BD, PARK)
    _park(p_park, _AKK, Akk, o_t, o_d, BT, BD, PARK)
    _park(p_park, _TINV, Tinv, o_t, o_d, BT, BD, PARK)
    _park(p_park, _AQK, Aqk, o_t, o_d, BT, BD, PARK)
    _park(p_park, _AQW, Aqw, o_t, o_d, BT, BD, PARK)
    if PARK:
        tl.debug_barrier()
    zero_t = tl.zeros([BT], dtype=tl.float32)
    p_dnn = p_dst
    if CLIP:
        # the bound: ds = <g, new - old>, its norms, then the unbounded state's gradient (p_dn) and the old state's
        # direct part (p_dst)
        ds = tl.sum(zero_t, axis=0)
        d2 = ds
        n2 = ds
        for e0 in range(0, E, BE):
            o_de, o_ed, m_de, m_ed = _tile_offsets(e0, o_d, o_e, m_d, D, E)
            w1, w2, s1, s2 = _load_tiles(p_st, o_de, o_ed, m_de, m_ed, DE)
            hk, ak, u, gr, khw2, khs2, r, w, qw2, qs2, hq, aq = _tile_fwd(
                w1, w2, s1, s2, b_k, kh, b_q, err, Akk, Tinv, Bp, cp, Aqk, Aqw, Bq, cq, p_park, o_t, o_d, BT, BD, DGD,
                False, PARK, PRECISION)
            w1n, w2n, s1n, s2n = _tile_new(w1, w2, s1, s2, b_k, kh, err, ak, gr, w, wg, wp, wb, BL, cL, AL, p_park, o_t,
                                           o_d, BT, BD, DGD, PARK, PRECISION)
            g1, g2, h1, h2 = _load_tiles(p_dst, o_de, o_ed, m_de, m_ed, DE)
            ds += tl.sum(tl.sum(g1 * (w1n - w1) + h1 * (s1n - s1), axis=1), axis=0)
            ds += tl.sum(tl.sum(g2 * (w2n - w2) + h2 * (s2n - s2), axis=1), axis=0)
            d2 += tl.sum(tl.sum((w1n - w1) * (w1n - w1), axis=1), axis=0)
            d2 += tl.sum(tl.sum((w2n - w2) * (w2n - w2), axis=1), axis=0)
            n2 += tl.sum(tl.sum(w1 * w1, axis=1), axis=0) + tl.sum(tl.sum(w2 * w2, axis=1), axis=0)
        raw = rho * tl.sqrt(tl.maximum(n2, 1e-12)) / tl.sqrt(tl.maximum(d2, 1e-24))
        scale = tl.minimum(raw, 1.0)
        active = raw <= 1.0
        dn2 = tl.where(active & (n2 >= 1e-12), ds * raw / (2.0 * tl.maximum(n2, 1e-12)), 0.0)
        dd2 = tl.where(active & (d2 >= 1e-24), -ds * raw / (2.0 * tl.maximum(d2, 1e-24)), 0.0)
        for e0 in range(0, E, BE):
            o_de, o_ed, m_de, m_ed = _tile_offsets(e0, o_d, o_e, m_d, D, E)
            w1, w2, s1, s2 = _load_tiles(p_st, o_de, o_ed, m_de, m_ed, DE)
            hk, ak, u, gr, khw2, khs2, r, w, qw2, qs2, hq, aq = _tile_fwd(
                w1, w2, s1, s2, b_k, kh, b_q, err, Akk, Tinv, Bp, cp, Aqk, Aqw, Bq, cq, p_park, o_t, o_d, BT, BD, DGD,
                False, PARK, PRECISION)
            w1n, w2n, s1n, s2n = _tile_new(w1, w2, s1, s2, b_k, kh, err, ak, gr, w, wg, wp, wb, BL, cL, AL, p_park, o_t,
                                           o_d, BT, BD, DGD, PARK, PRECISION)
            g1, g2, h1, h2 = _load_tiles(p_dst, o_de, o_ed, m_de, m_ed, DE)
            x1 = 2.0 * dd2 * (w1n - w1)
            x2 = 2.0 * dd2 * (w2n - w2)
            _store_tiles(p_dn, o_de, o_ed, m_de, m_ed, DE, scale * g1 + x1, scale * g2 + x2, scale * h1, scale * h2)
            tl.debug_barrier()
            _store_tiles(p_dst, o_de, o_ed, m_de, m_ed, DE, (1.0 - scale) * g1 + 2.0 * dn2 * w1 - x1,
                         (1.0 - scale) * g2 + 2.0 * dn2 * w2 - x2, (1.0 - scale) * h1, (1.0 - scale) * h2)
        tl.debug_barrier()
        p_dnn = p_dn
    # read-out: O -= (gq * Z) Err, Z = Aq Ak^T (a sum over E)
    dz = gq
    dgq = tl.zeros([BT, BT], dtype=tl.float32)
    derr = tl.zeros([BT, BD], dtype=tl.float32)
    if READOUT:
        z = tl.zeros([BT, BT], dtype=tl.float32)
        for e0 in range(0, E, BE):
            o_de, o_ed, m_de, m_ed = _tile_offsets(e0, o_d, o_e, m_d, D, E)
            w1, w2, s1, s2 = _load_tiles(p_st, o_de, o_ed, m_de, m_ed, DE)
            hk, ak, u, gr, khw2, khs2, r, w, qw2, qs2, hq, aq = _tile_fwd(
                w1, w2, s1, s2, b_k, kh, b_q, err, Akk, Tinv, Bp, cp, Aqk, Aqw, Bq, cq, p_park, o_t, o_d, BT, BD, DGD,
                READOUT, PARK, PRECISION)
            z += _mm(aq, tl.trans(ak), PRECISION)
        F = _mm(b_do, tl.trans(err), PRECISION)
        dgq = -F * z
        dz = -gq * F
        derr = -_mm(tl.trans(gq * z), b_do, PRECISION)
        _park(p_park, _DZ, dz, o_t, o_d, BT, BD, PARK)
        if PARK:
            tl.debug_barrier()
    # the rest of dErr (a sum over E)
    for e0 in range(0, E, BE):
        o_de, o_ed, m_de, m_ed = _tile_offsets(e0, o_d, o_e, m_d, D, E)
        w1, w2, s1, s2 = _load_tiles(p_st, o_de, o_ed, m_de, m_ed, DE)
        hk, ak, u, gr, khw2, khs2, r, w, qw2, qs2, hq, aq = _tile_fwd(
            w1, w2, s1, s2, b_k, kh, b_q, err, Akk, Tinv, Bp, cp, Aqk, Aqw, Bq, cq, p_park, o_t, o_d, BT, BD, DGD,
            READOUT, PARK, PRECISION)
        n1, n2_, m1, m2 = _load_tiles(p_dnn, o_de, o_ed, m_de, m_ed, DE)  # dW1', dW2', dS1', dS2'
        derr -= (wg[:, None] * _mm(ak, tl.trans(n1), PRECISION) + wp[:, None] * _mm(ak, tl.trans(m1), PRECISION))
        dgr = -(wg[:, None] * _mm(_operand(p_park, _K, b_k, o_t, o_d, BT, BD, PARK), tl.trans(n2_), PRECISION)
                + wp[:, None] * _mm(_operand(p_park, _K, b_k, o_t, o_d, BT, BD, PARK), tl.trans(m2), PRECISION))
        dw = dgr
        if DGD:
            dw = -wb[:, None] * _mm(_operand(p_park, _KH, kh, o_t, o_d, BT, BD, PARK), tl.trans(n2_), PRECISION)
        if READOUT:
            dhq = ((Bq[:, None] * _mm(_operand(p_park, _DO, b_do, o_t, o_d, BT, BD, PARK), w1, PRECISION)
                    + cq[:, None] * _mm(_operand(p_park, _DO, b_do, o_t, o_d, BT, BD, PARK), s1, PRECISION)
                    + _mm(_operand(p_park, _DZ, dz, o_t, o_d, BT, BD, PARK), ak, PRECISION)) * _gelu_grad(hq))
            dgr -= _mm(tl.trans(_operand(p_park, _AQK, Aqk, o_t, o_d, BT, BD, PARK)), dhq, PRECISION)
            if DGD:
                dw -= _mm(tl.trans(_operand(p_park, _AQW, Aqw, o_t, o_d, BT, BD, PARK)), dhq, PRECISION)
        if DGD:
            dr = _mm(tl.trans(_operand(p_park, _TINV, Tinv, o_t, o_d, BT, BD, PARK)), dw, PRECISION)
            dgr -= _mm(tl.trans(_operand(p_park, _AKK, Akk, o_t, o_d, BT, BD, PARK)), dr, PRECISION)
        derr += _mm(dgr * _gelu_grad(hk), tl.trans(w1), PRECISION)
    _park(p_park, _DERR, derr, o_t, o_d, BT, BD, PARK)
    if PARK:
        tl.debug_barrier()
    # every other gradient, and the chunk-start state's (tile by tile, into p_dst)
    dk = derr
    dq = b_do
    dkh = tl.zeros([BT, BD], dtype=tl.float32)
    dAqk = tl.zeros([BT, BT], dtype=tl.float32)
    dAqw = tl.zeros([BT, BT], dtype=tl.float32)
    dM = tl.zeros([BT, BT], dtype=tl.float32)
    dAkk = tl.zeros([BT, BT], dtype=tl.float32)
    dBq = zero_t
    dcq = zero_t
    dwg = zero_t
    dwp = zero_t
    dwb = zero_t
    dBp = zero_t
    dcp = zero_t
    dBL = tl.sum(zero_t, axis=0)
    dcL = dBL
    dAL = dBL
    for e0 in range(0, E, BE):
        o_de, o_ed, m_de, m_ed = _tile_offsets(e0, o_d, o_e, m_d, D, E)
        w1, w2, s1, s2 = _load_tiles(p_st, o_de, o_ed, m_de, m_ed, DE)
        hk, ak, u, gr, khw2, khs2, r, w, qw2, qs2, hq, aq = _tile_fwd(
            w1, w2, s1, s2, b_k, kh, b_q, err, Akk, Tinv, Bp, cp, Aqk, Aqw, Bq, cq, p_park, o_t, o_d, BT, BD, DGD,
            READOUT, PARK, PRECISION)
        n1, n2_, m1, m2 = _load_tiles(p_dnn, o_de, o_ed, m_de, m_ed, DE)
        kn2 = _mm(_operand(p_park, _K, b_k, o_t, o_d, BT, BD, PARK), tl.trans(n2_), PRECISION)
        km2 = _mm(_operand(p_park, _K, b_k, o_t, o_d, BT, BD, PARK), tl.trans(m2), PRECISION)
        dgr = -(wg[:, None] * kn2 + wp[:, None] * km2)
        err_n1 = _mm(_operand(p_park, _ERR, err, o_t, o_d, BT, BD, PARK), n1, PRECISION)
        err_m1 = _mm(_operand(p_park, _ERR, err, o_t, o_d, BT, BD, PARK), m1, PRECISION)
        da_ = (_mm(_operand(p_park, _DERR, derr, o_t, o_d, BT, BD, PARK), w1, PRECISION)
               - wg[:, None] * err_n1 - wp[:, None] * err_m1)
        dwg -= tl.sum(err_n1 * ak, axis=1) + tl.sum(gr * kn2, axis=1)
        dwp -= tl.sum(err_m1 * ak, axis=1) + tl.sum(gr * km2, axis=1)
        dk -= wg[:, None] * _mm(gr, n2_, PRECISION) + wp[:, None] * _mm(gr, m2, PRECISION)
        dBL += tl.sum(tl.sum(n1 * w1, axis=1), axis=0) + tl.sum(tl.sum(n2_ * w2, axis=1), axis=0)
        dcL += tl.sum(tl.sum(n1 * s1, axis=1), axis=0) + tl.sum(tl.sum(n2_ * s2, axis=1), axis=0)
        dAL += tl.sum(tl.sum(m1 * s1, axis=1), axis=0) + tl.sum(tl.sum(m2 * s2, axis=1), axis=0)
        dw = dgr
        if DGD:
            khn2 = _mm(_operand(p_park, _KH, kh, o_t, o_d, BT, BD, PARK), tl.trans(n2_), PRECISION)
            dw = -wb[:, None] * khn2
            dwb -= tl.sum(w * khn2, axis=1)
            dkh -= wb[:, None] * _mm(w, n2_, PRECISION)
        dhq = hq
        dw1s = tl.zeros([BD, BE], dtype=tl.float32)
        ds1s = tl.zeros([BD, BE], dtype=tl.float32)
        dw2s = tl.zeros([BE, BD], dtype=tl.float32)
        ds2s = tl.zeros([BE, BD], dtype=tl.float32)
        if READOUT:
            dow1 = _mm(_operand(p_park, _DO, b_do, o_t, o_d, BT, BD, PARK), w1, PRECISION)
            dos1 = _mm(_operand(p_park, _DO, b_do, o_t, o_d, BT, BD, PARK), s1, PRECISION)
            dhq = (Bq[:, None] * dow1 + cq[:, None] * dos1
                   + _mm(_operand(p_park, _DZ, dz, o_t, o_d, BT, BD, PARK), ak, PRECISION)) * _gelu_grad(hq)
            dgr -= _mm(tl.trans(_operand(p_park, _AQK, Aqk, o_t, o_d, BT, BD, PARK)), dhq, PRECISION)
            da_ += _mm(tl.trans(_operand(p_park, _DZ, dz, o_t, o_d, BT, BD, PARK)), aq, PRECISION)
            dq += Bq[:, None] * _mm(dhq, w2, PRECISION) + cq[:, None] * _mm(dhq, s2, PRECISION)
            dAqk -= _mm(dhq, tl.trans(gr), PRECISION)
            dBq += tl.sum(dow1 * aq, axis=1) + tl.sum(dhq * qw2, axis=1)
            dcq += tl.sum(dos1 * aq, axis=1) + tl.sum(dhq * qs2, axis=1)
            dw1s += _mm(tl.trans(_operand(p_park, _DO, b_do, o_t, o_d, BT, BD, PARK) * Bq[:, None]), aq, PRECISION)
            ds1s += _mm(tl.trans(_operand(p_park, _DO, b_do, o_t, o_d, BT, BD, PARK) * cq[:, None]), aq, PRECISION)
            dw2s += _mm(tl.trans(dhq * Bq[:, None]), _operand(p_park, _Q, b_q, o_t, o_d, BT, BD, PARK), PRECISION)
            ds2s += _mm(tl.trans(dhq * cq[:, None]), _operand(p_park, _Q, b_q, o_t, o_d, BT, BD, PARK), PRECISION)
            if DGD:
                dw -= _mm(tl.trans(_operand(p_park, _AQW, Aqw, o_t, o_d, BT, BD, PARK)), dhq, PRECISION)
                dAqw -= _mm(dhq, tl.trans(w), PRECISION)
        if DGD:
            dr = _mm(tl.trans(_operand(p_park, _TINV, Tinv, o_t, o_d, BT, BD, PARK)), dw, PRECISION)
            dM -= _mm(dr, tl.trans(w), PRECISION)
            dgr -= _mm(tl.trans(_operand(p_park, _AKK, Akk, o_t, o_d, BT, BD, PARK)), dr, PRECISION)
            dkh += Bp[:, None] * _mm(dr, w2, PRECISION) + cp[:, None] * _mm(dr, s2, PRECISION)
            dBp += tl.sum(dr * khw2, axis=1)
            dcp += tl.sum(dr * khs2, axis=1)
            dAkk -= _mm(dr, tl.trans(gr), PRECISION)
            dw2s += _mm(tl.trans(dr * Bp[:, None]), _operand(p_park, _KH, kh, o_t, o_d, BT, BD, PARK), PRECISION)
            ds2s += _mm(tl.trans(dr * cp[:, None]), _operand(p_park, _KH, kh, o_t, o_d, BT, BD, PARK), PRECISION)
        du = dgr * _gelu_grad(hk)
        dhk = da_ * _gelu_grad(hk) + dgr * u * _gelu_grad2(hk)
        dk += _mm(dhk, w2, PRECISION)
        dw1s += (BL * n1 + _mm(tl.trans(_operand(p_park, _ERR, err, o_t, o_d, BT, BD, PARK)), du, PRECISION)
                 + _mm(tl.trans(_operand(p_park, _DERR, derr, o_t, o_d, BT, BD, PARK)), ak, PRECISION))
        ds1s += cL * n1 + AL * m1
        dw2s += BL * n2_ + _mm(tl.trans(dhk), _operand(p_park, _K, b_k, o_t, o_d, BT, BD, PARK), PRECISION)
        ds2s += cL * n2_ + AL * m2
        if CLIP:  # plus the bound's direct part, already in p_dst
            o1, o2, o3, o4 = _load_tiles(p_dst, o_de, o_ed, m_de, m_ed, DE)
            dw1s += o1
            dw2s += o2
            ds1s += o3
            ds2s += o4
        tl.debug_barrier()
        _store_tiles(p_dst, o_de, o_ed, m_de, m_ed, DE, dw1s, dw2s, ds1s, ds2s)
    tl.debug_barrier()
    dv = -derr
    # the [BT, BT] terms back to q, k, k^ and the decay terms
    strict = o_t[None, :] < o_t[:, None]
    th_row = b_th[None, :]
    gP = tl.zeros([BT, BT], dtype=tl.float32)
    gBr = tl.zeros([BT, BT], dtype=tl.float32)
    gG = tl.zeros([BT, BT], dtype=tl.float32)
    last = o_t[:, None] == L - 1
    gG += tl.where(last, (dwg * b_th)[None, :], 0.0)
    gP += tl.where(last, (dwp * b_th)[None, :], 0.0)
    gBr += tl.where(last, (dwb * b_th)[None, :], 0.0)
    dth = dwg * _row(Gd, o_t, L - 1) + dwp * _row(P, o_t, L - 1) + dwb * _row(Br, o_t, L - 1)
    gBk = tl.where(o_t == L - 1, dBL, 0.0)
    gc = tl.where(o_t == L - 1, dcL, 0.0)
    gA = tl.where(o_t == L - 1, dAL, 0.0)
    if READOUT:
        dqk = dAqk * gq
        dq += _mm(dqk, _operand(p_park, _K, b_k, o_t, o_d, BT, BD, PARK), PRECISION)
        dk += _mm(tl.trans(dqk), _operand(p_park, _Q, b_q, o_t, o_d, BT, BD, PARK), PRECISION)
        dgq += dAqk * QK
        if BEFORE:  # Bq_t = Bk_{t-1}, gq[t] = G[t-1] theta, bq[t] = Br[t-1] theta
            gBk += _shift_vec_up(dBq, o_t)
            gc += _shift_vec_up(dcq, o_t)
            dgq = tl.where(strict, dgq, 0.0)
            gG += _shift_up(dgq * th_row, o_t, PRECISION)
            dth += tl.sum(dgq * Gs, axis=0)
        else:
            gBk += dBq
            gc += dcq
            dgq = tl.where(o_t[None, :] <= o_t[:, None], dgq, 0.0)
            gG += dgq * th_row
            dth += tl.sum(dgq * Gd, axis=0)
        if DGD:
            dqkh = dAqw * bq
            dq += _mm(dqkh, _operand(p_park, _KH, kh, o_t, o_d, BT, BD, PARK), PRECISION)
            dkh += _mm(tl.trans(dqkh), _operand(p_park, _Q, b_q, o_t, o_d, BT, BD, PARK), PRECISION)
            dbq = dAqw * QKh
            if BEFORE:
                dbq = tl.where(strict, dbq, 0.0)
                gBr += _shift_up(dbq * th_row, o_t, PRECISION)
                dth += tl.sum(dbq * Brs, axis=0)
            else:
                dbq = tl.where(o_t[None, :] <= o_t[:, None], dbq, 0.0)
                gBr += dbq * th_row
                dth += tl.sum(dbq * Br, axis=0)
    if DGD:
        dM = tl.where(strict, dM, 0.0)
        dkk = dM * Brs * th_row
        dkh += (_mm(dkk, _operand(p_park, _KH, kh, o_t, o_d, BT, BD, PARK), PRECISION)
                + _mm(tl.trans(dkk), _operand(p_park, _KH, kh, o_t, o_d, BT, BD, PARK), PRECISION))
        gBr += _shift_up(dM * th_row * KhKh, o_t, PRECISION)
        dth += tl.sum(dM * Brs * KhKh, axis=0)
        gBk += _shift_vec_up(dBp, o_t)
        gc += _shift_vec_up(dcp, o_t)
        dAkk = tl.where(strict, dAkk, 0.0)
        dkhk = dAkk * Gs * th_row
        dkh += _mm(dkhk, _operand(p_park, _K, b_k, o_t, o_d, BT, BD, PARK), PRECISION)
        dk += _mm(tl.trans(dkhk), _operand(p_park, _KH, kh, o_t, o_d, BT, BD, PARK), PRECISION)
        gG += _shift_up(dAkk * th_row * KhK, o_t, PRECISION)
        dth += tl.sum(dAkk * Gs * KhK, axis=0)
        dk += _l2n_bwd(kh, kn, dkh)
    da, db = _terms_bwd(P, Br, A, Bk, gP, gBr, gG, gA, gBk, gc, o_t, m_t, PRECISION)
    return dk, dv, dq, tl.where(m_t, dth, 0.0), tl.where(m_t, da, 0.0), tl.where(m_t, db, 0.0)


# ------------------------------------------------------------------------------------------------ generators
@triton.jit
def _gen_front(p_st, b_xq, b_xk, b_xv, r_eta, r_alpha, b_eta, b_alpha, m_t, o_d, o_e, m_d, D, E,
               BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, G: tl.constexpr, NORM_V: tl.constexpr,
               PRECISION: tl.constexpr):
    """The generators' reads at their chunk-start states (p_st: G packed memories): k, v, q, eta, alpha, the
    eta / alpha reads and the norms the backward needs (NL eq. 83-87)."""
    DE4 = 4 * D * E
    k, kn = _l2n(_read(p_st, b_xk, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION), m_d)
    ov = _read(p_st + DE4, b_xv, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION)
    v = ov
    vn = kn
    if NORM_V:
        v, vn = _l2n(ov, m_d)
    oe = _read(p_st + 2 * DE4, b_xk, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION)
    oa = _read(p_st + 3 * DE4, b_xk, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION)
    eta = tl.sigmoid(tl.sum(oe * r_eta[None, :], axis=1) + b_eta)
    alpha = tl.sigmoid(tl.sum(oa * r_alpha[None, :], axis=1) + b_alpha)
    if G == 5:
        q, qn = _l2n(_read(p_st + 4 * DE4, b_xq, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION), m_d)
    else:
        q, qn = _l2n(b_xq, m_d)
    return k, kn, v, vn, q, qn, tl.where(m_t, eta, 0.0), tl.where(m_t, alpha, 0.0), oe, oa


@triton.jit
def _gen_chunk(p_st, p_new, p_start, p_scale, b_xq, b_xk, b_xv, r_eta, r_alpha, b_eta, b_alpha, mom, rho, L,
               o_t, o_d, o_e, m_t, m_d, D, E, BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
               LOG2_BT: tl.constexpr, G: tl.constexpr, DGD: tl.constexpr, NORM_V: tl.constexpr, CLIP: tl.constexpr,
               STORE_START: tl.constexpr, STORE_SCALE: tl.constexpr, PRECISION: tl.constexpr):
    """One generator chunk: the reads, then every generator's chunk step with its targets M_g(v) (NL eq. 88-90),
    each bounded; the state at p_st is updated in place. Returns k, v, q, eta, alpha."""
    DE4 = 4 * D * E
    k, kn, v, vn, q, qn, eta, alpha, oe, oa = _gen_front(p_st, b_xq, b_xk, b_xv, r_eta, r_alpha, b_eta, b_alpha,
                                                         m_t, o_d, o_e, m_d, D, E, BT, BD, BE, G, NORM_V, PRECISION)
    th = eta
    b_a = tl.where(m_t, mom, 1.0)
    b_b = tl.where(m_t, 1.0 - alpha, 1.0)
    (P, Br, Gd, A, Bk, c, Brs, Gs, wg, wp, wb, BL, cL, AL, kh, khn, KhKh, KhK, M, Akk, Tinv, Bp, cp,
     Bq, cq, gq, bq, QK, QKh) = _chunk_terms(th, b_a, b_b, k, k, L, o_t, m_d, BT, LOG2_BT, DGD, False, False,
                                             PRECISION)
    for g in range(G):  # one copy of the chunk step, not G (compile time)
        vh = _read(p_st + g * DE4, v, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION)
        _, scale = _chunk_fwd(p_st + g * DE4, p_new, p_start + g * DE4, k, vh, k, rho, L, o_t, o_d, o_e, m_t, m_d,
                              D, E, P, Br, Gd, A, Bk, c, wg, wp, wb, BL, cL, AL, kh, Akk, Tinv, Bp, cp, Bq, cq, gq,
                              bq, QK, QKh, BT, BD, BE, DGD, False, CLIP, STORE_START, PRECISION)
        if STORE_SCALE:
            tl.store(p_scale + g, scale)
    return k, v, q, eta, alpha


@triton.jit
def _chunk_rows(i_bh, c, T, C, D, o_t, o_d, m_d):
    t0 = c * C
    m_t = (o_t < C) & (t0 + o_t < T)
    L = tl.minimum(C, T - t0)
    return t0, m_t, L, m_t[:, None] & m_d[None, :], i_bh * T * D + (t0 + o_t)[:, None] * D + o_d[None, :]


@triton.jit
def _head_params(p_readout, p_bias, p_mom, h, H, D, o_d, m_d):
    r_eta = tl.load(p_readout + h * D + o_d, mask=m_d, other=0.0)
    r_alpha = tl.load(p_readout + (H + h) * D + o_d, mask=m_d, other=0.0)
    return (r_eta, r_alpha, tl.load(p_bias + h), tl.load(p_bias + H + h), tl.load(p_mom + h),
            tl.load(p_mom + H + h))


@triton.jit
def _gen_fwd_kernel(p_xq, p_xk, p_xv, p_state, p_new, p_readout, p_bias, p_mom, p_kvq, p_gates, p_scale, p_ckpt,
                    T, H, D, E, C, NC, NK, CK, rho,
                    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, LOG2_BT: tl.constexpr, G: tl.constexpr,
                    DGD: tl.constexpr, NORM_V: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr):
    """The generator pass of one (b, h): every chunk in order, the state (p_state, [G, 4, D E]) updated in place;
    stores k, v, q [T, 3, D], eta, alpha [T, 2], each chunk's bound scales [NC, G] and the chunk-start state of every
    CK-th chunk (p_ckpt [NK, G, 4, D E])."""
    i_bh = tl.program_id(0).to(tl.int64)
    h = i_bh % H
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    m_d = o_d < D
    DE4G = G * 4 * D * E
    p_st = p_state + i_bh * DE4G
    r_eta, r_alpha, b_eta, b_alpha, m_gen, m_mem = _head_params(p_readout, p_bias, p_mom, h, H, D, o_d, m_d)
    for c in range(0, NC):
        t0, m_t, L, m_td, o_td = _chunk_rows(i_bh, c, T, C, D, o_t, o_d, m_d)
        b_xq = tl.load(p_xq + o_td, mask=m_td, other=0.0)
        b_xk = tl.load(p_xk + o_td, mask=m_td, other=0.0)
        b_xv = tl.load(p_xv + o_td, mask=m_td, other=0.0)
        if c % CK == 0:
            _copy_state_all(p_st, p_ckpt + (i_bh * NK + c // CK) * DE4G, o_d, o_e, m_d, D, E, BE, G)
        k, v, q, eta, alpha = _gen_chunk(p_st, p_new + i_bh * 4 * D * E, p_st, p_scale + (i_bh * NC + c) * G, b_xq,
                                         b_xk, b_xv, r_eta, r_alpha, b_eta, b_alpha, m_gen, rho, L, o_t, o_d, o_e,
                                         m_t, m_d, D, E, BT, BD, BE, LOG2_BT, G, DGD, NORM_V, CLIP, False, True,
                                         PRECISION)
        o_kvq = i_bh * T * 3 * D + (t0 + o_t)[:, None] * 3 * D + o_d[None, :]
        tl.store(p_kvq + o_kvq, k, mask=m_td)
        tl.store(p_kvq + o_kvq + D, v, mask=m_td)
        tl.store(p_kvq + o_kvq + 2 * D, q, mask=m_td)
        o_g = (i_bh * T + t0 + o_t) * 2
        tl.store(p_gates + o_g, eta, mask=m_t)
        tl.store(p_gates + o_g + 1, alpha, mask=m_t)


@triton.jit
def _copy_state_all(p_src, p_dst, o_d, o_e, m_d, D, E, BE: tl.constexpr, G: tl.constexpr):
    for g in range(G):
        _copy_state(p_src + g * 4 * D * E, p_dst + g * 4 * D * E, o_d, o_e, m_d, D, E, BE)
    tl.debug_barrier()


# ------------------------------------------------------------------------------------------------ memory pass
@triton.jit
def _mem_chunk_inputs(p_kvq, p_gates, i_bh, t0, T, D, o_t, o_d, m_t, m_td, mom):
    o_kvq = i_bh * T * 3 * D + (t0 + o_t)[:, None] * 3 * D + o_d[None, :]
    b_k = tl.load(p_kvq + o_kvq, mask=m_td, other=0.0)
    b_v = tl.load(p_kvq + o_kvq + D, mask=m_td, other=0.0)
    b_q = tl.load(p_kvq + o_kvq + 2 * D, mask=m_td, other=0.0)
    o_g = (i_bh * T + t0 + o_t) * 2
    th = tl.load(p_gates + o_g, mask=m_t, other=0.0)
    b_b = tl.where(m_t, 1.0 - tl.load(p_gates + o_g + 1, mask=m_t, other=0.0), 1.0)
    b_a = tl.where(m_t, mom, 1.0)
    return b_k, b_v, b_q, th, b_a, b_b, o_kvq, o_g


@triton.jit
def _mem_fwd_kernel(p_kvq, p_gates, p_state, p_new, p_mom, p_y, p_scale, p_ckpt, T, H, D, E, C, NC, rho,
                    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, LOG2_BT: tl.constexpr, DGD: tl.constexpr,
                    BEFORE: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr):
    """M_mem over the segment for one (b, h): chunk steps with read-out y (NL eq. 91-94), the state (p_state,
    [4, D E]) in place, every chunk-start state to p_ckpt [NC, 4, D E], the bound scales to p_scale [NC]."""
    i_bh = tl.program_id(0).to(tl.int64)
    h = i_bh % H
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    m_d = o_d < D
    DE4 = 4 * D * E
    mom = tl.load(p_mom + H + h)
    for c in range(0, NC):
        t0, m_t, L, m_td, o_td = _chunk_rows(i_bh, c, T, C, D, o_t, o_d, m_d)
        b_k, b_v, b_q, th, b_a, b_b, o_kvq, o_g = _mem_chunk_inputs(p_kvq, p_gates, i_bh, t0, T, D, o_t, o_d, m_t,
                                                                    m_td, mom)
        (P, Br, Gd, A, Bk, cc, Brs, Gs, wg, wp, wb, BL, cL, AL, kh, khn, KhKh, KhK, M, Akk, Tinv, Bp, cp,
         Bq, cq, gq, bq, QK, QKh) = _chunk_terms(th, b_a, b_b, b_k, b_q, L, o_t, m_d, BT, LOG2_BT, DGD, True, BEFORE,
                                                 PRECISION)
        o, scale = _chunk_fwd(p_state + i_bh * DE4, p_new + i_bh * DE4, p_ckpt + (i_bh * NC + c) * DE4, b_k, b_v, b_q,
                              rho, L, o_t, o_d, o_e, m_t, m_d, D, E, P, Br, Gd, A, Bk, cc, wg, wp, wb, BL, cL, AL, kh,
                              Akk, Tinv, Bp, cp, Bq, cq, gq, bq, QK, QKh, BT, BD, BE, DGD, True, CLIP, True, PRECISION)
        tl.store(p_y + o_td, o, mask=m_td)
        tl.store(p_scale + i_bh * NC + c, scale)


@triton.jit
def _mem_bwd_kernel(p_kvq, p_gates, p_ckpt, p_dstate, p_dn, p_park, p_mom, p_dy, p_dkvq, p_dgates, p_dmom,
                    T, H, D, E, C, NC, rho,
                    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, LOG2_BT: tl.constexpr, DGD: tl.constexpr,
                    BEFORE: tl.constexpr, CLIP: tl.constexpr, PARK: tl.constexpr, PRECISION: tl.constexpr):
    """Backward of the memory pass for one (b, h), chunks in reverse: p_dstate [4, D E] holds the final state's
    gradient on entry and the initial state's on exit; writes dk, dv, dq [T, 3, D], deta, dalpha [T, 2] and this
    (b, h)'s d momentum into p_dmom. PARK: p_park holds ``park_floats(BT, BD)`` floats per (b, h) (``_chunk_bwd``)."""
    i_bh = tl.program_id(0).to(tl.int64)
    h = i_bh % H
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    m_d = o_d < D
    DE4 = 4 * D * E
    mom = tl.load(p_mom + H + h)
    dm = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    for i_r in range(0, NC):
        c = NC - 1 - i_r
        t0, m_t, L, m_td, o_td = _chunk_rows(i_bh, c, T, C, D, o_t, o_d, m_d)
        b_k, b_v, b_q, th, b_a, b_b, o_kvq, o_g = _mem_chunk_inputs(p_kvq, p_gates, i_bh, t0, T, D, o_t, o_d, m_t,
                                                                    m_td, mom)
        b_do = tl.load(p_dy + o_td, mask=m_td, other=0.0)
        (P, Br, Gd, A, Bk, cc, Brs, Gs, wg, wp, wb, BL, cL, AL, kh, khn, KhKh, KhK, M, Akk, Tinv, Bp, cp,
         Bq, cq, gq, bq, QK, QKh) = _chunk_terms(th, b_a, b_b, b_k, b_q, L, o_t, m_d, BT, LOG2_BT, DGD, True, BEFORE,
                                                 PRECISION)
        dk, dv, dq, dth, da, db = _chunk_bwd(
            p_ckpt + (i_bh * NC + c) * DE4, p_dstate + i_bh * DE4, p_dn + i_bh * DE4,
            p_park + i_bh * (_N_TD_SLOTS * BT * BD + _N_TT_SLOTS * BT * BT), b_k, b_v, b_q, b_do, rho, L, o_t, o_d,
            o_e, m_t, m_d, D, E, th, b_a, b_b, P, Br, Gd, A, Bk, cc, Brs, Gs, wg, wp, wb, BL, cL, AL, kh, khn, KhKh,
            KhK, M, Akk, Tinv, Bp, cp, Bq, cq, gq, bq, QK, QKh, BT, BD, BE, DGD, True, BEFORE, CLIP, PARK, PRECISION)
        tl.store(p_dkvq + o_kvq, dk, mask=m_td)
        tl.store(p_dkvq + o_kvq + D, dv, mask=m_td)
        tl.store(p_dkvq + o_kvq + 2 * D, dq, mask=m_td)
        tl.store(p_dgates + o_g, dth, mask=m_t)
        tl.store(p_dgates + o_g + 1, -db, mask=m_t)
        dm += tl.sum(da, axis=0)
    tl.store(p_dmom + i_bh, dm)


@triton.jit
def _gen_bwd_kernel(p_xq, p_xk, p_xv, p_ckpt, p_work, p_seg, p_new, p_dstate, p_dn, p_readout, p_bias, p_mom,
                    p_dkvq, p_dgates, p_dxq, p_dxk, p_dxv, p_dparams,
                    T, H, D, E, C, NC, NK, CK, rho,
                    BT: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr, LOG2_BT: tl.constexpr, G: tl.constexpr,
                    DGD: tl.constexpr, NORM_V: tl.constexpr, CLIP: tl.constexpr, PRECISION: tl.constexpr):
    """Backward of the generator pass for one (b, h): segments of CK chunks in reverse, each recomputed from its
    checkpoint up to its last chunk's start (chunk-start states into p_seg [CK, G, 4, D E]), then its chunks in
    reverse. p_dstate [G, 4, D E]: the final state's gradient on entry, the initial state's on exit. Reads what the
    memory pass sent to the tokens (p_dkvq, p_dgates); writes dxq, dxk, dxv and this (b, h)'s parameter gradients
    p_dparams [2 D + 3] (d r_eta, d r_alpha, d b_eta, d b_alpha, d m_gen)."""
    i_bh = tl.program_id(0).to(tl.int64)
    h = i_bh % H
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_e = tl.arange(0, BE)
    m_d = o_d < D
    DE4 = 4 * D * E
    DE4G = G * DE4
    p_w = p_work + i_bh * DE4G
    p_sg = p_seg + i_bh * CK * DE4G
    p_dst = p_dstate + i_bh * DE4G
    r_eta, r_alpha, b_eta, b_alpha, m_gen, m_mem = _head_params(p_readout, p_bias, p_mom, h, H, D, o_d, m_d)
    dr_eta = tl.zeros([BD], dtype=tl.float32)
    dr_alpha = tl.zeros([BD], dtype=tl.float32)
    zero = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)
    db_eta = zero
    db_alpha = zero
    dm = zero
    zeros_td = tl.zeros([BT, BD], dtype=tl.float32)
    for i_s in range(0, NK):
        s = NK - 1 - i_s
        c0 = s * CK
        c1 = tl.minimum(NC, c0 + CK)
        _copy_state_all(p_ckpt + (i_bh * NK + s) * DE4G, p_w, o_d, o_e, m_d, D, E, BE, G)
        # the segment's chunk-start states; its last chunk's end state is the next checkpoint, so no step for it
        for c in range(c0, c1 - 1):
            t0, m_t, L, m_td, o_td = _chunk_rows(i_bh, c, T, C, D, o_t, o_d, m_d)
            b_xq = tl.load(p_xq + o_td, mask=m_td, other=0.0)
            b_xk = tl.load(p_xk + o_td, mask=m_td, other=0.0)
            b_xv = tl.load(p_xv + o_td, mask=m_td, other=0.0)
            _gen_chunk(p_w, p_new + i_bh * DE4, p_sg + (c - c0) * DE4G, p_new, b_xq, b_xk, b_xv, r_eta, r_alpha,
                       b_eta, b_alpha, m_gen, rho, L, o_t, o_d, o_e, m_t, m_d, D, E, BT, BD, BE, LOG2_BT, G, DGD,
                       NORM_V, CLIP, True, False, PRECISION)
        _copy_state_all(p_w, p_sg + (c1 - 1 - c0) * DE4G, o_d, o_e, m_d, D, E, BE, G)
        for i_c in range(0, c1 - c0):
            c = c1 - 1 - i_c
            p_start = p_sg + (c - c0) * DE4G
            t0, m_t, L, m_td, o_td = _chunk_rows(i_bh, c, T, C, D, o_t, o_d, m_d)
            b_xq = tl.load(p_xq + o_td, mask=m_td, other=0.0)
            b_xk = tl.load(p_xk + o_td, mask=m_td, other=0.0)
            b_xv = tl.load(p_xv + o_td, mask=m_td, other=0.0)
            k, kn, v, vn, q, qn, eta, alpha, oe, oa = _gen_front(p_start, b_xq, b_xk, b_xv, r_eta, r_alpha, b_eta,
                                                                 b_alpha, m_t, o_d, o_e, m_d, D, E, BT, BD, BE, G,
                                                                 NORM_V, PRECISION)
            b_a = tl.where(m_t, m_gen, 1.0)
            b_b = tl.where(m_t, 1.0 - alpha, 1.0)
            (P, Br, Gd, A, Bk, cc, Brs, Gs, wg, wp, wb, BL, cL, AL, kh, khn, KhKh, KhK, M, Akk, Tinv, Bp, cp,
             Bq, cq, gq, bq, QK, QKh) = _chunk_terms(eta, b_a, b_b, k, k, L, o_t, m_d, BT, LOG2_BT, DGD, False, False,
                                                     PRECISION)
            o_kvq = i_bh * T * 3 * D + (t0 + o_t)[:, None] * 3 * D + o_d[None, :]
            dk = tl.load(p_dkvq + o_kvq, mask=m_td, other=0.0)
            dv = tl.load(p_dkvq + o_kvq + D, mask=m_td, other=0.0)
            dq = tl.load(p_dkvq + o_kvq + 2 * D, mask=m_td, other=0.0)
            o_g = (i_bh * T + t0 + o_t) * 2
            deta = tl.load(p_dgates + o_g, mask=m_t, other=0.0)
            dalpha = tl.load(p_dgates + o_g + 1, mask=m_t, other=0.0)
            for g in range(G):  # one copy of the chunk backward, not G
                vh = _read(p_start + g * DE4, v, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION)
                dk_g, dvh, dq_g, dth, da, db = _chunk_bwd(
                    p_start + g * DE4, p_dst + g * DE4, p_dn + i_bh * DE4, p_dn, k, vh, k, zeros_td, rho, L, o_t, o_d,
                    o_e, m_t, m_d, D, E, eta, b_a, b_b, P, Br, Gd, A, Bk, cc, Brs, Gs, wg, wp, wb, BL, cL, AL, kh,
                    khn, KhKh, KhK, M, Akk, Tinv, Bp, cp, Bq, cq, gq, bq, QK, QKh, BT, BD, BE, DGD, False, False, CLIP,
                    False, PRECISION)
                dk += dk_g
                deta += dth
                dalpha -= db
                dm += tl.sum(da, axis=0)
                # targets v^_g = M_g(v)
                dv += _read_bwd(p_start + g * DE4, p_dst + g * DE4, v, dvh, o_d, o_e, m_d, D, E, BT, BD, BE,
                                PRECISION)
            # gates, normalisations, then the reads back to x
            dze = tl.where(m_t, deta * eta * (1.0 - eta), 0.0)
            dza = tl.where(m_t, dalpha * alpha * (1.0 - alpha), 0.0)
            dr_eta += tl.sum(dze[:, None] * oe, axis=0)
            dr_alpha += tl.sum(dza[:, None] * oa, axis=0)
            db_eta += tl.sum(dze, axis=0)
            db_alpha += tl.sum(dza, axis=0)
            dok = _l2n_bwd(k, kn, dk)
            dov = dv
            if NORM_V:
                dov = _l2n_bwd(v, vn, dv)
            dxk = _read_bwd(p_start, p_dst, b_xk, dok, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION)
            dxk += _read_bwd(p_start + 2 * DE4, p_dst + 2 * DE4, b_xk, dze[:, None] * r_eta[None, :], o_d, o_e, m_d,
                             D, E, BT, BD, BE, PRECISION)
            dxk += _read_bwd(p_start + 3 * DE4, p_dst + 3 * DE4, b_xk, dza[:, None] * r_alpha[None, :], o_d, o_e,
                             m_d, D, E, BT, BD, BE, PRECISION)
            dxv = _read_bwd(p_start + DE4, p_dst + DE4, b_xv, dov, o_d, o_e, m_d, D, E, BT, BD, BE, PRECISION)
            if G == 5:
                dxq = _read_bwd(p_start + 4 * DE4, p_dst + 4 * DE4, b_xq, _l2n_bwd(q, qn, dq), o_d, o_e, m_d, D, E,
                                BT, BD, BE, PRECISION)
            else:
                dxq = _l2n_bwd(q, qn, dq)
            tl.store(p_dxq + o_td, dxq, mask=m_td)
            tl.store(p_dxk + o_td, dxk, mask=m_td)
            tl.store(p_dxv + o_td, dxv, mask=m_td)
    o_p = i_bh * (2 * D + 3)
    tl.store(p_dparams + o_p + o_d, dr_eta, mask=m_d)
    tl.store(p_dparams + o_p + D + o_d, dr_alpha, mask=m_d)
    tl.store(p_dparams + o_p + 2 * D, db_eta)
    tl.store(p_dparams + o_p + 2 * D + 1, db_alpha)
    tl.store(p_dparams + o_p + 2 * D + 2, dm)
