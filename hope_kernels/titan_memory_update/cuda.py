"""CUDA ``titan_memory_update`` for the linear memory, rules ``titans`` and ``dgd`` (csrc/titan_linear.cu).

Same split as the Triton backend (``triton.py``, docs/kernels/titan_memory.md "kernel split" and "CUDA port"):
``chunk_terms.linear_chunk_terms`` computes every state-independent chunk term with batched PyTorch ops
(autograd differentiates it), then the extension's two state-pass kernels carry the state: forward
(``titan_linear_fwd``) and backward (``titan_linear_bwd``, which re-runs the forward to store the chunk-start
states). They take the Triton launchers' tensor contract and are registered as the custom ops
``hope::titan_linear_fwd_cuda`` / ``hope::titan_linear_bwd_cuda`` (fake implementations + ``register_autograd``),
so ``torch.compile(fullgraph=True)`` traces them.

Limits of the kernels: Dk, Dv <= 128 and chunk_size <= 64 (state tiles in shared memory); ``titan_memory_update``
under ``backend="auto"`` runs larger shapes on the next backend (see ``fits``). The mlp memory runs on the
reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from hope_kernels import _ext, dispatch
from hope_kernels.titan_memory_update.chunk_terms import linear_chunk_terms
from hope_kernels.titan_memory_update.state import LinearMemoryState

OP = "titan_memory_update"
#: largest head dims (Dk, Dv) and chunk size the CUDA kernels take (csrc/titan_linear.cu kMaxDim, kMaxChunk)
MAX_HEAD_DIM = 128
MAX_CHUNK = 64
#: the extension was built with these kernels (an older build of _C_cuda may lack them)
AVAILABLE = _ext.cuda is not None and hasattr(_ext.cuda, "titan_linear_fwd")


def fits(Dk: int, Dv: int, chunk_size: int) -> bool:
    """Whether the CUDA kernels take these sizes."""
    return Dk <= MAX_HEAD_DIM and Dv <= MAX_HEAD_DIM and chunk_size <= MAX_CHUNK


def why_not(Dk: int, Dv: int, chunk_size: int, rule: str, backward: bool) -> str | None:
    """None when the CUDA kernels run this call, else why not (the dispatcher's per-shape check)."""
    if fits(Dk, Dv, chunk_size):
        return None
    return (f"takes Dk, Dv <= {MAX_HEAD_DIM} and chunk_size <= {MAX_CHUNK}, got Dk={Dk}, Dv={Dv}, "
            f"chunk_size={chunk_size}")


def _ext_fn(name: str):
    if not AVAILABLE:
        why = _ext.why_unavailable("_C_cuda") or "the loaded hope_kernels._C_cuda was built without it"
        raise RuntimeError(f"hope_kernels._C_cuda.{name} is not available: {why}")
    return getattr(_ext.cuda, name)


def _contiguous(*xs):
    return [x.contiguous() if x is not None else None for x in xs]


@torch.library.custom_op("hope::titan_linear_fwd_cuda", mutates_args=())
def titan_linear_fwd_cuda(
    q: torch.Tensor, k: torch.Tensor, kh: Optional[torch.Tensor], v: torch.Tensor, aqk: torch.Tensor,
    akk: Optional[torch.Tensor], tinv: Optional[torch.Tensor], aqw: Optional[torch.Tensor],
    vec: torch.Tensor, end: torch.Tensor, W0: torch.Tensor, S0: torch.Tensor, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, H, T, Dv] in q's dtype, W_T, S_T fp32); dgd when ``kh`` is given."""
    xs = _contiguous(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0)
    out, WT, ST, _ = _ext_fn("titan_linear_fwd")(*xs, chunk_size, False)
    return out, WT, ST


@titan_linear_fwd_cuda.register_fake
def _(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size):
    B, H, T, _ = q.shape
    return (q.new_empty(B, H, T, v.shape[-1]), W0.new_empty(W0.shape, dtype=torch.float32),
            S0.new_empty(S0.shape, dtype=torch.float32))


@torch.library.custom_op("hope::titan_linear_bwd_cuda", mutates_args=())
def titan_linear_bwd_cuda(
    do: torch.Tensor, dWT: torch.Tensor, dST: torch.Tensor,
    q: torch.Tensor, k: torch.Tensor, kh: Optional[torch.Tensor], v: torch.Tensor, aqk: torch.Tensor,
    akk: Optional[torch.Tensor], tinv: Optional[torch.Tensor], aqw: Optional[torch.Tensor],
    vec: torch.Tensor, end: torch.Tensor, W0: torch.Tensor, S0: torch.Tensor, chunk_size: int,
) -> list[torch.Tensor]:
    """Gradients [dq, dk, dkh, dv, daqk, dakk, dtinv, daqw, dvec, dend, dW0, dS0] (empty where not dgd)."""
    xs = _contiguous(do, dWT, dST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0)
    return list(_ext_fn("titan_linear_bwd")(*xs, chunk_size))


@titan_linear_bwd_cuda.register_fake
def _(do, dWT, dST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size):
    # real outputs are fresh contiguous tensors (gradients of half q/k/v in their dtype, the rest fp32)
    f32 = lambda x: (q.new_empty(x.shape, dtype=torch.float32) if x is not None  # noqa: E731
                     else q.new_empty(0, dtype=torch.float32))
    return [q.new_empty(q.shape), k.new_empty(k.shape), f32(kh), v.new_empty(v.shape), f32(aqk), f32(akk),
            f32(tinv), f32(aqw), f32(vec), f32(end), f32(W0), f32(S0)]


def _setup_context(ctx, inputs, output):
    q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size = inputs
    ctx.save_for_backward(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0)
    ctx.chunk_size = chunk_size


def _backward(ctx, d_out, d_WT, d_ST):
    # as triton.py's _backward; the kernel takes do in q's dtype
    q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0 = ctx.saved_tensors
    B, H, T, _ = q.shape
    d_out = q.new_zeros(B, H, T, v.shape[-1]) if d_out is None else d_out.to(q.dtype)
    d_WT = torch.zeros_like(W0, dtype=torch.float32) if d_WT is None else d_WT.float()
    d_ST = torch.zeros_like(S0, dtype=torch.float32) if d_ST is None else d_ST.float()
    grads = torch.ops.hope.titan_linear_bwd_cuda(d_out, d_WT, d_ST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end,
                                                 W0, S0, ctx.chunk_size)
    dq, dk, dkh, dv, daqk, dakk, dtinv, daqw, dvec, dend, dW0, dS0 = grads
    if kh is None:
        dkh = dakk = dtinv = daqw = None
    return dq, dk, dkh, dv, daqk, dakk, dtinv, daqw, dvec, dend, dW0.to(W0.dtype), dS0.to(S0.dtype), None


titan_linear_fwd_cuda.register_autograd(_backward, setup_context=_setup_context)


def titan_memory_update_cuda(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state):
    """Linear memory on the CUDA extension; same contract as ``titan_memory_update_reference``."""
    if memory != "linear":
        raise NotImplementedError(
            "the cuda backend of titan_memory_update implements memory='linear' only; "
            "memory='mlp' runs on backend='reference' (backend='auto' picks it)")
    if q.dtype == torch.float64:
        raise TypeError("the cuda backend of titan_memory_update takes fp32/bf16/fp16 q, k, v; use "
                        "backend='reference' for float64")
    Dk, Dv = q.shape[-1], v.shape[-1]
    if not fits(Dk, Dv, chunk_size):
        raise ValueError(
            f"the cuda backend of titan_memory_update takes Dk, Dv <= {MAX_HEAD_DIM} and chunk_size <= "
            f"{MAX_CHUNK}, got Dk={Dk}, Dv={Dv}, chunk_size={chunk_size}; backend='auto' runs these on triton")
    dgd = rule == "dgd"
    terms = linear_chunk_terms(q, k, lr, momentum, decay, chunk_size, dgd)
    W0, S0 = state.W.float(), state.S.float()
    out, WT, ST = torch.ops.hope.titan_linear_fwd_cuda(
        q, k, terms.khat, v, terms.aqk, terms.akk, terms.tinv, terms.aqw, terms.vec, terms.end, W0, S0,
        chunk_size)
    return out, LinearMemoryState(WT, ST)


if AVAILABLE:
    dispatch.register(OP, "cuda", titan_memory_update_cuda, lambda device: device.type == "cuda")
