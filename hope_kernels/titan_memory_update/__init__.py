"""``titan_memory_update``: chunk-parallel Titans / DGD memory update and read-out.

See docs/kernels/titan_memory.md for the equations and their chunk-parallel (dual) form.
"""
from __future__ import annotations

import importlib

import torch

from hope_kernels import dispatch
from hope_kernels._checks import check_choice, check_positive_int, check_range, check_shape, check_tensor
from hope_kernels.titan_memory_update.reference import titan_memory_update_reference
from hope_kernels.titan_memory_update.state import LinearMemoryState, MLPMemoryState, zero_linear_state
from hope_kernels.titan_memory_update.state_pass import needs_backward

OP = "titan_memory_update"
MEMORIES = ("linear", "mlp")
RULES = ("titans", "dgd")

dispatch.register(OP, "reference", titan_memory_update_reference)
#: (backend, memory) -> why_not(Dk, Dv, chunk_size, rule, backward) (mlp: why_not_mlp(D, E, ...)): None when its
#: kernels run the call, else the reason; a kernel backend without an entry for a memory does not implement it
_SHAPE_LIMITS = {}
#: backend -> auto_declines(rule, backward, memory): True where auto leaves the call to a later backend (measured slower)
_AUTO_DECLINES = {}
for _name in ("triton", "cuda", "cpp"):
    try:  # each kernel backend module: why_not, why_not_mlp (None: no mlp kernels), optionally auto_declines
        _impl = importlib.import_module(f"hope_kernels.titan_memory_update.{_name}")
    except ImportError:
        continue
    _SHAPE_LIMITS[_name, "linear"] = _impl.why_not
    if _impl.why_not_mlp is not None:
        _SHAPE_LIMITS[_name, "mlp"] = _impl.why_not_mlp
    if hasattr(_impl, "auto_declines"):
        _AUTO_DECLINES[_name] = _impl.auto_declines
# measured on the H100 (torch 2.11+cu130, triton 3.6, 2026-11-25, bf16, B4 H8 T2048 C64, fwd+bwd): Triton 2.78 ms
# vs CUDA 4.93 (titans, D64), 7.44 vs 10.93 (dgd, D64), 3.58 vs 6.54 (titans, D128): auto prefers Triton, and
# takes CUDA for what Triton refuses (bench/results/titan_cuda_vs_triton-H100-2026-11-25.log: Dk > 128, and the mlp
# memory's chunk limits, triton.MLP_MAX_CHUNK)
dispatch.prefer(OP, ("triton", "cuda", "cpp", "reference"),
                "Triton measured faster than the CUDA port on the H100 (docs/performance.md)")


_NO_MEMORY = "implements memory='linear' only"


def _first_that_runs(dev, memory, rule, Dk, Dv, chunk_size, backward) -> str:
    """The first backend in the op's preference order that runs this call and that auto does not decline."""
    return next(b for b in dispatch.auto_candidates(OP, dev)
                if _why_not(b, memory, rule, Dk, Dv, chunk_size, backward) is None
                and not _declines(b, memory, rule, backward))


def _declines(backend: str, memory: str, rule: str, backward: bool) -> bool:
    """Whether auto leaves this call to a later backend (``backend`` measured slower on it)."""
    declines = _AUTO_DECLINES.get(backend)
    return declines is not None and declines(rule, backward, memory)


def _why_not(backend: str, memory: str, rule: str, Dk: int, Dv: int, chunk_size: int, backward: bool):
    """None when ``backend`` runs this call, else why not (mlp: Dv is the hidden width E)."""
    if backend == "reference":
        return None
    limit = _SHAPE_LIMITS.get((backend, memory))
    if limit is None:
        return _NO_MEMORY
    return limit(Dk, Dv, chunk_size, rule, backward)


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
    state=None,
    backend: str = "auto",
):
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
    backward = needs_backward(q, k, v, lr, momentum, decay, state)
    impl = dispatch.resolve_backend(OP, dev, backend)
    width = state.W1.shape[-1] if memory == "mlp" else Dv  # the kernels' second size: Dv, or the mlp's hidden E
    why = _why_not(impl.backend, memory, rule, Dk, width, chunk_size, backward)
    if why is not None and backend != "auto":
        exc = NotImplementedError if why == _NO_MEMORY else ValueError  # a memory it lacks / a shape it refuses
        raise exc(f"backend={backend!r} of titan_memory_update {why}; use backend='auto' (picks a backend "
                  f"that runs it) or backend='reference'")
    # a backend $HOPE_BACKEND forces still runs the calls auto would leave to a faster one
    declined = (backend == "auto" and dispatch.forced_backend() is None
                and _declines(impl.backend, memory, rule, backward))
    if why is not None or declined:  # auto: the first backend in the op's preference order that runs this call
        impl = dispatch.resolve_backend(OP, dev, _first_that_runs(dev, memory, rule, Dk, width, chunk_size, backward))
    return impl.fn(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state)


__all__ = ["titan_memory_update", "LinearMemoryState", "MLPMemoryState", "MEMORIES", "RULES"]
