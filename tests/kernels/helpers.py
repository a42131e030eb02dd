"""Comparison helpers shared by kernel tests and benchmarks (importable by downstream users too)."""
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


def empty_poisoned(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return poison_(torch.empty(*shape, dtype=dtype, device=device))


def grads_of(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor | None]:
    return [t.grad.detach().clone() if t.grad is not None else None for t in tensors]


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_titan_compiles_fullgraph(backend_fn, args, state, chunk_size: int = 8, rule: str = "dgd",
                                   tol: float = 1e-4) -> None:
    """``torch.compile(fullgraph=True, backend="aot_eager")`` through a titan_memory_update backend function
    (linear memory): the loss and every gradient (q, k, v, gates, initial state) match the reference's."""
    from hope_kernels.titan_memory_update.reference import titan_memory_update_reference
    from hope_kernels.titan_memory_update.state import LinearMemoryState

    def step(q, k, v, lr, mo, de, W0, S0):
        out, st = backend_fn(q, k, v, lr, mo, de, chunk_size, "linear", rule, LinearMemoryState(W0, S0))
        return out.square().sum() + st.W.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xs = [t.clone().requires_grad_(True) for t in list(args) + list(state)]
    loss = compiled(*xs)
    loss.backward()
    xr = [t.clone().requires_grad_(True) for t in list(args) + list(state)]
    out, st = titan_memory_update_reference(*xr[:6], chunk_size, "linear", rule, LinearMemoryState(*xr[6:]))
    ref = out.square().sum() + st.W.sum()
    ref.backward()
    assert_rel_close("compiled loss", loss.detach(), ref.detach(), tol)
    for name, a, b in zip(("q", "k", "v", "lr", "momentum", "decay", "W0", "S0"), xs, xr):
        assert_rel_close(f"compiled grad {name}", a.grad, b.grad, tol)


# --------------------------------------------------------------- titan_memory_update backend tests (linear memory)
#: what ``titan_outputs_and_grads`` returns, in order
TITAN_OUTPUT_NAMES = ["out", "W_T", "S_T", "dq", "dk", "dv", "dlr", "dmomentum", "ddecay", "dW0", "dS0"]
#: (B, H, T, Dk, Dv, C) every backend is checked at: odd T and head dims, T not a multiple of C, chunks 8/16/64, C > T
TITAN_CASES = [(2, 2, 29, 5, 7, 8), (1, 2, 37, 24, 33, 16), (1, 1, 70, 16, 70, 64), (2, 1, 19, 17, 16, 64),
               (1, 1, 1, 16, 16, 8)]
#: the gradients the state-pass backward ops return, in order
TITAN_STATE_PASS_GRAD_NAMES = ["dq", "dk", "dkh", "dv", "daqk", "dakk", "dtinv", "daqw", "dvec", "dend", "dW0", "dS0"]


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


def titan_outputs_and_grads(fn, args, state, chunk_size, rule, seed=1):
    """``[out, W_T, S_T, *grads]`` of a backend ``fn`` (linear memory): the gradients are those of a random
    functional of the output and the final state w.r.t. every input (TITAN_OUTPUT_NAMES)."""
    from hope_kernels.titan_memory_update.state import LinearMemoryState

    xs = [t.detach().clone().requires_grad_(True) for t in list(args) + list(state)]
    out, final = fn(*xs[:6], chunk_size, "linear", rule, LinearMemoryState(*xs[6:]))
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g).to(t.device, t.dtype)  # noqa: E731
    total = (out.float() * rnd(out.float())).sum() + (final.W * rnd(final.W)).sum() + (final.S * rnd(final.S)).sum()
    grads = torch.autograd.grad(total, xs)
    return [out, final.W, final.S, *grads]


def assert_titan_close(actual, expected, tol: float, tag: str) -> None:
    """Every entry of two ``titan_outputs_and_grads`` results within ``tol`` relative RMS (in fp32)."""
    for name, a, e in zip(TITAN_OUTPUT_NAMES, actual, expected):
        assert_rel_close(f"{tag} {name}", a.float(), e.float(), tol)


def titan_state_pass_args(args, state, chunk_size: int, dgd: bool) -> tuple:
    """The state-pass ops' arguments ``(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size)`` for
    ``args, state`` as ``titan_inputs`` makes them (contiguous, as the raw extensions take them)."""
    from hope_kernels.titan_memory_update.chunk_terms import linear_chunk_terms

    q, k, v, lr, mo, de = args
    t = linear_chunk_terms(q, k, lr, mo, de, chunk_size, dgd)
    xs = (q, k, t.khat, v, t.aqk, t.akk, t.tinv, t.aqw, t.vec, t.end, state[0].float(), state[1].float())
    return (*(x.contiguous() if x is not None else None for x in xs), chunk_size)


# --------------------------------------------------------------- titan_memory_update, mlp memory
#: (B, H, T, D, E, C) the mlp kernels are checked at: odd T, D and E, T not a multiple of C, chunks 8/16/64, C > T
TITAN_MLP_CASES = [(2, 2, 29, 5, 7, 8), (1, 2, 37, 24, 40, 16), (1, 1, 70, 16, 33, 64), (1, 1, 1, 16, 16, 8)]
#: what ``titan_mlp_outputs_and_grads`` returns, in order
TITAN_MLP_OUTPUT_NAMES = ["out", "W1_T", "W2_T", "S1_T", "S2_T", "dq", "dk", "dv", "dlr", "dmomentum", "ddecay",
                          "dW1", "dW2", "dS1", "dS2"]


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


def titan_mlp_outputs_and_grads(fn, args, state, chunk_size, rule, seed=1):
    """``[out, W1_T, W2_T, S1_T, S2_T, *grads]`` of a backend ``fn`` (mlp memory): gradients of a random functional
    of the output and the final state w.r.t. every input (TITAN_MLP_OUTPUT_NAMES)."""
    from hope_kernels.titan_memory_update.state import MLPMemoryState

    xs = [t.detach().clone().requires_grad_(True) for t in list(args) + list(state)]
    out, final = fn(*xs[:6], chunk_size, "mlp", rule, MLPMemoryState(*xs[6:]))
    g = torch.Generator().manual_seed(seed)
    rnd = lambda t: torch.randn(t.shape, generator=g).to(t.device, t.dtype)  # noqa: E731
    total = (out.float() * rnd(out.float())).sum() + sum((s * rnd(s)).sum() for s in final)
    grads = torch.autograd.grad(total, xs)
    return [out, *final, *grads]


def assert_titan_mlp_close(actual, expected, tol: float, tag: str) -> None:
    """Every entry of two ``titan_mlp_outputs_and_grads`` results within ``tol`` relative RMS (in fp32)."""
    for name, a, e in zip(TITAN_MLP_OUTPUT_NAMES, actual, expected):
        assert_rel_close(f"{tag} {name}", a.float(), e.float(), tol)


def titan_mlp_state_pass_args(args, state, chunk_size: int, dgd: bool) -> tuple:
    """The mlp state-pass ops' arguments ``(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2,
    chunk_size)`` (contiguous, as the raw extensions take them)."""
    from hope_kernels.titan_memory_update.chunk_terms import linear_chunk_terms

    q, k, v, lr, mo, de = args
    t = linear_chunk_terms(q, k, lr, mo, de, chunk_size, dgd, mlp=True)
    xs = (q, k, t.khat, v, t.aqk, t.gth, t.akk, t.tinv, t.aqw, t.vec, t.end, *(s.float() for s in state))
    return (*(x.contiguous() if x is not None else None for x in xs), chunk_size)


def titan_mlp_state_pass_grads(cotangents, *op_args):
    """The mlp backward ops' 15 gradients (``state_pass.MLP_GRAD_NAMES``) by autograd through
    ``chunk_terms.mlp_state_pass`` in float64: ``cotangents = (do, dW1T, dW2T, dS1T, dS2T)``, ``op_args`` as
    ``titan_mlp_state_pass_args`` returns them. The oracle of a raw backward kernel."""
    from hope_kernels.titan_memory_update.chunk_terms import LinearChunkTerms, mlp_state_pass

    *tensors, chunk_size = op_args
    xs = [t.detach().double().cpu().requires_grad_(True) if t is not None else None for t in tensors]
    q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2 = xs
    terms = LinearChunkTerms(aqk, akk, tinv, aqw, vec, end, kh, gth)
    outs = mlp_state_pass(q, k, v, terms, W1, W2, S1, S2, chunk_size)
    total = sum((o * c.detach().double().cpu()).sum() for o, c in zip(outs, cotangents))
    live = [x for x in xs if x is not None]
    grads = iter(torch.autograd.grad(total, live, allow_unused=True))
    result = []
    for x in xs:
        g = next(grads) if x is not None else None
        result.append(torch.zeros_like(x) if x is not None and g is None else g)
    return result


# --------------------------------------------------------------- shared test bodies of the C++ CPU and CUDA kernels
#: the raw mlp state-pass ops' argument names (``titan_mlp_state_pass_args``' order)
TITAN_MLP_OP_NAMES = ["q", "k", "kh", "v", "aqk", "gth", "akk", "tinv", "aqw", "vec", "end", "W1", "W2", "S1", "S2",
                      "chunk_size"]


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


def check_titan_state_pass_opcheck(fwd, fwd_op, bwd_op, op_args_of, **opcheck_kw) -> None:
    """``torch.library.opcheck`` of a state-pass forward op and its backward op (cotangents random, like the
    forward's outputs), for titans and dgd: ``op_args_of(dgd)`` gives the forward's arguments, ``fwd`` runs it."""
    for dgd in (False, True):
        fa = op_args_of(dgd)
        torch.library.opcheck(fwd_op, fa, **opcheck_kw)
        outs = fwd(*fa)
        bwd_args = (*(torch.randn_like(o) for o in outs), *fa)
        torch.library.opcheck(bwd_op, bwd_args, **opcheck_kw)


def check_titan_mlp_raw_ops(ext, case, dgd: bool, tol: float, device="cpu"):
    """The raw mlp ops of an extension module (``ext.titan_mlp_fwd`` / ``titan_mlp_bwd`` on ``device``) vs
    ``chunk_terms.mlp_state_pass`` (forward; the first stored chunk-start state is the initial one) and its float64
    autograd (all 15 gradients, shapes included; the dgd-only ones empty for titans). Returns ``(cotangents,
    op_args, grads)`` on the CPU."""
    from hope_kernels.titan_memory_update.chunk_terms import LinearChunkTerms, mlp_state_pass
    from hope_kernels.titan_memory_update.state_pass import MLP_GRAD_NAMES

    B, H, T, D, E, C = case
    args, state = titan_mlp_inputs(B, H, T, D, E)
    cpu_args = titan_mlp_state_pass_args(args, state, C, dgd)
    op_args = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in cpu_args)
    q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, _ = cpu_args
    expected = mlp_state_pass(q, k, v, LinearChunkTerms(aqk, akk, tinv, aqw, vec, end, kh, gth), W1, W2, S1, S2, C)
    got = [x.cpu() for x in ext.titan_mlp_fwd(*op_args, True)]
    for name, a, e in zip(["out", "W1_T", "W2_T", "S1_T", "S2_T"], got, expected):
        assert_rel_close(f"fwd {name}", a, e, tol)
    states = got[5].view(B, H, -1, 4, D, E)
    assert torch.equal(states[:, :, 0, 0], W1) and torch.equal(states[:, :, 0, 1].reshape(W2.shape), W2)
    g = torch.Generator().manual_seed(3)
    cot = [torch.randn(x.shape, generator=g) for x in expected]
    grads = [x.cpu() for x in ext.titan_mlp_bwd(*(c.to(device) for c in cot), *op_args)]
    oracle = titan_mlp_state_pass_grads(cot, *cpu_args)
    for name, a, e in zip(MLP_GRAD_NAMES, grads, oracle):
        if e is None:
            assert a.numel() == 0, name
        else:
            assert a.shape == e.shape, name
            assert_rel_close(f"bwd {name}", a, e.float(), tol)
    return cot, cpu_args, grads


def check_titan_mlp_every_output_is_written(ext, case, rule: str, device="cpu") -> None:
    """Every output of the raw mlp forward and backward (``ext.titan_mlp_fwd`` / ``titan_mlp_bwd``) starts as NaN
    (``nan_filled_empty``): an element the kernels forget to write fails."""
    from hope_kernels.titan_memory_update.state_pass import MLP_GRAD_NAMES

    B, H, T, D, E, C = case
    args, state = titan_mlp_inputs(B, H, T, D, E, device=device)
    with torch.no_grad():
        op_args = titan_mlp_state_pass_args(args, state, C, rule == "dgd")
    cot = [torch.randn(B, H, T, D, device=device), *(torch.randn_like(s) for s in state)]
    with nan_filled_empty(device):
        fwd = ext.titan_mlp_fwd(*op_args, True)
        grads = ext.titan_mlp_bwd(*cot, *op_args)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    assert_outputs_written("forward", ["out", "W1_T", "W2_T", "S1_T", "S2_T", "states"], fwd)
    assert_outputs_written("backward", MLP_GRAD_NAMES, grads)


def check_titan_mlp_nan_input_is_not_hidden(fn, shape, device="cpu") -> None:
    """A NaN in v reaches the output and every final state of ``fn`` (a backend's titan_memory_update), both rules;
    ``shape = (B, H, T, D, E)``."""
    from hope_kernels.titan_memory_update.state import MLPMemoryState

    args, state = titan_mlp_inputs(*shape, device=device)
    args[2][0, 0, 3, 5] = float("nan")
    for rule in ("titans", "dgd"):
        out, st = fn(*args, 8, "mlp", rule, MLPMemoryState(*state))
        assert torch.isnan(out).any() and all(torch.isnan(s).any() for s in st), rule


def titan_mlp_bad_args(q, v, gth, chunk_size) -> list:
    """``(bad_arg, make_bad)`` rows for ``check_titan_mlp_bad_argument``: each ``make_bad`` spoils one argument of
    the good ``{name: arg}`` dict (TITAN_MLP_OP_NAMES). The rows for q, v, gth and chunk_size are the backend's (a
    device, dtype or size only one backend refuses); the others are common."""
    return [
        ("q", q),
        ("k", lambda a: dict(a, k=a["k"][:, :, :-1].contiguous())),
        ("v", v),
        ("kh", lambda a: dict(a, kh=a["kh"][:, :, :-1].contiguous())),
        ("aqk", lambda a: dict(a, aqk=a["aqk"].transpose(-1, -2))),
        ("gth", gth),
        ("tinv", lambda a: dict(a, tinv=None)),
        ("vec", lambda a: dict(a, vec=a["vec"].double())),
        ("end", lambda a: dict(a, end=a["end"][..., :2].contiguous())),
        ("W1", lambda a: dict(a, W1=a["W1"][0])),
        ("W2", lambda a: dict(a, W2=a["W2"].transpose(-1, -2).contiguous())),
        ("S1", lambda a: dict(a, S1=a["S1"].half())),
        ("S2", lambda a: dict(a, S2=a["S2"][..., :-1].contiguous())),
        ("chunk_size", chunk_size),
    ]


def check_titan_mlp_bad_argument(ext, bad_arg: str, make_bad, shape, device="cpu"):
    """The raw mlp forward and backward (``ext.titan_mlp_fwd`` / ``titan_mlp_bwd``) refuse the arguments
    ``make_bad`` spoils with a RuntimeError naming ``bad_arg``; ``shape = (B, H, T, D, E)``, chunk 8, dgd. Returns
    the good arguments (a dict) and the forward's outputs."""
    import pytest

    args, state = titan_mlp_inputs(*shape, device=device)
    good = dict(zip(TITAN_MLP_OP_NAMES, titan_mlp_state_pass_args(args, state, 8, True)))
    with pytest.raises(RuntimeError, match=rf"\b{bad_arg}\b"):
        ext.titan_mlp_fwd(**make_bad(good), store_states=False)
    fwd = ext.titan_mlp_fwd(**good, store_states=False)
    out, W1T, W2T, S1T, S2T, _ = fwd
    with pytest.raises(RuntimeError, match=rf"\b{bad_arg}\b"):
        ext.titan_mlp_bwd(out, W1T, W2T, S1T, S2T, **make_bad(good))
    return good, fwd


def check_titan_mlp_public_api(backend: str, rule: str, tol: float, device="cpu") -> None:
    """titan_memory_update(memory='mlp', backend=backend) vs the reference: output and final state, then a backward
    with every gradient finite."""
    from hope_kernels.titan_memory_update import MLPMemoryState, titan_memory_update

    args, state = titan_mlp_inputs(1, 3, 41, 12, 20, device=device)
    leaves = [a.clone().requires_grad_(True) for a in args]
    out_c, st_c = titan_memory_update(*leaves, chunk_size=16, memory="mlp", rule=rule,
                                      state=MLPMemoryState(*state), backend=backend)
    out_r, st_r = titan_memory_update(*args, chunk_size=16, memory="mlp", rule=rule, state=MLPMemoryState(*state),
                                      backend="reference")
    assert_rel_close("out", out_c.detach(), out_r, tol)
    for name, a, e in zip(("W1", "W2", "S1", "S2"), st_c, st_r):
        assert_rel_close(name, a.detach(), e, tol)
    out_c.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


def check_titan_mlp_matches_reference(fn, case, rule: str, tol: float, tag: str, device="cpu") -> None:
    """A backend's titan_memory_update ``fn`` (mlp memory) vs the reference at ``case = (B, H, T, D, E, C)``:
    output, final state and every gradient (``titan_mlp_outputs_and_grads``)."""
    from hope_kernels.titan_memory_update.reference import titan_memory_update_reference

    B, H, T, D, E, C = case
    args, state = titan_mlp_inputs(B, H, T, D, E, device=device)
    expected = titan_mlp_outputs_and_grads(titan_memory_update_reference, args, state, C, rule)
    actual = titan_mlp_outputs_and_grads(fn, args, state, C, rule)
    assert_titan_mlp_close(actual, expected, tol, f"{tag} {rule} {case}")


def check_bf16_inputs_are_cast(fn, memory: str, args, state) -> None:
    """bf16 q, k, v through a backend's titan_memory_update ``fn`` (rule dgd, chunk 8): the output is bf16, every
    final state fp32, and the output within 2e-2 of the reference on the same (fp32-cast) inputs."""
    from hope_kernels.titan_memory_update.reference import titan_memory_update_reference
    from hope_kernels.titan_memory_update.state import LinearMemoryState, MLPMemoryState

    make_state = MLPMemoryState if memory == "mlp" else LinearMemoryState
    half = [a.bfloat16() if a.dim() == 4 else a for a in args]
    out, st = fn(*half, 8, memory, "dgd", make_state(*state))
    assert out.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in st)
    ref, _ = titan_memory_update_reference(*[a.float() if a.dim() == 4 else a for a in half], 8, memory, "dgd",
                                           make_state(*state))
    assert_rel_close("bf16 out", out.float(), ref, 2e-2)
