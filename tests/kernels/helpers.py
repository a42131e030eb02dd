"""Helpers shared by the kernel tests: relative-error comparison, NaN poisoning, titan_memory_update inputs, raw kernel
arguments and their float64 oracles."""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

import torch


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / max(||expected||_2, tiny), computed in float64.

    The RMS ratio (as in fla's ``assert_close``) is meaningful for tensors whose entries vary in
    scale, where elementwise relative error is dominated by near-zero entries.
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")  # NaN or Inf never passes
    denom = e.norm().item()
    diff = (a - e).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_rel_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Assert relative RMS error <= tol; NaN/Inf in ``actual`` always fails."""
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{name}: expected a tensor, got {type(actual).__name__}")
    err = rel_rms_error(actual, expected)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e} (shape {tuple(actual.shape)})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN in place (so a kernel that forgets to write an element is caught)."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-(2**31) + 1 if t.dtype == torch.int32 else -1)
    return t


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------- titan_memory_update
#: (B, H, T, Dk, Dv, C) the linear memory is checked at: odd T and head dims, T not a multiple of C, chunks 8/16/64, C > T
TITAN_CASES = [(2, 2, 29, 5, 7, 8), (1, 2, 37, 24, 33, 16), (1, 1, 70, 16, 70, 64), (2, 1, 19, 17, 16, 64),
               (1, 1, 1, 16, 16, 8)]
#: (B, H, T, D, E, C) the mlp memory is checked at: odd T, D and E, T not a multiple of C, chunks 8/16/64, C > T
TITAN_MLP_CASES = [(2, 2, 29, 5, 7, 8), (1, 2, 37, 24, 40, 16), (1, 1, 70, 16, 33, 64), (1, 1, 1, 16, 16, 8)]
STATE_NAMES = {"linear": ["W", "S"], "mlp": ["W1", "W2", "S1", "S2"]}


def output_names(memory: str) -> list[str]:
    """What :func:`titan_outputs_and_grads` returns, in order."""
    return (["out", *(f"{s}_T" for s in STATE_NAMES[memory]), "dq", "dk", "dv", "dlr", "dmomentum", "ddecay",
             *(f"d{s}" for s in STATE_NAMES[memory])])


def raw_grad_names(memory: str) -> list[str]:
    """The state-pass backward's gradients, in order (chunk.py's kernel contract)."""
    from hope_kernels.titan_memory_update.chunk import TERM_NAMES

    return ["dq", "dk", "dv", *(f"d{n}" for n in TERM_NAMES), *(f"d{s}" for s in STATE_NAMES[memory])]


def titan_inputs(B, H, T, Dk, Dv, *, device="cpu", dtype=torch.float32, with_state=True, seed=0, edge_gates=True):
    """Random ``([q, k, v, lr, momentum, decay], [W0, S0])``; with ``edge_gates`` some gates are exactly 0 or 1
    (the chunk products must stay exact there: no logs, no division)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Dk, generator=g) / Dk**0.5
    k = torch.randn(B, H, T, Dk, generator=g) / Dk**0.5
    v = torch.randn(B, H, T, Dv, generator=g)
    lr = torch.rand(B, H, T, generator=g)
    momentum = torch.rand(B, H, T, generator=g)
    decay = 0.2 * torch.rand(B, H, T, generator=g)
    if edge_gates and T > 4:
        lr[0, 0, 2] = 0.0
        momentum[0, 0, 3] = 0.0
        decay[0, H - 1, 1] = 1.0
        momentum[B - 1, 0, 4] = 1.0
        lr[-1, -1, -1] = 1.0
    if with_state:
        state = [0.3 * torch.randn(B, H, Dv, Dk, generator=g), 0.1 * torch.randn(B, H, Dv, Dk, generator=g)]
    else:
        state = [torch.zeros(B, H, Dv, Dk), torch.zeros(B, H, Dv, Dk)]
    args = [q.to(dtype), k.to(dtype), v.to(dtype), lr, momentum, decay]
    return [a.to(device) for a in args], [s.to(device) for s in state]


def titan_mlp_inputs(B, H, T, D, E, *, device="cpu", dtype=torch.float32, seed=0):
    """Random ``([q, k, v, lr, momentum, decay], [W1, W2, S1, S2])`` for the mlp memory (some gates exactly 0
    or 1, as ``titan_inputs``). lr is scaled by 2 / E: a step theta e a^T with ||a||^2 ~ 0.4 E overshoots (and the
    memory diverges to inf) once theta ||a||^2 > 2."""
    args, _ = titan_inputs(B, H, T, D, D, device="cpu", dtype=torch.float64, seed=seed)
    args[3] = args[3] * min(1.0, 2.0 / E)
    g = torch.Generator().manual_seed(seed + 100)
    state = [0.5 * torch.randn(B, H, D, E, generator=g) / E**0.5, torch.randn(B, H, E, D, generator=g),
             0.1 * torch.randn(B, H, D, E, generator=g) / E**0.5, 0.1 * torch.randn(B, H, E, D, generator=g)]
    args = [a.to(dtype) if i < 3 else a.float() for i, a in enumerate(args)]
    return [a.to(device) for a in args], [s.to(device) for s in state]


def titan_case_inputs(memory: str, case, *, device="cpu", dtype=torch.float32, **kw):
    """``(args, state)`` for a TITAN_CASES (linear) or TITAN_MLP_CASES (mlp) case."""
    B, H, T, D, W, _C = case
    make = titan_mlp_inputs if memory == "mlp" else titan_inputs
    return make(B, H, T, D, W, device=device, dtype=dtype, **kw)


def state_of(memory: str, tensors):
    from hope_kernels.titan_memory_update import LinearMemoryState, MLPMemoryState

    return (MLPMemoryState if memory == "mlp" else LinearMemoryState)(*tensors)


def backend_fn(backend: str):
    """``fn(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state)`` running the public op on ``backend``
    with the value checks off (so that NaN inputs reach the kernels)."""
    from hope_kernels._checks import value_checks_off
    from hope_kernels.titan_memory_update import titan_memory_update

    def fn(q, k, v, lr, momentum, decay, chunk_size, memory, rule, state):
        with value_checks_off():
            return titan_memory_update(q, k, v, lr, momentum, decay, chunk_size=chunk_size, memory=memory,
                                       rule=rule, state=state, backend=backend)

    return fn


def titan_outputs_and_grads(fn, args, state, chunk_size, rule, memory="linear", seed=1):
    """``[out, *final state, *grads]`` of ``fn`` (the naive function's signature): the gradients are those of a random
    functional of the output and the final state w.r.t. every input (:func:`output_names`)."""
    xs = [t.detach().clone().requires_grad_(True) for t in list(args) + list(state)]
    out, final = fn(*xs[:6], chunk_size, memory, rule, state_of(memory, xs[6:]))
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g).to(t.device, t.dtype)  # noqa: E731
    total = (out.float() * rnd(out.float())).sum() + sum((s * rnd(s)).sum() for s in final)
    grads = torch.autograd.grad(total, xs)
    return [out, *final, *grads]


def assert_titan_close(actual, expected, tol: float, tag: str, memory="linear") -> None:
    """Every entry of two :func:`titan_outputs_and_grads` results within ``tol`` relative RMS (in fp32)."""
    for name, a, e in zip(output_names(memory), actual, expected):
        assert_rel_close(f"{tag} {name}", a.float(), e.float(), tol)


def raw_args(args, state, chunk_size: int, memory: str, rule: str) -> tuple:
    """The state pass's arguments ``(q, k, v, terms, state, chunk_size)`` (chunk.py's kernel contract) for ``args,
    state`` as :func:`titan_inputs` / :func:`titan_mlp_inputs` make them; contiguous, no autograd."""
    from hope_kernels.titan_memory_update.chunk import chunk_terms

    q, k, v, lr, mo, de = args
    with torch.no_grad():
        t = chunk_terms(q, k, lr, mo, de, chunk_size, dgd=rule == "dgd", mlp=memory == "mlp")
        terms = [x.contiguous() for x in t.kernel_terms()]
    return q.contiguous(), k.contiguous(), v.contiguous(), terms, [s.float().contiguous() for s in state], chunk_size


def state_pass_oracle(memory: str, q, k, v, terms, state, chunk_size):
    """[out, *final state] of tests/kernels/titan_oracle.py's state pass on raw arguments."""
    from hope_kernels.titan_memory_update.chunk import ChunkTerms
    from tests.kernels.titan_oracle import linear_state_pass, mlp_state_pass

    named = ChunkTerms.from_kernel_terms(terms)
    run = mlp_state_pass if memory == "mlp" else linear_state_pass
    return list(run(q, k, v, named, *state, chunk_size))


def state_pass_grads_oracle(memory: str, cotangents, q, k, v, terms, state, chunk_size):
    """The raw backward's gradients (:func:`raw_grad_names`) by float64 autograd through :func:`state_pass_oracle`;
    an absent term's gradient is None."""
    leaves = [t.detach().double().cpu().requires_grad_(t.numel() > 0) for t in (q, k, v, *terms, *state)]
    n = len(terms)
    outs = state_pass_oracle(memory, *leaves[:3], leaves[3:3 + n], leaves[3 + n:], chunk_size)
    total = sum((o * c.detach().double().cpu()).sum() for o, c in zip(outs, cotangents))
    live = [x for x in leaves if x.requires_grad]
    grads = iter(torch.autograd.grad(total, live, allow_unused=True))
    result = []
    for x in leaves:
        if not x.requires_grad:
            result.append(None)
            continue
        g = next(grads)
        result.append(torch.zeros_like(x) if g is None else g)
    return result


@contextlib.contextmanager
def nan_filled_empty(device="cpu"):
    """torch / at::empty fill new memory with NaN (deterministic mode's fill_uninitialized_memory), so an output
    element a kernel leaves unwritten shows up as NaN."""
    import torch.utils.deterministic as det

    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    det.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(7, device=device)).all()
        yield
    finally:
        det.fill_uninitialized_memory = was[2]
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def assert_outputs_written(kind: str, names, tensors) -> None:
    """Every entry finite: with ``nan_filled_empty`` a NaN is an element the kernel left unwritten."""
    for name, t in zip(names, tensors):
        assert torch.isfinite(t).all(), f"{kind} {name} has non-finite entries: left unwritten"


def check_compiles_fullgraph(backend: str, memory: str, rule: str, args, state, chunk_size: int, tol: float) -> None:
    """``torch.compile(fullgraph=True, backend="aot_eager")`` through ``titan_memory_update(backend=backend)``: the
    loss and every gradient (q, k, v, gates, initial state) match the naive function's."""
    from hope_kernels.titan_memory_update import titan_memory_update, titan_memory_update_naive

    def step(fn, q, k, v, lr, mo, de, *st):
        out, final = fn(q, k, v, lr, mo, de, chunk_size, memory, rule, state_of(memory, st))
        return out.square().sum() + sum(s.sum() for s in final)

    def through_op(q, k, v, lr, mo, de, C, memory_, rule_, st):
        return titan_memory_update(q, k, v, lr, mo, de, chunk_size=C, memory=memory_, rule=rule_, state=st,
                                   backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(lambda *xs: step(through_op, *xs), fullgraph=True, backend="aot_eager")
    xs = [t.clone().requires_grad_(True) for t in list(args) + list(state)]
    loss = compiled(*xs)
    loss.backward()
    xr = [t.clone().requires_grad_(True) for t in list(args) + list(state)]
    ref = step(titan_memory_update_naive, *xr)
    ref.backward()
    assert_rel_close("compiled loss", loss.detach(), ref.detach(), tol)
    for name, a, b in zip(["q", "k", "v", "lr", "momentum", "decay", *STATE_NAMES[memory]], xs, xr):
        assert_rel_close(f"compiled grad {name}", a.grad, b.grad, tol)
