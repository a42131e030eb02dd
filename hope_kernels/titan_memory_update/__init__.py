"""``titan_memory_update``: chunk-parallel Titans / DGD memory update and read-out.

See docs/kernels/titan_memory.md for the equations and their chunk-parallel (dual) form.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hope_kernels import backends
from hope_kernels._checks import check_choice, check_positive_int, check_range, check_shape, check_tensor
from hope_kernels.titan_memory_update.reference import titan_memory_update_reference
from hope_kernels.titan_memory_update.state import LinearMemoryState, MLPMemoryState, zero_linear_state
from hope_kernels.titan_memory_update.state_pass import needs_backward

OP = "titan_memory_update"
MEMORIES = ("linear", "mlp")
RULES = ("titans", "dgd")



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


backends.register(backends.Backend(OP, "reference", priority=0, kernel=titan_memory_update_reference))
backends.register_modules(OP, "hope_kernels.titan_memory_update", ("triton", "cuda", "cpp"))


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
    width = state.W1.shape[-1] if memory == "mlp" else Dv  # the kernels' second size: Dv, or the mlp's hidden E
    call = TitanCall(dev, q.dtype, memory, rule, Dk, width, chunk_size, backward)
    rec = backends.resolve_backend(OP, dev, backend, call)
    return rec.kernel(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state)


__all__ = ["titan_memory_update", "LinearMemoryState", "MLPMemoryState", "MEMORIES", "RULES"]
