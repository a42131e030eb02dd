"""Triton teach signal: cross-entropy of ``hidden @ weight^T`` and its gradients without the [N, V] logits.

Two kernels (docs/kernels/teach_signal.md), anchored on Cut Cross-Entropy's dE/dC backward:

1. ``_ts_lse_kernel`` grid (token blocks, vocabulary splits): each program walks its V tiles, forms the
   logit tile ``h_blk @ W_tile^T`` by a loop over D chunks (fp32 accumulation), and keeps an online
   max / sum-exp per row plus the target logit; the splits are merged by a log-sum-exp over [S, N].
2. ``_ts_grad_kernel`` grid (token blocks, V tiles): recomputes its logit tile, forms
   G = (softmax - onehot) * valid / N_valid, and atomically adds G @ W_tile into delta [N, D] and,
   when the head is trained, G^T @ h_blk into dW [V, D].

Peak extra memory: delta and dW in fp32 plus O(S N) partials; the logits exist one tile at a time.
The "triton" backend: ``hope::teach_signal`` (interface.py) calls :func:`teach_signal_kernel`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hope_kernels.backends import Backend, triton_runs_on


@triton.jit
def _logit_tile(p_h, p_w, o_n, m_n, o_v, m_v, D, stride_hn, stride_wv, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """The [BLOCK_N, BLOCK_V] logit tile h_blk @ W_tile^T, accumulated in fp32 over D chunks."""
    b_z = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_hd = tl.load(p_h + o_n[:, None] * stride_hn + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_wd = tl.load(p_w + o_v[:, None] * stride_wv + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0)
        b_z = tl.dot(b_hd, tl.trans(b_wd), b_z, input_precision=PRECISION)
    return b_z


@triton.jit
def _ts_lse_kernel(
    p_h, p_w, p_t, p_m, p_l, p_tgt,
    N, V, D, V_PER_SPLIT,
    stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    i_n, i_s = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_t = tl.load(p_t + o_n, mask=m_n, other=-1)
    b_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK_N], tl.float32)
    b_tgt = tl.zeros([BLOCK_N], tl.float32)
    v_lo = i_s * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < v_hi
        b_z = _logit_tile(p_h, p_w, o_n, m_n, o_v, m_v, D, stride_hn, stride_wv, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        b_z = tl.where(m_v[None, :], b_z, float("-inf"))
        # online log-sum-exp: rescale the running sum to the new row max
        b_new_max = tl.maximum(b_max, tl.max(b_z, axis=1))
        b_safe_max = tl.where(b_new_max == float("-inf"), 0.0, b_new_max)
        b_sum = b_sum * tl.exp(b_max - b_safe_max) + tl.sum(tl.exp(b_z - b_safe_max[:, None]), axis=1)
        b_max = b_new_max
        b_tgt += tl.sum(tl.where(o_v[None, :] == b_t[:, None], b_z, 0.0), axis=1)
    o_out = i_s * N + o_n
    tl.store(p_m + o_out, b_max, mask=m_n)
    tl.store(p_l + o_out, b_sum, mask=m_n)
    tl.store(p_tgt + o_out, b_tgt, mask=m_n)


@triton.jit
def _ts_grad_kernel(
    p_h, p_w, p_t, p_lse, p_scale, p_delta, p_dw,
    N, V, D,
    stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    i_n, i_v = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
    m_n = o_n < N
    m_v = o_v < V
    b_scale = tl.load(p_scale + o_n, mask=m_n, other=0.0)
    b_t = tl.load(p_t + o_n, mask=m_n, other=-1)
    b_lse = tl.load(p_lse + o_n, mask=m_n, other=0.0)
    b_z = _logit_tile(p_h, p_w, o_n, m_n, o_v, m_v, D, stride_hn, stride_wv, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
    # G = d loss / d logits = (softmax - onehot) * valid / N_valid (NL F1), zero outside the tile
    b_g = tl.exp(b_z - b_lse[:, None]) - tl.where(o_v[None, :] == b_t[:, None], 1.0, 0.0)
    b_g = tl.where(m_v[None, :], b_g * b_scale[:, None], 0.0)
    b_gc = b_g.to(p_h.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_wd = tl.load(p_w + o_v[:, None] * stride_wv + o_d[None, :], mask=m_v[:, None] & m_d[None, :], other=0.0)
        b_delta = tl.dot(b_gc, b_wd, input_precision=PRECISION)
        tl.atomic_add(p_delta + o_n[:, None] * D + o_d[None, :], b_delta, mask=m_n[:, None] & m_d[None, :])
        if COMPUTE_DW:
            b_hd = tl.load(p_h + o_n[:, None] * stride_hn + o_d[None, :], mask=m_n[:, None] & m_d[None, :], other=0.0)
            b_dw = tl.dot(tl.trans(b_gc), b_hd, input_precision=PRECISION)
            tl.atomic_add(p_dw + o_v[:, None] * D + o_d[None, :], b_dw, mask=m_v[:, None] & m_d[None, :])


def _config(hidden: torch.Tensor, D: int, gpu: bool | None = None) -> dict:
    """Fixed tiles (the interpreter gets autotune wrong): tensor-core sized on GPU, small under interpretation
    (``gpu`` overrides the device check: bench/triton_resources.py compiles the GPU tiles without a GPU)."""
    if not (hidden.device.type == "cuda" if gpu is None else gpu):
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, num_warps=4)
    if hidden.dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4)
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8)


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs follow torch's matmul setting: exact fp32 unless the caller allowed TF32
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee" if dtype == torch.float64 else None  # half types: Triton's default tensor-core path


def _teach_signal_forward(hidden, weight, targets, ignore_index: int, compute_dw: bool):
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    h = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    t = targets.long().contiguous()
    delta32 = torch.zeros(N, D, device=dev, dtype=torch.float32)
    dw32 = torch.zeros(V if compute_dw else 0, D, device=dev, dtype=torch.float32)
    valid = t != ignore_index
    n_valid = valid.sum().clamp_min(1).float()
    if N == 0:
        return hidden.new_zeros((), dtype=torch.float32), delta32, dw32
    cfg = _config(hidden, D)
    bn, bv, bd, warps = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_D"], cfg["num_warps"]
    precision = _precision(hidden.dtype)
    n_blocks = triton.cdiv(N, bn)
    v_tiles = triton.cdiv(V, bv)
    # split V so that few token blocks still fill the GPU (about 4 programs per SM)
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        splits = max(1, min(v_tiles, triton.cdiv(4 * sms, n_blocks)))
    else:
        splits = min(v_tiles, 2)
    v_per_split = triton.cdiv(v_tiles, splits) * bv
    splits = triton.cdiv(V, v_per_split)
    part_max = torch.empty(splits, N, device=dev, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    part_tgt = torch.empty_like(part_max)
    _ts_lse_kernel[(n_blocks, splits)](
        h, w, t, part_max, part_sum, part_tgt, N, V, D, v_per_split, h.stride(0), w.stride(0),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, PRECISION=precision, num_warps=warps,
    )
    lse = torch.logsumexp(part_max + part_sum.log(), dim=0)  # [N]
    target_logit = part_tgt.sum(0)
    row_loss = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
    loss = row_loss.sum() / n_valid
    scale = valid.float() / n_valid
    _ts_grad_kernel[(n_blocks, v_tiles)](
        h, w, t, lse, scale, delta32, dw32, N, V, D, h.stride(0), w.stride(0),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, PRECISION=precision, COMPUTE_DW=compute_dw, num_warps=warps,
    )
    return loss, delta32, dw32


def teach_signal_kernel(hidden, weight, targets, ignore_index: int, compute_dw: bool, chunk_rows: int):
    """``(loss, delta in hidden's dtype, dW fp32 or [0, D])``; ``chunk_rows`` is the CUDA kernel's knob (the Triton
    kernels tile rows themselves)."""
    loss, delta32, dw32 = _teach_signal_forward(hidden, weight, targets, ignore_index, compute_dw)
    return loss, delta32.to(hidden.dtype), dw32


BACKEND = Backend("teach_signal", "triton", priority=20, kernel=teach_signal_kernel, runs_on=triton_runs_on,
                  env="HOPE_USE_TRITON")
