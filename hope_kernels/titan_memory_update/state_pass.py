"""The linear-memory state pass as custom ops, shared by every kernel backend (Triton, CUDA, C++).

Each backend supplies two functions with the Triton launchers' tensor contract (docs/kernels/titan_memory.md,
"kernel split"):

- ``fwd(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size) -> (out, W_T, S_T)``
- ``bwd(do, dWT, dST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size) -> 12 gradients``
  ``[dq, dk, dkh, dv, daqk, dakk, dtinv, daqw, dvec, dend, dW0, dS0]`` (empty tensors where not dgd)

(dgd when ``kh`` is given; inputs arrive contiguous). :func:`define_state_pass_ops` registers them as
``hope::titan_linear_fwd<suffix>`` / ``hope::titan_linear_bwd<suffix>`` with fake implementations and autograd, so
``torch.compile(fullgraph=True)`` traces models that use them; :func:`backend_entry` wraps the forward op into a
``titan_memory_update`` backend (chunk terms by ``linear_chunk_terms``, whose autograd carries the op's gradients
to q, k and the gates).

The mlp memory (M(x) = x + W1 gelu(W2 x)) has its own pair, :func:`define_mlp_state_pass_ops`
(``hope::titan_mlp_fwd<suffix>`` / ``hope::titan_mlp_bwd<suffix>``), with the contract of
``chunk_terms.mlp_state_pass``:

- ``fwd(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, chunk_size) -> (out, W1_T, W2_T, S1_T, S2_T)``
- ``bwd(do, dW1T, dW2T, dS1T, dS2T, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, chunk_size)``
  ``-> [dq, dk, dkh, dv, daqk, dgth, dakk, dtinv, daqw, dvec, dend, dW1, dW2, dS1, dS2]`` (empty where not dgd)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from hope_kernels.titan_memory_update.chunk_terms import linear_chunk_terms
from hope_kernels.titan_memory_update.state import LinearMemoryState, MLPMemoryState

#: the gradients the mlp backward ops return, in order
MLP_GRAD_NAMES = ("dq", "dk", "dkh", "dv", "daqk", "dgth", "dakk", "dtinv", "daqw", "dvec", "dend",
                  "dW1", "dW2", "dS1", "dS2")


def _contiguous(*xs):
    return [x.contiguous() if x is not None else None for x in xs]


def define_state_pass_ops(suffix: str, fwd: Callable, bwd: Callable):
    """Registers the forward and backward custom ops of one backend; returns ``(fwd_op, bwd_op)``."""

    @torch.library.custom_op(f"hope::titan_linear_fwd{suffix}", mutates_args=())
    def fwd_op(
        q: torch.Tensor, k: torch.Tensor, kh: Optional[torch.Tensor], v: torch.Tensor, aqk: torch.Tensor,
        akk: Optional[torch.Tensor], tinv: Optional[torch.Tensor], aqw: Optional[torch.Tensor],
        vec: torch.Tensor, end: torch.Tensor, W0: torch.Tensor, S0: torch.Tensor, chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out [B, H, T, Dv] in q's dtype, W_T, S_T fp32); dgd when ``kh`` is given."""
        return tuple(fwd(*_contiguous(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0), chunk_size))

    @fwd_op.register_fake
    def _(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size):
        B, H, T, _ = q.shape
        return (q.new_empty(B, H, T, v.shape[-1]), W0.new_empty(W0.shape, dtype=torch.float32),
                S0.new_empty(S0.shape, dtype=torch.float32))

    @torch.library.custom_op(f"hope::titan_linear_bwd{suffix}", mutates_args=())
    def bwd_op(
        do: torch.Tensor, dWT: torch.Tensor, dST: torch.Tensor,
        q: torch.Tensor, k: torch.Tensor, kh: Optional[torch.Tensor], v: torch.Tensor, aqk: torch.Tensor,
        akk: Optional[torch.Tensor], tinv: Optional[torch.Tensor], aqw: Optional[torch.Tensor],
        vec: torch.Tensor, end: torch.Tensor, W0: torch.Tensor, S0: torch.Tensor, chunk_size: int,
    ) -> list[torch.Tensor]:
        """Gradients [dq, dk, dkh, dv, daqk, dakk, dtinv, daqw, dvec, dend, dW0, dS0] (empty where not dgd)."""
        xs = _contiguous(do, dWT, dST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0)
        return list(bwd(*xs, chunk_size))

    @bwd_op.register_fake
    def _(do, dWT, dST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size):
        # real outputs are fresh contiguous tensors (gradients of half q/k/v in their dtype, the rest fp32)
        f32 = lambda x: (q.new_empty(x.shape, dtype=torch.float32) if x is not None  # noqa: E731
                         else q.new_empty(0, dtype=torch.float32))
        return [q.new_empty(q.shape), k.new_empty(k.shape), f32(kh), v.new_empty(v.shape), f32(aqk), f32(akk),
                f32(tinv), f32(aqw), f32(vec), f32(end), f32(W0), f32(S0)]

    def setup_context(ctx, inputs, output):
        q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size = inputs
        ctx.save_for_backward(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0)
        ctx.chunk_size = chunk_size

    def backward(ctx, d_out, d_WT, d_ST):
        q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0 = ctx.saved_tensors
        B, H, T, _ = q.shape
        # the kernels take do in q's dtype (out's dtype, so this is a no-op for autograd's own gradients)
        d_out = q.new_zeros(B, H, T, v.shape[-1]) if d_out is None else d_out.to(q.dtype)
        d_WT = torch.zeros_like(W0, dtype=torch.float32) if d_WT is None else d_WT.float()
        d_ST = torch.zeros_like(S0, dtype=torch.float32) if d_ST is None else d_ST.float()
        grads = bwd_op(d_out, d_WT, d_ST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, ctx.chunk_size)
        dq, dk, dkh, dv, daqk, dakk, dtinv, daqw, dvec, dend, dW0, dS0 = grads
        if kh is None:
            dkh = dakk = dtinv = daqw = None
        return dq, dk, dkh, dv, daqk, dakk, dtinv, daqw, dvec, dend, dW0.to(W0.dtype), dS0.to(S0.dtype), None

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op, bwd_op


def define_mlp_state_pass_ops(suffix: str, fwd: Callable, bwd: Callable):
    """The mlp memory's forward and backward custom ops of one backend; returns ``(fwd_op, bwd_op)``."""

    @torch.library.custom_op(f"hope::titan_mlp_fwd{suffix}", mutates_args=())
    def fwd_op(
        q: torch.Tensor, k: torch.Tensor, kh: Optional[torch.Tensor], v: torch.Tensor, aqk: torch.Tensor,
        gth: torch.Tensor, akk: Optional[torch.Tensor], tinv: Optional[torch.Tensor], aqw: Optional[torch.Tensor],
        vec: torch.Tensor, end: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, S1: torch.Tensor,
        S2: torch.Tensor, chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out [B, H, T, D] in q's dtype, W1_T, W2_T, S1_T, S2_T fp32); dgd when ``kh`` is given."""
        xs = _contiguous(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2)
        return tuple(fwd(*xs, chunk_size))

    @fwd_op.register_fake
    def _(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, chunk_size):
        f32 = lambda x: x.new_empty(x.shape, dtype=torch.float32)  # noqa: E731
        return q.new_empty(q.shape), f32(W1), f32(W2), f32(S1), f32(S2)

    @torch.library.custom_op(f"hope::titan_mlp_bwd{suffix}", mutates_args=())
    def bwd_op(
        do: torch.Tensor, dW1T: torch.Tensor, dW2T: torch.Tensor, dS1T: torch.Tensor, dS2T: torch.Tensor,
        q: torch.Tensor, k: torch.Tensor, kh: Optional[torch.Tensor], v: torch.Tensor, aqk: torch.Tensor,
        gth: torch.Tensor, akk: Optional[torch.Tensor], tinv: Optional[torch.Tensor], aqw: Optional[torch.Tensor],
        vec: torch.Tensor, end: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, S1: torch.Tensor,
        S2: torch.Tensor, chunk_size: int,
    ) -> list[torch.Tensor]:
        """Gradients in the order of ``MLP_GRAD_NAMES`` (empty where not dgd)."""
        xs = _contiguous(do, dW1T, dW2T, dS1T, dS2T, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2)
        return list(bwd(*xs, chunk_size))

    @bwd_op.register_fake
    def _(do, dW1T, dW2T, dS1T, dS2T, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, chunk_size):
        f32 = lambda x: (q.new_empty(x.shape, dtype=torch.float32) if x is not None  # noqa: E731
                         else q.new_empty(0, dtype=torch.float32))
        return [q.new_empty(q.shape), k.new_empty(k.shape), f32(kh), v.new_empty(v.shape),
                *(f32(x) for x in (aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2))]

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:-1])
        ctx.chunk_size = inputs[-1]

    def backward(ctx, d_out, *d_state):
        saved = ctx.saved_tensors
        q, kh, v, states = saved[0], saved[2], saved[3], saved[-4:]
        d_out = torch.zeros_like(q) if d_out is None else d_out.to(q.dtype)
        d_state = [torch.zeros_like(s, dtype=torch.float32) if d is None else d.float()
                   for d, s in zip(d_state, states)]
        grads = bwd_op(d_out, *d_state, *saved, ctx.chunk_size)
        if kh is None:  # dkh, dakk, dtinv, daqw
            grads[2] = grads[6] = grads[7] = grads[8] = None
        grads[-4:] = [g.to(s.dtype) for g, s in zip(grads[-4:], states)]
        return (*grads, None)

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op, bwd_op


def needs_backward(q, k, v, lr, momentum, decay, state) -> bool:
    """Whether autograd will ask for gradients of this call (some backends refuse a backward they cannot fit)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, lr, momentum, decay, *state))


def backend_entry(backend: str, fwd_op, why_not: Callable[..., Optional[str]], mlp_fwd_op=None,
                  mlp_why_not: Optional[Callable[..., Optional[str]]] = None):
    """``titan_memory_update_<backend>(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state)``: the
    linear memory through ``fwd_op``, the mlp memory through ``mlp_fwd_op`` (when the backend has one); same
    contract as ``titan_memory_update_reference`` (arguments checked). ``why_not(Dk, Dv, chunk_size, rule,
    backward)`` / ``mlp_why_not(D, E, chunk_size, rule, backward)`` name the calls the kernels refuse."""

    def titan_memory_update_backend(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state):
        if memory == "mlp" and mlp_fwd_op is None:
            raise NotImplementedError(
                f"the {backend} backend of titan_memory_update implements memory='linear' only; "
                "memory='mlp' runs on backend='reference' (backend='auto' picks it)")
        if q.dtype == torch.float64:
            raise TypeError(f"the {backend} backend of titan_memory_update takes fp32/bf16/fp16 q, k, v; use "
                            "backend='reference' for float64")
        backward = needs_backward(q, k, v, lr, momentum, decay, state)
        if memory == "mlp":
            why = mlp_why_not(q.shape[-1], state.W1.shape[-1], chunk_size, rule, backward) if mlp_why_not else None
        else:
            why = why_not(q.shape[-1], v.shape[-1], chunk_size, rule, backward)
        if why is not None:
            raise ValueError(f"the {backend} backend of titan_memory_update {why}; backend='auto' runs this call "
                             f"on the next backend that takes it")
        dgd = rule == "dgd"
        terms = linear_chunk_terms(q, k, lr, momentum, decay, chunk_size, dgd, mlp=memory == "mlp")
        if memory == "mlp":
            out, *st = mlp_fwd_op(q, k, terms.khat, v, terms.aqk, terms.gth, terms.akk, terms.tinv, terms.aqw,
                                  terms.vec, terms.end, *(x.float() for x in state), chunk_size)
            return out, MLPMemoryState(*st)
        out, WT, ST = fwd_op(q, k, terms.khat, v, terms.aqk, terms.akk, terms.tinv, terms.aqw, terms.vec,
                             terms.end, state.W.float(), state.S.float(), chunk_size)
        return out, LinearMemoryState(WT, ST)

    titan_memory_update_backend.__name__ = f"titan_memory_update_{backend}"
    return titan_memory_update_backend


__all__ = ["define_state_pass_ops", "define_mlp_state_pass_ops", "backend_entry", "needs_backward", "MLP_GRAD_NAMES"]
