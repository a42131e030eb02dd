"""The op's tensors by role, its settings, and the two ``torch.library`` custom ops every kernel backend runs through.

``hope::self_modifying_titans_fwd(inputs, ...) -> outputs`` and ``hope::self_modifying_titans_bwd(grads, inputs,
saved, ...) -> input gradients`` take and return tensor lists whose order is written once, here
(``INPUT_ROLES``, ``OUTPUT_ROLES``; csrc/self_modifying_titans_cpu.cpp's ``In`` / ``Out`` enums mirror them).
Their fakes give ``torch.compile(fullgraph=True)`` the shapes; ``register_autograd`` composes them into one
differentiable op. Which kernel runs is the ``backend`` argument: the record of that name (``hope_kernels.backends``).

The forward saves for the backward the inputs, the tokens the generators produced (k, v, q and the gates: the
memory pass's inputs), the chunk-start states of M_mem and of every ``checkpoint_every``-th generator chunk, and a
kernel's own ``store`` (the C++ kernel: every chunk's intermediates when every chunk is checkpointed; empty
elsewhere); the backward recomputes what the store lacks, each segment of generator chunks from its checkpoint
(docs/kernels/self_modifying_titans.md, "memory").
"""
from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import torch

from hope_kernels import backends
from hope_kernels.titan_memory_update.naive import MLPMemoryState

OP = "self_modifying_titans"
#: the forward's input list (and the backward's gradient list), in order
INPUT_ROLES = ("xq", "xk", "xv", "gen_W1", "gen_W2", "gen_S1", "gen_S2", "mem_W1", "mem_W2", "mem_S1", "mem_S2",
               "gate_readout", "gate_bias", "momentum")
#: the forward's output list, in order: y, the final states, then what the backward and the metrics read
OUTPUT_ROLES = ("y", "gen_W1", "gen_W2", "gen_S1", "gen_S2", "mem_W1", "mem_W2", "mem_S1", "mem_S2",
                "kvq", "gates", "gen_scale", "mem_scale", "gen_ckpt", "mem_ckpt", "store")
#: outputs with a gradient (the rest are saved tokens, bound scales, checkpoints and the kernel's store)
N_DIFFERENTIABLE = 9
#: at most this many generator checkpoints per (b, h) by default (memory: G x 4 D E fp32 each)
MAX_CHECKPOINTS = 16


@dataclass(frozen=True)
class LayerTensors:
    """The op's inputs by role (docs/kernels/self_modifying_titans.md): per head h of sample b,

    xq, xk, xv [B, H, T, D]: the generators' inputs; gen: the generators' chunk-start state, MLPMemoryState with
    W1, S1 [B, G H, D, E], W2, S2 [B, G H, E, D] (generator g of head h at g H + h, order k, v, eta, alpha[, q]);
    mem: M_mem's state [B, H, ...]; gate_readout [2, H, D], gate_bias [2, H]: eta and alpha from the eta / alpha
    generators' reads; momentum [2, H] in [0, 1]: the generators' and M_mem's momentum (zeros: none)."""

    xq: torch.Tensor
    xk: torch.Tensor
    xv: torch.Tensor
    gen: MLPMemoryState
    mem: MLPMemoryState
    gate_readout: torch.Tensor
    gate_bias: torch.Tensor
    momentum: torch.Tensor

    def as_list(self) -> list[torch.Tensor]:
        """The tensors in ``INPUT_ROLES`` order, fp32 and contiguous (what the kernels take)."""
        xs = [self.xq, self.xk, self.xv, *self.gen, *self.mem, self.gate_readout, self.gate_bias, self.momentum]
        return [x.float().contiguous() for x in xs]


@dataclass(frozen=True)
class LayerSettings:
    """The op's non-tensor arguments (every kernel takes them in this order, after the tensors).
    ``checkpoint_every``: generator chunks per stored chunk-start state; 0 stores none (no backward, or the xq-only
    one)."""

    gen_chunk_size: int
    mem_chunk_size: int
    gen_update_clip: float
    mem_update_clip: float
    dgd: bool
    normalize_v: bool
    readout_before: bool
    checkpoint_every: int

    def as_args(self) -> tuple:
        return astuple(self)


RULES = ("titans", "dgd")


@dataclass(frozen=True)
class SelfModifyingTitansCall:
    """What a backend is asked to run (its ``supports`` reads this): sizes, dtype, device and the layer's settings.

    ``selfmod``: the generators update in context (off: they are static projections, not this op).
    ``other_flags``: any further layer setting that changes the recurrence, as ``"name=value"`` (the kernels
    implement none, so a call that names one is declined with it as the reason).
    ``backward``: a backward of this call may run (some kernels take larger chunks forward-only)."""

    device: torch.device
    dtype: torch.dtype
    B: int
    H: int
    T: int
    D: int
    E: int
    G: int
    rule: str
    gen_chunk_size: int
    mem_chunk_size: int
    gen_update_clip: float
    mem_update_clip: float
    normalize_v: bool
    readout_before: bool
    selfmod: bool = True
    other_flags: tuple[str, ...] = ()
    backward: bool = True


def supports_layer_call(call: SelfModifyingTitansCall) -> tuple[bool, str]:
    """What every kernel backend implements: the layer with 4 or 5 generators, both rules, any chunk sizes and
    bounds, either read-out; fp32 (the layer computes its memories in fp32)."""
    if not call.selfmod:
        return False, "runs the self-modifying generators only (selfmod=False has static generators)"
    if call.other_flags:
        return False, f"does not implement {', '.join(call.other_flags)}"
    if call.rule not in RULES:
        return False, f"implements rule in {RULES}, got {call.rule!r}"
    if call.G not in (4, 5):
        return False, f"implements 4 or 5 generators, got {call.G}"
    if call.dtype != torch.float32:
        return False, f"takes float32 memories, got {call.dtype}"
    if call.readout_before and call.mem_update_clip > 0:
        return False, ("reads M_mem before each token's update with the chunk-start state at a chunk's first token; "
                       "with mem_update_clip > 0 the layer reads the unbounded end state of the previous chunk there")
    return True, ""


def default_checkpoint_every(T: int, gen_chunk_size: int) -> int:
    """Generator chunks per checkpoint: every chunk up to ``MAX_CHECKPOINTS`` chunks, then evenly spaced."""
    return max(1, math.ceil(math.ceil(T / gen_chunk_size) / MAX_CHECKPOINTS))


def chunk_counts(T: int, gen_chunk: int, mem_chunk: int, checkpoint_every: int) -> tuple[int, int, int]:
    """Generator chunks, M_mem chunks and stored generator checkpoints of a segment of T tokens."""
    n_gen = math.ceil(T / gen_chunk)
    return n_gen, math.ceil(T / mem_chunk), math.ceil(n_gen / checkpoint_every) if checkpoint_every else 0


def xq_only_grad(tensors: list[torch.Tensor]) -> bool:
    """Whether only xq of these inputs (``INPUT_ROLES`` order) carries a gradient, with 4 generators: the teach pass's
    call, whose backward needs M_mem's reads alone (q = l2n(xq) reaches nothing else) and no generator checkpoint."""
    H, n_gen = tensors[0].shape[1], tensors[3].shape[1]
    return n_gen == 4 * H and tensors[0].requires_grad and not any(t.requires_grad for t in tensors[1:])


def _kernel(backend: str):
    return backends.get(OP, backend).kernel


@torch.library.custom_op("hope::self_modifying_titans_fwd", mutates_args=())
def self_modifying_titans_fwd(inputs: list[torch.Tensor], gen_chunk_size: int, mem_chunk_size: int,
                              gen_update_clip: float, mem_update_clip: float, dgd: bool, normalize_v: bool,
                              readout_before: bool, checkpoint_every: int, backend: str) -> list[torch.Tensor]:
    """Outputs in ``OUTPUT_ROLES`` order (all fp32)."""
    settings = LayerSettings(gen_chunk_size, mem_chunk_size, gen_update_clip, mem_update_clip, dgd, normalize_v,
                             readout_before, checkpoint_every)
    return list(_kernel(backend).fwd(inputs, settings))


@self_modifying_titans_fwd.register_fake
def _(inputs, gen_chunk_size, mem_chunk_size, gen_update_clip, mem_update_clip, dgd, normalize_v, readout_before,
      checkpoint_every, backend):
    xq, gen_W1 = inputs[0], inputs[3]
    B, H, T, D = xq.shape
    G, E = gen_W1.shape[1] // H, gen_W1.shape[-1]
    n_gen, n_mem, n_ckpt = chunk_counts(T, gen_chunk_size, mem_chunk_size, checkpoint_every)
    settings = LayerSettings(gen_chunk_size, mem_chunk_size, gen_update_clip, mem_update_clip, dgd, normalize_v,
                             readout_before, checkpoint_every)
    n_store = _kernel(backend).store_floats(settings, T, D, E, G)
    new = lambda *shape: xq.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return [new(B, H, T, D), *(x.new_empty(x.shape, dtype=torch.float32) for x in inputs[3:11]),
            new(B, H, T, 3, D), new(B, H, T, 2), new(B, H, n_gen, G), new(B, H, n_mem),
            new(B, H, n_ckpt, G, 4, D * E), new(B, H, n_mem, 4, D * E), new(B, H, n_store)]


@torch.library.custom_op("hope::self_modifying_titans_bwd", mutates_args=())
def self_modifying_titans_bwd(grads: list[torch.Tensor], inputs: list[torch.Tensor], kvq: torch.Tensor,
                              gates: torch.Tensor, gen_ckpt: torch.Tensor, mem_ckpt: torch.Tensor,
                              store: torch.Tensor, gen_chunk_size: int, mem_chunk_size: int, gen_update_clip: float,
                              mem_update_clip: float, dgd: bool, normalize_v: bool, readout_before: bool,
                              checkpoint_every: int, backend: str, q_only: bool = False) -> list[torch.Tensor]:
    """Gradients of the inputs in ``INPUT_ROLES`` order, from ``grads``: those of the ``N_DIFFERENTIABLE`` outputs.
    ``q_only`` (4 generators, every input but xq a constant): only xq's gradient is wanted; a kernel may return
    zeros for the others (it skips the generators' backward: q = l2n(xq) reaches only M_mem's reads)."""
    settings = LayerSettings(gen_chunk_size, mem_chunk_size, gen_update_clip, mem_update_clip, dgd, normalize_v,
                             readout_before, checkpoint_every)
    return list(_kernel(backend).bwd(grads, inputs, (kvq, gates, gen_ckpt, mem_ckpt, store), settings, q_only))


@self_modifying_titans_bwd.register_fake
def _(grads, inputs, kvq, gates, gen_ckpt, mem_ckpt, store, *args):
    return [x.new_empty(x.shape, dtype=torch.float32) for x in inputs]


def _setup_context(ctx, inputs, output):
    tensors, *settings, backend = inputs
    ctx.save_for_backward(*tensors, *output[9:11], *output[13:16])
    ctx.n_inputs = len(tensors)
    ctx.settings, ctx.backend = tuple(settings), backend
    ctx.q_only = xq_only_grad(tensors)
    ctx.mark_non_differentiable(*output[N_DIFFERENTIABLE:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the checkpoints and other saved outputs


def _backward(ctx, grads):
    saved = ctx.saved_tensors
    tensors, (kvq, gates, gen_ckpt, mem_ckpt, store) = list(saved[:ctx.n_inputs]), saved[ctx.n_inputs:]
    outs = list(tensors[:1]) + list(tensors[3:11])  # the differentiable outputs' shapes: y like xq, the states
    grads = [torch.zeros_like(o) if g is None else g.float().contiguous()
             for g, o in zip(grads[:N_DIFFERENTIABLE], outs)]
    d_inputs = self_modifying_titans_bwd(grads, tensors, kvq, gates, gen_ckpt, mem_ckpt, store, *ctx.settings,
                                         ctx.backend, ctx.q_only)
    return d_inputs, *(None for _ in ctx.settings), None


self_modifying_titans_fwd.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["OP", "LayerTensors", "LayerSettings", "SelfModifyingTitansCall", "supports_layer_call", "RULES",
           "INPUT_ROLES", "OUTPUT_ROLES", "N_DIFFERENTIABLE", "MAX_CHECKPOINTS", "default_checkpoint_every",
           "chunk_counts", "xq_only_grad", "self_modifying_titans_fwd", "self_modifying_titans_bwd"]
