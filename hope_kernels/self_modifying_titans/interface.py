"""``self_modifying_titans``: the self-modifying Titans layer's memory recurrences (generators and M_mem) as one op.

Backends: ``cpp`` (csrc/self_modifying_titans_cpu.cpp), ``triton`` (triton/), ``reference`` (naive.py under
autograd). Kernel backends run through chunk.py's custom ops; see docs/kernels/self_modifying_titans.md.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from hope_kernels import backends
from hope_kernels._checks import check_choice, check_positive_int, check_range, check_shape, check_tensor
from hope_kernels.self_modifying_titans.chunk import (
    OP,
    RULES,
    LayerSettings,
    LayerTensors,
    SelfModifyingTitansCall,
    default_checkpoint_every,
    self_modifying_titans_fwd,
    xq_only_grad,
)
from hope_kernels.self_modifying_titans.naive import self_modifying_titans_naive
from hope_kernels.titan_memory_update.naive import MLPMemoryState

backends.register_modules(OP, "hope_kernels.self_modifying_titans", ("naive", "triton", "cpp"))


class SelfModifyingTitansOutput(NamedTuple):
    """y [B, H, T, D]: M_mem's reads; gen, mem: the final states; eta [B, H, T]: the generated learning rates;
    gen_update_scale [B, H, NCg, G] / mem_update_scale [B, H, NCm]: each chunk's bound factor (1: inside the
    bound; None from the reference backend)."""

    y: torch.Tensor
    gen: MLPMemoryState
    mem: MLPMemoryState
    eta: torch.Tensor
    gen_update_scale: torch.Tensor | None
    mem_update_scale: torch.Tensor | None


def kernel_backend(call: SelfModifyingTitansCall, backend: str = "auto") -> tuple[str | None, str]:
    """The kernel backend that runs ``call`` (None: none does, or ``backend`` names the reference) and why none did.
    For callers with a loop of their own to fall back on (the layer): a named backend this op lacks or that declines
    the call is a reason here, not an error."""
    try:
        rec = backends.resolve_backend(OP, call.device, backend, call)
    except (ValueError, RuntimeError) as err:
        return None, str(err)
    if rec.name != "reference":
        return rec.name, ""
    if backend == "reference" or backends.forced_backend() == "reference":
        return None, "reference requested"
    why = [f"{name}: {err}" for (op, name), err in backends.MISSING.items() if op == OP]
    for r in backends.records(OP):
        if r.name != "reference" and r.runs_on(call.device):
            why.append(f"{r.name}: " + (f"switched off by ${r.env}=0" if r.switched_off() else r.supports(call)[1]
                                          or "not picked by auto on this device"))
    return None, "; ".join(why) or f"no kernel backend runs on {call.device}"


def _check(xq, xk, xv, gen, mem, gate_readout, gate_bias, momentum):
    check_tensor("xq", xq, ndim=4)
    B, H, T, D = xq.shape
    dev = xq.device
    for name, x in (("xk", xk), ("xv", xv)):
        check_tensor(name, x, ndim=4, device=dev)
        check_shape(name, x, xq.shape, "like xq: [B, H, T, D]")
    if T == 0:
        raise ValueError("xq must have at least one token (T >= 1), got T=0")
    for name, st in (("gen", gen), ("mem", mem)):
        if not isinstance(st, MLPMemoryState):
            raise TypeError(f"{name} must be an MLPMemoryState(W1, W2, S1, S2), got {type(st).__name__}")
    check_tensor("gen.W1", gen.W1, ndim=4, device=dev)
    n, E = gen.W1.shape[1], gen.W1.shape[-1]
    if n not in (4 * H, 5 * H):
        raise ValueError(f"gen.W1 must be [B, G H, D, E] with G = 4 or 5 generators per head (H={H}), "
                         f"got {tuple(gen.W1.shape)}")
    for name, st, rows in (("gen", gen, n), ("mem", mem, H)):
        for part, shape in (("W1", (B, rows, D, E)), ("W2", (B, rows, E, D)), ("S1", (B, rows, D, E)),
                            ("S2", (B, rows, E, D))):
            check_tensor(f"{name}.{part}", getattr(st, part), ndim=4, device=dev)
            check_shape(f"{name}.{part}", getattr(st, part), shape, "W1/S1 [B, n, D, E], W2/S2 [B, n, E, D]")
    check_tensor("gate_readout", gate_readout, ndim=3, device=dev)
    check_shape("gate_readout", gate_readout, (2, H, D), "[2, H, D]")
    check_tensor("gate_bias", gate_bias, ndim=2, device=dev)
    check_shape("gate_bias", gate_bias, (2, H), "[2, H]")
    check_tensor("momentum", momentum, ndim=2, device=dev)
    check_shape("momentum", momentum, (2, H), "[2, H]")
    check_range("momentum", momentum, 0.0, 1.0)
    return B, H, T, D, E, n // H


def self_modifying_titans(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    gen: MLPMemoryState,
    mem: MLPMemoryState,
    gate_readout: torch.Tensor,
    gate_bias: torch.Tensor,
    momentum: torch.Tensor,
    *,
    gen_chunk_size: int,
    mem_chunk_size: int,
    gen_update_clip: float = 0.0,
    mem_update_clip: float = 0.0,
    rule: str = "dgd",
    normalize_v: bool = False,
    readout_before: bool = False,
    backend: str = "auto",
    checkpoint_every: int | None = None,
) -> SelfModifyingTitansOutput:
    """Run the self-modifying Titans layer's memories over a segment (NL sec. 8, eq. 83-97).

    Args:
        xq, xk, xv: [B, H, T, D] the generators' inputs (the layer's conv + SiLU outputs per head).
        gen: the generators' state, W1, S1 [B, G H, D, E], W2, S2 [B, G H, E, D]; G = 5 (k, v, eta, alpha, q:
            q = l2n(M_q(xq))) or G = 4 (q = l2n(xq)), generator g of head h at g H + h.
        mem: M_mem's state [B, H, ...].
        gate_readout [2, H, D], gate_bias [2, H]: eta_t = sigmoid(<r_eta, M_eta(xk_t)> + b_eta), alpha likewise.
        momentum: [2, H] in [0, 1], the generators' and M_mem's momentum (zeros: no momentum term).
        gen_chunk_size, mem_chunk_size: the generators' and M_mem's chunks (gradients at each chunk's start).
        gen_update_clip, mem_update_clip: bound one chunk's update to clip x ||W|| per memory (0: none).
        rule: ``"titans"`` or ``"dgd"``. normalize_v: v_t = l2n(M_v(xv_t)) instead of M_v(xv_t).
        readout_before: y_t reads M_mem before token t's update (after it when False).
        backend: ``"auto"`` or ``cpp``, ``triton``, ``reference``.
        checkpoint_every: generator chunks per stored checkpoint (None: every chunk up to 16 checkpoints; none are
            stored when nothing needs a gradient or only xq does).
    Returns:
        SelfModifyingTitansOutput; differentiable w.r.t. every input tensor.
    """
    B, H, T, D, E, G = _check(xq, xk, xv, gen, mem, gate_readout, gate_bias, momentum)
    check_positive_int("gen_chunk_size", gen_chunk_size)
    check_positive_int("mem_chunk_size", mem_chunk_size)
    check_choice("rule", rule, RULES)
    for name, v in (("gen_update_clip", gen_update_clip), ("mem_update_clip", mem_update_clip)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a number >= 0 (0: no bound), got {v!r}")
    if checkpoint_every is None:
        checkpoint_every = default_checkpoint_every(T, gen_chunk_size)
    check_positive_int("checkpoint_every", checkpoint_every)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (xq, xk, xv, *gen, *mem, gate_readout, gate_bias, momentum))
    call = SelfModifyingTitansCall(xq.device, torch.float32, B, H, T, D, E, G, rule, gen_chunk_size, mem_chunk_size,
                                   float(gen_update_clip), float(mem_update_clip), bool(normalize_v),
                                   bool(readout_before), backward=needs_grad)
    rec = backends.resolve_backend(OP, xq.device, backend, call)
    if rec.name == "reference":
        y, gen_T, mem_T, eta = self_modifying_titans_naive(
            xq, xk, xv, gen, mem, gate_readout, gate_bias, momentum, gen_chunk_size=gen_chunk_size,
            mem_chunk_size=mem_chunk_size, gen_update_clip=gen_update_clip, mem_update_clip=mem_update_clip,
            rule=rule, normalize_v=normalize_v, readout_before=readout_before)
        return SelfModifyingTitansOutput(y, gen_T, mem_T, eta, None, None)
    inputs = LayerTensors(xq, xk, xv, gen, mem, gate_readout, gate_bias, momentum).as_list()
    if not needs_grad or xq_only_grad(inputs):
        checkpoint_every = 0  # no backward, or the xq-only one: no generator checkpoints to store
    settings = LayerSettings(gen_chunk_size, mem_chunk_size, float(gen_update_clip), float(mem_update_clip),
                             rule == "dgd", bool(normalize_v), bool(readout_before), checkpoint_every)
    out = self_modifying_titans_fwd(inputs, *settings.as_args(), rec.name)
    y, gW1, gW2, gS1, gS2, mW1, mW2, mS1, mS2, _kvq, gates, gen_scale, mem_scale = out[:13]
    # the generated gates, checked as titan_memory_update checks them in the layer's loop (value checks on): a
    # diverged model's NaN is a NonFiniteError here too, not a silent NaN loss
    check_range("lr", gates[..., 0], 0.0, 1.0)
    check_range("decay", gates[..., 1], 0.0, 1.0)
    return SelfModifyingTitansOutput(y.to(xq.dtype), MLPMemoryState(gW1, gW2, gS1, gS2),
                                     MLPMemoryState(mW1, mW2, mS1, mS2), gates[..., 0], gen_scale, mem_scale)


__all__ = ["self_modifying_titans", "kernel_backend", "SelfModifyingTitansOutput"]
