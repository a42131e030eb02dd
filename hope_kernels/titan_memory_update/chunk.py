"""``titan_memory_update``: the chunk terms, the state-pass custom ops every kernel backend runs through, and the
public function.

The op splits in two (docs/kernels/titan_memory.md, "kernel split"):

1. :func:`chunk_terms`: every state-independent per-chunk term (decay carries, the q.k / k^.k score matrices, the
   dgd UT transform (I + M)^-1) for all chunks at once with batched PyTorch ops; autograd differentiates it.
2. ``hope::titan_state_pass`` / ``hope::titan_state_pass_backward``: the sequential pass that carries the memory
   state through the chunks, by the chosen backend's kernels, with one fake and one autograd for every backend.

Kernel contract: a backend record's ``kernel`` maps each memory it implements ("linear", "mlp") to an object with
these two functions (inputs contiguous, fp32 except q, k, v and the incoming gradient of out, which may be bf16 /
fp16):

- ``forward(q, k, v, terms, state, chunk_size) -> [out, *final_state]``: out [B, H, T, Dv] in q's dtype, the final
  state fp32;
- ``backward(grads, q, k, v, terms, state, chunk_size) -> [dq, dk, dv, *dterms, *dstate]``: ``grads`` =
  [d out, *d final_state]; dq, dk, dv in their inputs' dtypes, the rest fp32; an absent term's gradient is empty.

``terms`` is :meth:`ChunkTerms.kernel_terms` (the order of :data:`TERM_NAMES`, csrc/titan_inputs.h has the same);
``state`` is [W, S] (linear) or [W1, W2, S1, S2] (mlp).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from hope_kernels import backends
from hope_kernels._checks import (check_choice, check_finite, check_positive_int, check_range, check_shape,
                                  check_tensor)
from hope_kernels.titan_memory_update.naive import (LinearMemoryState, MLPMemoryState, chunk_decay_terms,
                                                    titan_memory_update_naive, unit_keys, zero_linear_state)

OP = "titan_memory_update"
MEMORIES = ("linear", "mlp")
RULES = ("titans", "dgd")
#: the per-token weights of a chunk, kept in this order in ``ChunkTerms.kernel_terms()``'s ``rows``
ROW_NAMES = ("Bc", "c", "Bp", "cp", "wg", "wp", "wb")
#: the end-of-chunk scalars, in this order in ``ends``
END_NAMES = ("B_L", "c_L", "A_L")
#: the state pass's chunk terms, in the kernels' order (csrc/titan_inputs.h HOPE_TITAN_TERMS has the same)
TERM_NAMES = ("khat", "aqk", "gth", "akk", "tinv", "aqw", "rows", "ends")


@dataclass
class ChunkTerms:
    """The state-independent terms of every chunk, fp32, by their role in docs/kernels/titan_memory.md.

    Matrices [B, H, NC, C, C] (t the row token, i / j the column token of the same chunk):
      aqk  G[t, i] theta_i (q_t . k_i): the titans read-out of the chunk's errors
      gth  G[t, i] theta_i: the mlp memory's decay of its W1 read-out (whose scores depend on the state)
      akk  G[t-1, i] theta_i (k^_t . k_i): dgd, the titans part of W_{t-1} k^_t
      tinv (I + M)^-1 with M[t, j] = Br[t-1, j] theta_j (k^_t . k^_j): dgd, the UT transform
      aqw  Br[t, j] theta_j (q_t . k^_j): dgd, the read-out of the pseudo-values w
    khat [B, H, NC * C, Dk] the unit keys (dgd). Per-token weights [B, H, NC, C]: Bc = B_t, c = c_t, Bp = B_{t-1},
    cp = c_{t-1}, and the end-of-chunk row weights wg = G[L, :] theta, wp = P[L, :] theta, wb = Br[L, :] theta.
    End-of-chunk scalars [B, H, NC] at the chunk's last valid token L: B_L, c_L, A_L.
    A term the call does not use (gth for the linear memory; khat, akk, tinv, aqw, Bp, cp, wb for titans) is None.
    """

    aqk: torch.Tensor
    Bc: torch.Tensor
    c: torch.Tensor
    wg: torch.Tensor
    wp: torch.Tensor
    B_L: torch.Tensor
    c_L: torch.Tensor
    A_L: torch.Tensor
    gth: torch.Tensor | None = None
    khat: torch.Tensor | None = None
    akk: torch.Tensor | None = None
    tinv: torch.Tensor | None = None
    aqw: torch.Tensor | None = None
    Bp: torch.Tensor | None = None
    cp: torch.Tensor | None = None
    wb: torch.Tensor | None = None

    def kernel_terms(self) -> list[torch.Tensor]:
        """The terms in :data:`TERM_NAMES` order, an absent one empty; ``rows`` [B, H, NC, 7, C] stacks the per-token
        weights (:data:`ROW_NAMES`, zeros where absent), ``ends`` [B, H, NC, 3] the end scalars (:data:`END_NAMES`)."""
        zeros = torch.zeros_like(self.Bc)
        packed = {
            "rows": torch.stack([zeros if getattr(self, n) is None else getattr(self, n) for n in ROW_NAMES], dim=-2),
            "ends": torch.stack([getattr(self, n) for n in END_NAMES], dim=-1),
        }
        empty = self.aqk.new_empty(0)
        return [packed[n] if n in packed else (empty if getattr(self, n) is None else getattr(self, n))
                for n in TERM_NAMES]

    @classmethod
    def from_kernel_terms(cls, terms: list[torch.Tensor]) -> "ChunkTerms":
        """The inverse of :meth:`kernel_terms` (tests read raw kernel arguments back by name)."""
        by_name = dict(zip(TERM_NAMES, terms))
        rows, ends = by_name.pop("rows"), by_name.pop("ends")
        named = {n: (None if t.numel() == 0 else t) for n, t in by_name.items()}
        named.update({n: rows[..., i, :] for i, n in enumerate(ROW_NAMES)})
        named.update({n: ends[..., i] for i, n in enumerate(END_NAMES)})
        if named["khat"] is None:
            named.update(Bp=None, cp=None, wb=None)
        return cls(**{f.name: named[f.name] for f in fields(cls)})


def pad_tokens(x: torch.Tensor, total: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 2 (tokens) of [B, H, T, ...] (gates: [B, H, T]) to ``total`` with ``value``."""
    extra = total - x.shape[2]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 3) + [0, extra]
    return F.pad(x, pad, value=value)


def _shift_rows(x: torch.Tensor, first: float) -> torch.Tensor:
    """y[..., t, :] = x[..., t - 1, :], y[..., 0, :] = first (for [..., C, X])."""
    return torch.cat([torch.full_like(x[..., :1, :], first), x[..., :-1, :]], dim=-2)


def _shift(x: torch.Tensor, first: float) -> torch.Tensor:
    """y[..., t] = x[..., t - 1], y[..., 0] = first."""
    return torch.cat([torch.full_like(x[..., :1], first), x[..., :-1]], dim=-1)


def chunk_terms(q, k, lr, momentum, decay, chunk_size: int, dgd: bool, mlp: bool = False) -> ChunkTerms:
    """Every state-independent term of every chunk (fp32, differentiable w.r.t. q, k and the gates).

    Inputs [B, H, T, ...] are padded to NC * C tokens and viewed as [B, H, NC, C, ...]; padded tokens get lr = 0 and
    momentum = keep = 1, so they leave every valid row unchanged, and the end terms are read at each chunk's last
    valid row.
    """
    B, H, T, Dk = q.shape
    C = chunk_size
    NC = -(-T // C)
    Tp = NC * C
    f32 = torch.float64 if q.dtype == torch.float64 else torch.float32
    theta = pad_tokens(lr.to(f32), Tp, 0.0).view(B, H, NC, C)
    a = pad_tokens(momentum.to(f32), Tp, 1.0).view(B, H, NC, C)
    b = pad_tokens(1.0 - decay.to(f32), Tp, 1.0).view(B, H, NC, C)
    qc = pad_tokens(q.to(f32), Tp).view(B, H, NC, C, Dk)
    kc = pad_tokens(k.to(f32), Tp).view(B, H, NC, C, Dk)

    # momentum carry P, weight carry G = Br P, decay carry Br (docs/kernels/titan_memory.md)
    P, G, A, Bc, c, Br = chunk_decay_terms(a, b)
    th_row = theta[..., None, :]
    gth = G * th_row
    chunks = torch.arange(NC, device=q.device)
    last = torch.full((NC,), C - 1, device=q.device, dtype=torch.long)
    last[-1] = T - (NC - 1) * C - 1  # each chunk's last valid token
    terms = ChunkTerms(aqk=gth * (qc @ kc.transpose(-1, -2)), Bc=Bc, c=c, wg=gth[..., chunks, last, :],
                       wp=(P * th_row)[..., chunks, last, :], B_L=Bc[..., chunks, last], c_L=c[..., chunks, last],
                       A_L=A[..., chunks, last], gth=gth if mlp else None)
    if not dgd:
        return terms
    kh = unit_keys(kc)
    M = _shift_rows(Br, 0.0) * th_row * (kh @ kh.transpose(-1, -2))  # Br[t-1, j]: strictly lower
    eye = torch.eye(C, dtype=f32, device=q.device)
    terms.tinv = torch.linalg.solve_triangular(eye + M, eye.expand_as(M), upper=False, unitriangular=True)
    terms.akk = _shift_rows(G, 0.0) * th_row * (kh @ kc.transpose(-1, -2))
    terms.aqw = Br * th_row * (qc @ kh.transpose(-1, -2))
    terms.khat = kh.reshape(B, H, Tp, Dk)
    terms.Bp, terms.cp = _shift(Bc, 1.0), _shift(c, 0.0)
    terms.wb = (Br * th_row)[..., chunks, last, :]
    return terms


# ------------------------------------------------------------------------------------------- the custom ops
@torch.library.custom_op("hope::titan_state_pass", mutates_args=())
def titan_state_pass(memory: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: list[torch.Tensor],
                     state: list[torch.Tensor], chunk_size: int, backend: str) -> list[torch.Tensor]:
    """[out [B, H, T, Dv] in q's dtype, *final state fp32] by ``backend``'s kernels."""
    xs = [t.contiguous() for t in (q, k, v)]
    return list(backends.get(OP, backend).kernel[memory].forward(*xs, [t.contiguous() for t in terms],
                                                                 [s.contiguous() for s in state], chunk_size))


@titan_state_pass.register_fake
def _(memory, q, k, v, terms, state, chunk_size, backend):
    B, H, T, _ = q.shape
    return [q.new_empty(B, H, T, v.shape[-1]), *(s.new_empty(s.shape, dtype=torch.float32) for s in state)]


@torch.library.custom_op("hope::titan_state_pass_backward", mutates_args=())
def titan_state_pass_backward(memory: str, grads: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, terms: list[torch.Tensor], state: list[torch.Tensor], chunk_size: int,
                              backend: str) -> list[torch.Tensor]:
    """[dq, dk, dv, *dterms, *dstate] of the state pass, ``grads`` = [d out, *d final state]."""
    cont = lambda xs: [t.contiguous() for t in xs]  # noqa: E731
    return list(backends.get(OP, backend).kernel[memory].backward(cont(grads), *cont((q, k, v)), cont(terms),
                                                                  cont(state), chunk_size))


@titan_state_pass_backward.register_fake
def _(memory, grads, q, k, v, terms, state, chunk_size, backend):
    f32 = lambda t: t.new_empty(t.shape, dtype=torch.float32)  # noqa: E731
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *(f32(t) for t in terms),
            *(f32(s) for s in state)]


def _setup_context(ctx, inputs, output):
    memory, q, k, v, terms, state, chunk_size, backend = inputs
    ctx.save_for_backward(q, k, v, *terms, *state)
    ctx.memory, ctx.chunk_size, ctx.backend, ctx.n_terms = memory, chunk_size, backend, len(terms)


def _backward(ctx, grads):
    q, k, v, *rest = ctx.saved_tensors
    terms, state = rest[:ctx.n_terms], rest[ctx.n_terms:]
    # an output autograd sends no gradient to has a zero one; the kernels take d out in q's dtype, the rest fp32
    d_out = q.new_zeros(*q.shape[:3], v.shape[-1]) if grads[0] is None else grads[0].to(q.dtype)
    d_state = [torch.zeros_like(s, dtype=torch.float32) if g is None else g.float() for g, s in zip(grads[1:], state)]
    dq, dk, dv, *rest = titan_state_pass_backward(ctx.memory, [d_out, *d_state], q, k, v, list(terms), list(state),
                                                  ctx.chunk_size, ctx.backend)
    dterms = [None if t.numel() == 0 else g for t, g in zip(terms, rest[:ctx.n_terms])]
    dstate = [g.to(s.dtype) for g, s in zip(rest[ctx.n_terms:], state)]
    return None, dq, dk, dv, dterms, dstate, None, None


titan_state_pass.register_autograd(_backward, setup_context=_setup_context)


class ExtensionStatePass:
    """The kernel contract for one memory over a compiled extension's ``titan_fwd`` / ``titan_bwd``
    (csrc/titan_inputs.h): the tensor lists go through as they are; ``fp32_only`` (the C++ CPU kernels) casts q, k,
    v and d out to fp32 and the results back."""

    def __init__(self, ext, memory: str, fp32_only: bool):
        self.ext, self.memory, self.fp32_only = ext, memory, fp32_only

    def _cast(self, *xs):
        return [x.float() for x in xs] if self.fp32_only else list(xs)

    def forward(self, q, k, v, terms, state, chunk_size):
        out, *final, _states = self.ext.titan_fwd(self.memory, *self._cast(q, k, v), terms, state, chunk_size, False)
        return [out.to(q.dtype), *final]

    def backward(self, grads, q, k, v, terms, state, chunk_size):
        grads = [*self._cast(grads[0]), *grads[1:]]
        dq, dk, dv, *rest = self.ext.titan_bwd(self.memory, grads, *self._cast(q, k, v), terms, state, chunk_size)
        return [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *rest]

    @classmethod
    def per_memory(cls, ext, fp32_only: bool) -> dict:
        """A record's ``kernel``: both memories over ``ext``."""
        return {memory: cls(ext, memory, fp32_only) for memory in MEMORIES}


# ------------------------------------------------------------------------------------------- the public function
@dataclass(frozen=True)
class TitanCall:
    """What a backend is asked to run (``width``: Dv for the linear memory, the hidden width E for the mlp one)."""

    device: torch.device
    dtype: torch.dtype
    memory: str
    rule: str
    Dk: int
    width: int
    chunk_size: int
    backward: bool


backends.register_modules(OP, "hope_kernels.titan_memory_update", ("naive", "triton", "cuda", "cpp"))


def _check_state(state, memory: str, B: int, H: int, Dk: int, Dv: int, device):
    if memory == "linear":
        if not isinstance(state, LinearMemoryState):
            raise TypeError(
                f"state must be a LinearMemoryState(W, S) for memory='linear', got {type(state).__name__}"
            )
        for name in ("W", "S"):
            t = getattr(state, name)
            check_tensor(f"state.{name}", t, ndim=4, device=device, dtypes=(torch.float32, torch.float64))
            check_shape(f"state.{name}", t, (B, H, Dv, Dk), "[B, H, Dv, Dk]")
        return
    if not isinstance(state, MLPMemoryState):
        raise TypeError(
            f"state must be an MLPMemoryState(W1, W2, S1, S2) for memory='mlp', got {type(state).__name__}"
        )
    check_tensor("state.W1", state.W1, ndim=4, device=device, dtypes=(torch.float32, torch.float64))
    E = state.W1.shape[-1]
    shapes = {"W1": (B, H, Dk, E), "W2": (B, H, E, Dk), "S1": (B, H, Dk, E), "S2": (B, H, E, Dk)}
    for name, shape in shapes.items():
        t = getattr(state, name)
        check_tensor(f"state.{name}", t, ndim=4, device=device, dtypes=(torch.float32, torch.float64))
        check_shape(f"state.{name}", t, shape, "W1/S1 [B, H, D, E], W2/S2 [B, H, E, D]")


def titan_memory_update(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    decay: torch.Tensor,
    *,
    chunk_size: int,
    memory: str = "linear",
    rule: str = "titans",
    state: LinearMemoryState | MLPMemoryState | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, LinearMemoryState | MLPMemoryState]:
    """Run a Titans memory over a sequence: update it chunk by chunk and read it out per token.

    Args:
        q, k: [B, H, T, Dk] queries and keys; v: [B, H, T, Dv] values (fp32, bf16 or fp16).
        lr, momentum, decay: [B, H, T] data-dependent gates theta_t, eta_t, alpha_t in [0, 1].
        chunk_size: C; every gradient inside chunk c is taken at the chunk-start state W_c.
            T need not be a multiple of C (the last chunk is shorter).
        memory: ``"linear"`` M(x) = W x, or ``"mlp"`` M(x) = x + W1 gelu(W2 x) (needs Dk == Dv).
        rule: ``"titans"`` (Titans eq. 13-14): S_t = eta_t S_{t-1} - theta_t u_t,
            W_t = (1 - alpha_t) W_{t-1} + S_t; or ``"dgd"`` (NL eq. 56-57): the layer that reads k is
            W_t = W_{t-1} ((1 - alpha_t) I - theta_t k^_t k^_t^T) + S_t with k^ = k / ||k||.
        state: ``LinearMemoryState`` / ``MLPMemoryState`` (fp32) or None (zero weights and momenta;
            linear memory only: a zero MLP memory has zero gradients and never learns).
        backend: ``"auto"`` or one of ``cuda``, ``triton``, ``cpp``, ``reference``.
    Returns:
        ``(out, state)``: out [B, H, T, Dv] = M_{W_t}(q_t), read with the state after token t, in q's
        dtype; ``state`` after the last token, for the next call. Differentiable w.r.t. q, k, v, the
        gates and the initial state.
    """
    check_tensor("q", q, ndim=4)
    dev = q.device
    B, H, T, Dk = q.shape
    check_tensor("k", k, ndim=4, device=dev)
    check_shape("k", k, q.shape, "like q: [B, H, T, Dk]")
    check_tensor("v", v, ndim=4, device=dev)
    check_shape("v", v, (B, H, T, v.shape[-1]), "[B, H, T, Dv] with q's B, H, T")
    Dv = v.shape[-1]
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, g in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        check_tensor(name, g, ndim=3, device=dev)
        check_shape(name, g, (B, H, T), "[B, H, T], one gate per token and head")
        check_range(name, g, 0.0, 1.0)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_finite(name, t)
    check_positive_int("chunk_size", chunk_size)
    check_choice("memory", memory, MEMORIES)
    check_choice("rule", rule, RULES)
    if T == 0:
        raise ValueError("q must have at least one token (T >= 1), got T=0")
    if memory == "mlp" and Dk != Dv:
        raise ValueError(f"memory='mlp' needs Dk == Dv (residual memory), got Dk={Dk}, Dv={Dv}")
    if state is None:
        if memory == "mlp":
            raise ValueError(
                "state is required for memory='mlp': a zero MLP memory M(x) = x + W1 gelu(W2 x) has zero "
                "gradients and never learns; pass MLPMemoryState with the layer's initial weights"
            )
        state = zero_linear_state(B, H, Dv, Dk, dev)
    else:
        _check_state(state, memory, B, H, Dk, Dv, dev)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, lr, momentum, decay, *state))
    width = state.W1.shape[-1] if memory == "mlp" else Dv  # the kernels' second size: Dv, or the mlp's hidden E
    rec = backends.resolve_backend(OP, dev, backend, TitanCall(dev, q.dtype, memory, rule, Dk, width, chunk_size,
                                                               backward))
    if rec.name == "reference":
        return titan_memory_update_naive(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state)
    terms = chunk_terms(q, k, lr, momentum, decay, chunk_size, dgd=rule == "dgd", mlp=memory == "mlp")
    out, *final = titan_state_pass(memory, q, k, v, terms.kernel_terms(), [s.float() for s in state], chunk_size,
                                   rec.name)
    return out, (MLPMemoryState if memory == "mlp" else LinearMemoryState)(*final)


