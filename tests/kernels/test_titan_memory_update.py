"""titan_memory_update: the naive function against the float64 per-token oracle (forward and backward), chunking
invariants, precision, gradcheck and the public function's argument checks; then every kernel backend (triton, cpp,
cuda; readable ids, skipped where the backend cannot run) against the naive function and the float64 oracles: forward,
final state and every gradient on odd sizes, both memories and rules, the raw state pass against its spec, outputs all
written, NaN propagation, the custom ops (opcheck, torch.compile fullgraph), and the raw extensions' argument checks.
On the CPU Triton runs under TRITON_INTERPRET=1 (tests/conftest.py) in fp32."""
import dataclasses

import pytest
import torch

from hope_kernels import _ext, backends
from hope_kernels.titan_memory_update import (LinearMemoryState, MLPMemoryState, TitanCall, titan_memory_update,
                                              titan_memory_update_naive)
from hope_kernels.titan_memory_update.chunk import ROW_NAMES, TERM_NAMES, ChunkTerms, chunk_terms
from hope_kernels.titan_memory_update.naive import gelu, gelu_grad, memory_apply
from tests.kernels.helpers import (STATE_NAMES, TITAN_CASES, TITAN_MLP_CASES, assert_outputs_written,
                                   assert_rel_close, assert_titan_close, backend_fn, check_compiles_fullgraph,
                                   nan_filled_empty, output_names, raw_args, raw_grad_names, rel_rms_error,
                                   state_of, state_pass_grads_oracle, state_pass_oracle, titan_case_inputs,
                                   titan_inputs, titan_mlp_inputs, titan_outputs_and_grads)
from tests.kernels.titan_oracle import linear_state_pass, titan_memory_update_oracle


F64 = torch.float64
TOL64 = 1e-6


def make_inputs(memory, B=2, H=2, T=13, Dk=5, Dv=3, E=7, dtype=F64, with_state=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if memory == "mlp":
        Dv = Dk
    q = torch.randn(B, H, T, Dk, generator=gen, dtype=dtype)
    k = torch.randn(B, H, T, Dk, generator=gen, dtype=dtype)
    v = torch.randn(B, H, T, Dv, generator=gen, dtype=dtype)
    lr, momentum, decay = (torch.rand(B, H, T, generator=gen, dtype=dtype) for _ in range(3))
    # exact edge values of the gates
    lr[0, 0, 2] = 0.0
    momentum[0, 0, 3] = 0.0
    decay[0, H - 1, 1] = 1.0
    momentum[B - 1, 0, 4] = 1.0
    lr[-1, -1, -1] = 1.0
    decay[-1, 0, 0] = 0.0
    if memory == "linear":
        if with_state:
            state = LinearMemoryState(0.3 * torch.randn(B, H, Dv, Dk, generator=gen, dtype=dtype),
                                      0.1 * torch.randn(B, H, Dv, Dk, generator=gen, dtype=dtype))
        else:
            state = LinearMemoryState(torch.zeros(B, H, Dv, Dk, dtype=dtype), torch.zeros(B, H, Dv, Dk, dtype=dtype))
    else:
        state = MLPMemoryState(0.3 * torch.randn(B, H, Dk, E, generator=gen, dtype=dtype),
                               0.3 * torch.randn(B, H, E, Dk, generator=gen, dtype=dtype),
                               0.1 * torch.randn(B, H, Dk, E, generator=gen, dtype=dtype),
                               0.1 * torch.randn(B, H, E, Dk, generator=gen, dtype=dtype))
    return [q, k, v, lr, momentum, decay], state


def leaf(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def functional(out, state, seed=1):
    """A random linear functional of out and every final-state tensor (so all paths get gradients)."""
    gen = torch.Generator().manual_seed(seed)
    total = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    for s in state:
        total = total + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return total


def run_with_grads(fn, args, state, chunk_size, memory, rule):
    args_l, state_l = leaf(args), leaf(list(state))
    out, final = fn(*args_l, chunk_size, memory, rule, type(state)(*state_l))
    grads = torch.autograd.grad(functional(out, final), args_l + state_l)
    return out, final, grads


CASES = [(13, 4), (7, 8), (16, 16)]
ARG_NAMES = ["q", "k", "v", "lr", "momentum", "decay"]


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("T,C", CASES)
def test_reference_matches_oracle_forward_backward(memory, rule, T, C):
    args, state = make_inputs(memory, T=T)
    out_r, st_r, g_r = run_with_grads(titan_memory_update_naive, args, state, C, memory, rule)
    out_o, st_o, g_o = run_with_grads(titan_memory_update_oracle, args, state, C, memory, rule)
    assert rel_rms_error(out_r, out_o) <= TOL64
    for name, a, b in zip(state._fields, st_r, st_o):
        assert rel_rms_error(a, b) <= TOL64, f"final state.{name}"
    names = ARG_NAMES + [f"state.{f}" for f in state._fields]
    for name, a, b in zip(names, g_r, g_o):
        assert b.abs().max() > 0, f"oracle grad of {name} is zero: test would be vacuous"
        assert rel_rms_error(a, b) <= TOL64, f"grad of {name}: {rel_rms_error(a, b):.3e}"


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_linear_zero_state_matches_oracle(rule):
    args, state = make_inputs("linear", T=9, with_state=False)
    out_r, st_r, g_r = run_with_grads(titan_memory_update_naive, args, state, 4, "linear", rule)
    out_o, st_o, g_o = run_with_grads(titan_memory_update_oracle, args, state, 4, "linear", rule)
    assert rel_rms_error(out_r, out_o) <= TOL64
    for a, b in zip(list(st_r) + list(g_r), list(st_o) + list(g_o)):
        assert rel_rms_error(a, b) <= TOL64
    # the public function with state=None is the zero state
    out_p, st_p = titan_memory_update(*[a.float() for a in args], chunk_size=4, rule=rule, backend="reference")
    assert st_p.W.dtype == torch.float32
    assert rel_rms_error(out_p, out_o) <= 1e-5


def per_token_recurrence(args, state, memory, rule):
    """Plain per-token recurrence, gradients at W_{t-1} (via autograd of l_t), dgd preconditioner explicit."""
    q, k, v, lr, momentum, decay = args
    T = q.shape[2]
    ws = list(state)
    outs = []
    for t in range(T):
        with torch.enable_grad():
            wl = [w.detach().requires_grad_(True) for w in ws[: len(ws) // 2]]
            st = (LinearMemoryState(wl[0], None) if memory == "linear" else MLPMemoryState(wl[0], wl[1], None, None))
            pred = memory_apply(st, k[:, :, t : t + 1], memory)
            loss = 0.5 * ((pred - v[:, :, t : t + 1]) ** 2).sum()
            us = torch.autograd.grad(loss, wl)
        n = len(ws) // 2
        th, m, keep = (x[:, :, t, None, None] for x in (lr, momentum, 1 - decay))
        new_s = [m * s - th * u for s, u in zip(ws[n:], us)]
        new_w = []
        for i, (w, s) in enumerate(zip(ws[:n], new_s)):
            reads_k = (memory == "linear") or i == 1
            if rule == "dgd" and reads_k:
                kh = k[:, :, t] / k[:, :, t].norm(dim=-1, keepdim=True).clamp_min(1e-6)
                eye = torch.eye(kh.shape[-1], dtype=kh.dtype)
                D = keep * eye - th * kh[..., :, None] * kh[..., None, :]
                new_w.append(w @ D + s)
            else:
                new_w.append(keep * w + s)
        ws = new_w + new_s
        st = LinearMemoryState(*ws) if memory == "linear" else MLPMemoryState(*ws)
        outs.append(memory_apply(st, q[:, :, t : t + 1], memory))
    return torch.cat(outs, 2), ws


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_chunk_size_one_is_per_token_recurrence(memory, rule):
    args, state = make_inputs(memory, T=6, seed=3)
    out_r, st_r = titan_memory_update_naive(*args, 1, memory, rule, state)
    out_p, st_p = per_token_recurrence(args, state, memory, rule)
    assert rel_rms_error(out_r, out_p) <= TOL64
    for a, b in zip(st_r, st_p):
        assert rel_rms_error(a, b) <= TOL64


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_two_calls_equal_one_call(memory, rule):
    args, state = make_inputs(memory, T=14, seed=4)
    C, T1 = 4, 8
    out, final = titan_memory_update_naive(*args, C, memory, rule, state)
    first = [a[:, :, :T1] for a in args]
    second = [a[:, :, T1:] for a in args]
    out1, mid = titan_memory_update_naive(*first, C, memory, rule, state)
    out2, final2 = titan_memory_update_naive(*second, C, memory, rule, mid)
    assert rel_rms_error(torch.cat([out1, out2], 2), out) <= 1e-12
    for a, b in zip(final2, final):
        assert rel_rms_error(a, b) <= 1e-12


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_fp32_reference_close_to_fp64(memory, rule):
    args, state = make_inputs(memory, T=13, seed=5)
    out64, st64 = titan_memory_update_naive(*args, 4, memory, rule, state)
    args32 = [a.float() for a in args]
    state32 = type(state)(*(s.float() for s in state))
    out32, st32 = titan_memory_update_naive(*args32, 4, memory, rule, state32)
    assert out32.dtype == torch.float32 and all(s.dtype == torch.float32 for s in st32)
    assert rel_rms_error(out32, out64) <= 1e-5
    for a, b in zip(st32, st64):
        assert rel_rms_error(a, b) <= 1e-5


def test_low_precision_output_dtype():
    args, state = make_inputs("linear", T=5, dtype=torch.float32, seed=6)
    args[:3] = [a.to(torch.bfloat16) for a in args[:3]]
    out, st = titan_memory_update(*args, chunk_size=4, state=state, backend="reference")
    assert out.dtype == torch.bfloat16 and st.W.dtype == torch.float32
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_gradcheck_tiny(memory, rule):
    args, state = make_inputs(memory, B=1, H=1, T=5, Dk=3, Dv=2, E=2, seed=7)
    # keep gates away from the [0, 1] boundary so finite differences stay inside the domain of the op
    args[3:] = [0.1 + 0.8 * g for g in args[3:]]
    n_args = len(args)

    def fn(*xs):
        out, st = titan_memory_update_naive(*xs[:n_args], 2, memory, rule, type(state)(*xs[n_args:]))
        return (out,) + tuple(st)

    assert torch.autograd.gradcheck(fn, tuple(leaf(args + list(state))), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gelu_grad_matches_autograd():
    x = torch.linspace(-6, 6, 101, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(gelu(x).sum(), x)
    assert rel_rms_error(gelu_grad(x), g) <= 1e-12


def test_memory_apply_shapes_and_values():
    args, state = make_inputs("mlp", T=6, seed=8)
    x = args[0]
    y = memory_apply(state, x, "mlp")
    expect = x + torch.einsum("bhde,bhte->bhtd", state.W1, gelu(torch.einsum("bhed,bhtd->bhte", state.W2, x)))
    assert rel_rms_error(y, expect) <= 1e-12
    with pytest.raises(ValueError, match="memory"):
        memory_apply(state, x, "conv")


def test_zero_key_dgd_is_finite():
    args, state = make_inputs("linear", T=5, seed=9)
    args[1][:, :, 2] = 0.0
    out, st = titan_memory_update_naive(*args, 4, "linear", "dgd", state)
    out_o, st_o = titan_memory_update_oracle(*args, 4, "linear", "dgd", state)
    assert torch.isfinite(out).all() and rel_rms_error(out, out_o) <= TOL64


# ---------------------------------------------------------------- argument checks of the public function


def good_inputs(memory="linear"):
    args, state = make_inputs(memory, B=1, H=2, T=5, dtype=torch.float32, seed=10)
    return args, state


def call(args, **kw):
    kw.setdefault("chunk_size", 4)
    kw.setdefault("backend", "reference")
    return titan_memory_update(*args, **kw)


def replaced(args, i, value):
    out = list(args)
    out[i] = value
    return out


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


@pytest.mark.parametrize(
    "i,bad,exc,name",
    [
        (0, lambda a: a[0][0], ValueError, "q"),
        (1, lambda a: a[1][..., :4], ValueError, "k"),
        (2, lambda a: a[2][:, :, :3], ValueError, "v"),
        (2, lambda a: a[2].double(), TypeError, "dtype"),
        (1, lambda a: a[1].to(torch.float16), TypeError, "dtype"),
        (3, lambda a: a[3][..., None], ValueError, "lr"),
        (4, lambda a: a[4][:, :1], ValueError, "momentum"),
        (5, lambda a: a[5] + 1.5, ValueError, "decay"),
        (3, lambda a: a[3] - 2.0, ValueError, "lr"),
        (4, lambda a: torch.full_like(a[4], float("nan")), ValueError, "momentum"),
        (1, lambda a: a[1].to("meta"), ValueError, "k"),
        (0, lambda a: _with(a[0], (0, 1, 2, 3), float("nan")), ValueError, "q must be finite"),
        (1, lambda a: _with(a[1], (0, 0, 4, 1), float("inf")), ValueError, "k must be finite"),
        (2, lambda a: _with(a[2], (0, 1, 0, 0), float("-inf")), ValueError, "v must be finite"),
    ],
)
def test_bad_tensor_inputs_name_the_argument(i, bad, exc, name):
    args, _ = good_inputs()
    with pytest.raises(exc, match=name):
        call(replaced(args, i, bad(args)))


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, "4"])
def test_bad_chunk_size(chunk_size):
    args, _ = good_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        call(args, chunk_size=chunk_size)


def test_unknown_memory_and_rule():
    args, _ = good_inputs()
    with pytest.raises(ValueError, match="memory"):
        call(args, memory="conv")
    with pytest.raises(ValueError, match="rule"):
        call(args, rule="adam")


def test_mlp_needs_state_and_square_dims():
    args, state = good_inputs("mlp")
    with pytest.raises(ValueError, match="state"):
        call(args, memory="mlp")
    lin_args, _ = good_inputs("linear")  # Dk=5, Dv=3
    with pytest.raises(ValueError, match="Dk == Dv"):
        call(lin_args, memory="mlp", state=state)


def test_wrong_state_type_and_shape():
    args, state = good_inputs("linear")
    margs, mstate = good_inputs("mlp")
    with pytest.raises(TypeError, match="state"):
        call(args, state=mstate)
    with pytest.raises(TypeError, match="state"):
        call(margs, memory="mlp", state=LinearMemoryState(mstate.W1, mstate.S1))
    with pytest.raises(ValueError, match="state.S"):
        call(args, state=LinearMemoryState(state.W, state.S[..., :2]))
    with pytest.raises(ValueError, match="state.W2"):
        call(margs, memory="mlp", state=mstate._replace(W2=mstate.W2[:, :, :3]))
    with pytest.raises(TypeError, match="state.W"):
        call(args, state=LinearMemoryState(state.W.half(), state.S))


# =============================================================================================== kernel backends
HAS_CUDA = torch.cuda.is_available()
OP = "titan_memory_update"
TOL_FP32 = 1e-4  # exact fp32 (ieee / FMA) products in every kernel: the error is rounding only
TOL_BF16 = 2e-2
RULES = ["titans", "dgd"]
BACKENDS = [pytest.param("triton", id="triton"), pytest.param("cpp", id="cpp"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _device(name: str) -> str:
    return "cpu" if name == "cpp" else ("cuda" if name == "cuda" or HAS_CUDA else "cpu")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """A kernel backend that runs on this machine (its device: cuda for cuda / triton on a GPU, else the CPU)."""
    name = request.param
    if name not in backends.available_backends(OP, _device(name)):
        pytest.skip(f"{name} does not run here: {backends.MISSING.get((OP, name), 'no device for it')}")
    return name


def _case_id(c):
    return "B{}H{}T{}D{}W{}C{}".format(*c)


def _runs_chunk(backend, memory, rule, D, W, C, backward=True):
    """The largest chunk <= C the backend takes for this call (Triton's mlp kernels cap it: shared memory)."""
    rec = backends.get(OP, backend)
    while C > 1 and not rec.supports(TitanCall(torch.device(_device(backend)), torch.float32, memory, rule, D, W, C,
                                               backward))[0]:
        C //= 2
    return C


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", TITAN_CASES, ids=_case_id)
def test_linear_matches_naive_fp32(backend, rule, case):
    args, state = titan_case_inputs("linear", case, device=_device(backend))
    C = case[-1]
    expected = titan_outputs_and_grads(titan_memory_update_naive, args, state, C, rule)
    actual = titan_outputs_and_grads(backend_fn(backend), args, state, C, rule)
    assert_titan_close(actual, expected, TOL_FP32, f"{backend} {rule} {case}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", TITAN_MLP_CASES, ids=_case_id)
def test_mlp_matches_naive_fp32(backend, rule, case):
    B, H, T, D, E, C = case
    C = _runs_chunk(backend, "mlp", rule, D, E, C)
    args, state = titan_case_inputs("mlp", case, device=_device(backend))
    expected = titan_outputs_and_grads(titan_memory_update_naive, args, state, C, rule, "mlp")
    actual = titan_outputs_and_grads(backend_fn(backend), args, state, C, rule, "mlp")
    assert_titan_close(actual, expected, TOL_FP32, f"{backend} {rule} {case}", "mlp")


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", RULES)
def test_matches_float64_oracle(backend, memory, rule):
    case = (2, 2, 23, 9, 11, 8) if memory == "linear" else (1, 2, 19, 6, 10, 8)
    args, state = titan_case_inputs(memory, case)
    expected = titan_outputs_and_grads(titan_memory_update_oracle, [a.double() for a in args],
                                       [s.double() for s in state], 8, rule, memory)
    dev = _device(backend)
    actual = titan_outputs_and_grads(backend_fn(backend), [a.to(dev) for a in args], [s.to(dev) for s in state], 8,
                                     rule, memory)
    assert_titan_close([a.cpu() for a in actual], expected, TOL_FP32, f"{backend} {rule} vs oracle", memory)


@pytest.mark.parametrize("rule", RULES)
def test_zero_initial_state_through_public_api(backend, rule):
    """state=None (zero memory) through titan_memory_update(backend=...) vs the naive function."""
    args, _ = titan_inputs(1, 3, 41, 12, 20, with_state=False, device=_device(backend))
    out, st = titan_memory_update(*args, chunk_size=16, rule=rule, backend=backend)
    out_r, st_r = titan_memory_update(*args, chunk_size=16, rule=rule, backend="reference")
    for name, a, e in (("out", out, out_r), ("W_T", st.W, st_r.W), ("S_T", st.S, st_r.S)):
        assert_rel_close(name, a, e, TOL_FP32)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", RULES)
def test_raw_state_pass_matches_its_spec(backend, memory, rule, monkeypatch):
    """The backend's raw kernels (forward and backward) against tests/kernels/titan_oracle.py's state pass and its
    float64 autograd: every output and every gradient (terms included; empty where the call has no such term)."""
    dev = _device(backend)
    case = (2, 1, 45, 20, 28, 16) if memory == "linear" else (2, 1, 45, 20, 36, 16)
    args, state = titan_case_inputs(memory, case, device=dev)
    q, k, v, terms, st, C = raw_args(args, state, 16, memory, rule)
    kernel = backends.get(OP, backend).kernel
    outs = kernel[memory].forward(q, k, v, terms, st, C)
    spec = state_pass_oracle(memory, *(x.cpu() for x in (q, k, v)), [t.cpu() for t in terms], [s.cpu() for s in st],
                             C)
    for name, a, e in zip(output_names(memory), outs, spec):
        assert_rel_close(f"fwd {name}", a.cpu(), e, TOL_FP32)
    cot = [torch.randn_like(o) for o in outs]
    grads = kernel[memory].backward(cot, q, k, v, terms, st, C)
    expected = state_pass_grads_oracle(memory, cot, q, k, v, terms, st, C)
    assert len(grads) == len(raw_grad_names(memory))
    for name, a, e in zip(raw_grad_names(memory), grads, expected):
        if e is None:
            assert a.numel() == 0, f"{name}: expected an empty gradient for an absent term"
        else:
            assert a.shape == e.shape, name
            assert_rel_close(f"bwd {name}", a.cpu(), e.float(), TOL_FP32)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-forward", "update-then-parallel-readout"])
def test_triton_mlp_forward_paths_agree(fused, monkeypatch):
    """The mlp forward runs the update and the read-out in one launch (D <= 64) or as two (larger D): both match."""
    if "triton" not in backends.available_backends(OP, _device("triton")):
        pytest.skip("triton does not run here")
    from hope_kernels.titan_memory_update.triton import launch

    monkeypatch.setitem(launch.TUNING, "mlp_fused_fwd", fused)
    args, state = titan_mlp_inputs(2, 1, 45, 20, 36, device=_device("triton"))
    for rule in RULES:
        q, k, v, terms, st, C = raw_args(args, state, 16, "mlp", rule)
        outs = backends.get(OP, "triton").kernel["mlp"].forward(q, k, v, terms, st, C)
        spec = state_pass_oracle("mlp", q.cpu(), k.cpu(), v.cpu(), [t.cpu() for t in terms], [s.cpu() for s in st], C)
        for name, a, e in zip(output_names("mlp"), outs, spec):
            assert_rel_close(f"{rule} {name}", a.cpu(), e, TOL_FP32)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", RULES)
def test_every_output_is_written(backend, memory, rule):
    """Every output of the raw forward and backward starts as NaN (deterministic mode fills new memory with NaN): an
    element a kernel forgets to write fails. Dv / E 40: a partial last value block / hidden tile."""
    dev = _device(backend)
    args, state = titan_case_inputs(memory, (1, 2, 21, 20, 40, 8), device=dev)
    q, k, v, terms, st, C = raw_args(args, state, 8, memory, rule)
    kernel = backends.get(OP, backend).kernel
    cot = [torch.randn(*q.shape[:3], v.shape[-1], device=dev), *(torch.randn_like(s) for s in st)]
    with nan_filled_empty(dev):
        outs = kernel[memory].forward(q, k, v, terms, st, C)
        grads = kernel[memory].backward(cot, q, k, v, terms, st, C)
        if dev == "cuda":
            torch.cuda.synchronize()
    assert_outputs_written("forward", output_names(memory), outs)
    assert_outputs_written("backward", raw_grad_names(memory), grads)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", RULES)
def test_nan_input_is_not_hidden(backend, memory, rule):
    """A NaN in v (value checks off) reaches the output and every final state."""
    args, state = titan_case_inputs(memory, (1, 1, 12, 16, 16, 8), device=_device(backend))
    args[2][0, 0, 3, 5] = float("nan")
    out, st = backend_fn(backend)(*args, 8, memory, rule, state_of(memory, state))
    assert torch.isnan(out).any() and all(torch.isnan(s).any() for s in st)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_half_inputs_are_cast(backend, memory):
    """bf16 q, k, v (rule dgd, chunk 8): the output is bf16, every final state fp32, within 2e-2 of the naive
    function on the same (fp32-cast) inputs."""
    if backend == "triton" and not HAS_CUDA:
        pytest.skip("the Triton interpreter runs fp32 only")
    args, state = titan_case_inputs(memory, (1, 2, 20, 8, 12, 8), device=_device(backend))
    half = [a.bfloat16() if a.dim() == 4 else a for a in args]
    out, st = titan_memory_update(*half, chunk_size=8, memory=memory, rule="dgd", state=state_of(memory, state),
                                  backend=backend)
    assert out.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in st)
    ref, _ = titan_memory_update_naive(*[a.float() if a.dim() == 4 else a for a in half], 8, memory, "dgd",
                                       state_of(memory, state))
    assert_rel_close("bf16 out", out.float(), ref, TOL_BF16)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_custom_ops_opcheck(backend, memory):
    """hope::titan_state_pass and its backward op: schema and fake tensors, for titans and dgd."""
    args, state = titan_case_inputs(memory, (1, 2, 13, 16, 20, 8), device=_device(backend))
    for rule in RULES:
        q, k, v, terms, st, C = raw_args(args, state, 8, memory, rule)
        fwd_args = (memory, q, k, v, terms, st, C, backend)
        torch.library.opcheck(torch.ops.hope.titan_state_pass.default, fwd_args,
                              test_utils=("test_schema", "test_faketensor"))
        outs = torch.ops.hope.titan_state_pass(*fwd_args)
        bwd_args = (memory, [torch.randn_like(o) for o in outs], q, k, v, terms, st, C, backend)
        torch.library.opcheck(torch.ops.hope.titan_state_pass_backward.default, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_compile_fullgraph_traces_the_op(backend, memory):
    args, state = titan_case_inputs(memory, (1, 2, 19, 16, 24, 8), device=_device(backend))
    check_compiles_fullgraph(backend, memory, "dgd", args, state, 8, TOL_FP32)


def test_triton_dgd_backward_at_wide_keys_and_large_chunks():
    """dgd with Dk > 64 and chunk 64 once needed more shared memory in the backward than an H100 has; it runs value
    blocks of 16 (tests/kernels/test_triton_resources.py checks the fit). Dk > 128 is refused with a clear error."""
    if "triton" not in backends.available_backends(OP, _device("triton")):
        pytest.skip("triton does not run here")
    from hope_kernels.titan_memory_update.triton import linear

    args, state = titan_inputs(1, 1, 70, 72, 20, device=_device("triton"))
    expected = titan_outputs_and_grads(titan_memory_update_naive, args, state, 64, "dgd")
    actual = titan_outputs_and_grads(backend_fn("triton"), args, state, 64, "dgd")
    assert_titan_close(actual, expected, TOL_FP32, "dgd Dk 72 C 64")
    assert linear._blocks(64, 72, 20, backward=True, dgd=True)[2] == 16
    args, state = titan_inputs(1, 1, 5, 136, 16, device=_device("triton"))
    with pytest.raises(ValueError, match="Dk <= 128"):
        titan_memory_update(*args, chunk_size=4, state=LinearMemoryState(*state), backend="triton")


def test_triton_mlp_limits_refuse_by_name_and_auto_falls_back(monkeypatch):
    """backend='triton' refuses what its mlp kernels cannot fit with the limit named; $HOPE_BACKEND=triton still runs
    such a call (on the next backend)."""
    if "triton" not in backends.available_backends(OP, _device("triton")):
        pytest.skip("triton does not run here")
    from hope_kernels.titan_memory_update.triton import mlp

    assert mlp.why_not_mlp(136, 64, 16, "titans", True) is not None
    assert mlp.why_not_mlp(64, 1000, 64, "titans", True) is None  # any E: it is tiled
    assert mlp.why_not_mlp(64, 128, 64, "dgd", True) is None and mlp.why_not_mlp(128, 256, 64, "titans", False) is None
    assert "chunk_size <= 32" in mlp.why_not_mlp(128, 256, 64, "dgd", True)
    args, state = titan_mlp_inputs(1, 1, 9, 72, 12, device=_device("triton"))
    leaves = [t.clone().requires_grad_(True) for t in args]
    with pytest.raises(ValueError, match="chunk_size <= 32"):
        titan_memory_update(*leaves, chunk_size=64, memory="mlp", rule="dgd", state=MLPMemoryState(*state),
                            backend="triton")
    args, state = titan_mlp_inputs(1, 1, 5, 136, 16, device=_device("triton"))
    with pytest.raises(ValueError, match="D <= 128"):
        titan_memory_update(*args, chunk_size=4, memory="mlp", state=MLPMemoryState(*state), backend="triton")
    monkeypatch.setenv("HOPE_BACKEND", "triton")
    out, _ = titan_memory_update(*args, chunk_size=4, memory="mlp", state=MLPMemoryState(*state))
    ref, _ = titan_memory_update(*args, chunk_size=4, memory="mlp", state=MLPMemoryState(*state), backend="reference")
    assert_rel_close("mlp D 136 via the fallback", out, ref, 1e-6)


def test_cpp_runs_where_auto_picks_it(monkeypatch):
    """Auto runs the C++ kernels exactly where its record does not skip the call (tests/kernels/test_backends.py
    tabulates the choice); backend='cpp' runs them everywhere."""
    if _ext.cpu is None:
        pytest.skip(_ext.why_unavailable("_C_cpu"))
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    seen = []
    rec = backends.get(OP, "cpp")

    class Spy:
        def __init__(self, memory):
            self.memory = memory

        def forward(self, *a):
            seen.append(self.memory)
            return rec.kernel[self.memory].forward(*a)

        def backward(self, *a):
            return rec.kernel[self.memory].backward(*a)

    spies = {memory: Spy(memory) for memory in rec.kernel}
    monkeypatch.setitem(backends._RECORDS[OP], "cpp", dataclasses.replace(rec, kernel=spies))
    for memory in ("linear", "mlp"):
        args, state = titan_case_inputs(memory, (1, 1, 9, 8, 8, 4))
        for rule in RULES:
            for backward in (True, False):
                leaves = [a.clone().requires_grad_(backward) for a in args]
                seen.clear()
                with torch.set_grad_enabled(backward):
                    titan_memory_update(*leaves, chunk_size=4, memory=memory, rule=rule,
                                        state=state_of(memory, state))
                call = TitanCall(torch.device("cpu"), torch.float32, memory, rule, 8, 8, 4, backward)
                assert seen == ([] if rec.auto_skips(call) else [memory]), (memory, rule, backward)
            seen.clear()
            with torch.no_grad():
                titan_memory_update(*args, chunk_size=4, memory=memory, rule="titans", state=state_of(memory, state),
                                    backend="cpp")
            assert seen == [memory]


def test_extension_term_order_is_chunk_py_s():
    """The extensions read the terms list in the order chunk.py's TERM_NAMES writes it (csrc/titan_inputs.h)."""
    for ext in (_ext.cpu, _ext.cuda):
        if ext is not None:
            assert list(ext.TITAN_TERMS) == list(TERM_NAMES)


def test_chunk_terms_named_rows_round_trip():
    """ChunkTerms names every term by role: kernel_terms() packs them, from_kernel_terms() reads them back."""
    args, _ = titan_inputs(1, 2, 19, 6, 5)
    for dgd in (False, True):
        t = chunk_terms(args[0], args[1], *args[3:], 8, dgd=dgd, mlp=True)
        back = ChunkTerms.from_kernel_terms(t.kernel_terms())
        for f in dataclasses.fields(ChunkTerms):
            a, b = getattr(t, f.name), getattr(back, f.name)
            assert (a is None and b is None) or torch.equal(a, b), f.name
        assert len(ROW_NAMES) == 7


@pytest.mark.parametrize("rule", RULES)
def test_chunk_terms_and_state_pass_match_naive_float64(rule):
    """The kernel split itself (chunk terms + the state pass the kernels implement) is exact in float64."""
    args, state = titan_inputs(2, 2, 45, 6, 9, dtype=torch.float64)
    args = [a.double() for a in args]
    state = [s.double() for s in state]
    for C in (4, 16, 64):
        terms = chunk_terms(args[0], args[1], *args[3:], C, dgd=rule == "dgd")
        out, W, S = linear_state_pass(args[0], args[1], args[2], terms, *state, C)
        ref_out, ref_st = titan_memory_update_naive(*args, C, "linear", rule, LinearMemoryState(*state))
        assert_rel_close("out", out, ref_out, 1e-12)
        assert_rel_close("W", W, ref_st.W, 1e-12)
        assert_rel_close("S", S, ref_st.S, 1e-12)


# ---------------------------------------------------------------- the raw extensions name a bad argument
EXTENSIONS = [pytest.param("cpp", id="cpp"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _ext_of(name):
    ext = {"cpp": _ext.cpu, "cuda": _ext.cuda}[name]
    if ext is None:
        pytest.skip(f"{name} extension not loaded: {_ext.why_unavailable('_C_cpu' if name == 'cpp' else '_C_cuda')}")
    return ext


def _spoil_term(name, how):
    i = TERM_NAMES.index(name)
    return lambda a: dict(a, terms=[how(t) if j == i else t for j, t in enumerate(a["terms"])])


BAD_ARGS = [
    ("k", lambda a: dict(a, k=a["k"][:, :, :-1].contiguous())),
    ("v", lambda a: dict(a, v=a["v"][0])),
    ("khat", _spoil_term("khat", lambda t: t[:, :, :-1].contiguous())),
    ("aqk", _spoil_term("aqk", lambda t: t.transpose(-1, -2))),
    ("tinv", _spoil_term("tinv", lambda t: t.new_empty(0))),
    ("rows", _spoil_term("rows", lambda t: t.double())),
    ("ends", _spoil_term("ends", lambda t: t[..., :2].contiguous())),
    ("chunk_size", lambda a: dict(a, chunk_size=0)),
    ("terms", lambda a: dict(a, terms=a["terms"][:-1])),
]


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("ext_name", EXTENSIONS)
@pytest.mark.parametrize("bad_arg,make_bad", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_raw_extension_checks_name_the_argument(ext_name, memory, bad_arg, make_bad):
    ext = _ext_of(ext_name)
    dev = _device(ext_name)
    args, state = titan_case_inputs(memory, (1, 2, 13, 8, 8, 8), device=dev)
    q, k, v, terms, st, C = raw_args(args, state, 8, memory, "dgd")
    good = dict(q=q, k=k, v=v, terms=terms, state=st, chunk_size=C)
    with pytest.raises(RuntimeError, match=rf"\b{bad_arg}\b"):
        ext.titan_fwd(memory, **make_bad(good), store_states=False)
    out, *final, _ = ext.titan_fwd(memory, **good, store_states=False)
    with pytest.raises(RuntimeError, match=rf"\b{bad_arg}\b"):
        ext.titan_bwd(memory, [out, *final], **make_bad(good))


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("ext_name", EXTENSIONS)
def test_raw_extension_checks_name_the_gradient_arguments(ext_name, memory):
    ext = _ext_of(ext_name)
    args, state = titan_case_inputs(memory, (1, 2, 13, 8, 8, 8), device=_device(ext_name))
    raw = raw_args(args, state, 8, memory, "titans")
    out, *final, _ = ext.titan_fwd(memory, *raw, False)
    with pytest.raises(RuntimeError, match=r"\bd out\b"):
        ext.titan_bwd(memory, [out[..., :-1].contiguous(), *final], *raw)
    for i, name in enumerate(STATE_NAMES[memory]):
        spoiled = [s.double() if j == i else s for j, s in enumerate(final)]
        with pytest.raises(RuntimeError, match=rf"\bd {name}\b"):
            ext.titan_bwd(memory, [out, *spoiled], *raw)
    with pytest.raises(RuntimeError, match="grads must hold"):
        ext.titan_bwd(memory, [out], *raw)
    with pytest.raises(RuntimeError, match="memory must be"):
        ext.titan_fwd("tree", *raw, False)


# ---------------------------------------------------------------- GPU only: half inputs, model-sized shapes, CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_gpu(backend, memory, rule, dtype):
    case = (2, 3, 300, 64, 64 if memory == "linear" else 128, 64)
    C = _runs_chunk(backend, memory, rule, case[3], case[4], case[5])
    args, state = titan_case_inputs(memory, case, device="cuda", dtype=dtype)
    full = [a.float() if a.dim() == 4 else a for a in args]
    expected = titan_outputs_and_grads(titan_memory_update_naive, full, state, C, rule, memory)
    actual = titan_outputs_and_grads(backend_fn(backend), args, state, C, rule, memory)
    assert_titan_close(actual, expected, TOL_BF16, f"{backend} {rule} {dtype}", memory)


GPU_SHAPES = [("linear", (2, 4, 1000, 64, 64, 64)), ("linear", (1, 2, 2100, 128, 128, 64)),
              ("linear", (1, 2, 257, 96, 80, 16)), ("mlp", (2, 4, 1000, 64, 128, 64)),
              ("mlp", (1, 2, 700, 128, 256, 64)), ("mlp", (1, 2, 257, 96, 200, 64)), ("mlp", (1, 1, 130, 128, 512, 64))]


@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("memory,case", GPU_SHAPES, ids=[f"{m}-{_case_id(c)}" for m, c in GPU_SHAPES])
def test_fp32_gpu_head_dims(backend, memory, case, rule):
    B, H, T, D, W, C = case
    call = TitanCall(torch.device("cuda"), torch.float32, memory, rule, D, W, C, True)
    if not backends.get(OP, backend).supports(call)[0]:
        C = _runs_chunk(backend, memory, rule, D, W, C)
    if not backends.get(OP, backend).supports(dataclasses.replace(call, chunk_size=C))[0]:
        pytest.skip(f"{backend} does not take {memory} {case}: {backends.get(OP, backend).supports(call)[1]}")
    args, state = titan_case_inputs(memory, case, device="cuda")
    expected = titan_outputs_and_grads(titan_memory_update_naive, args, state, C, rule, memory)
    actual = titan_outputs_and_grads(backend_fn(backend), args, state, C, rule, memory)
    assert_titan_close(actual, expected, 5e-3, f"{backend} {rule} {case} C{C}", memory)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
def test_triton_mlp_forward_only_gpu(rule):
    """Forward-only calls take the larger forward chunk limit (and at D 128 the split forward: update, then the
    parallel read-out)."""
    for D in (64, 128):
        C = _runs_chunk("triton", "mlp", rule, D, 2 * D, 64, backward=False)
        args, state = titan_mlp_inputs(1, 4, 333, D, 2 * D, device="cuda")
        with torch.no_grad():
            out, st = titan_memory_update(*args, chunk_size=C, memory="mlp", rule=rule, state=MLPMemoryState(*state),
                                          backend="triton")
        ref, st_r = titan_memory_update_naive(*args, C, "mlp", rule, MLPMemoryState(*state))
        assert_rel_close(f"out D{D}", out, ref, 5e-3)
        assert_rel_close(f"W1 D{D}", st.W1, st_r.W1, 5e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [(2, 3, 150, 64, 48, 32), (1, 2, 77, 96, 80, 16)], ids=_case_id)
def test_cuda_matches_triton(rule, dtype, case):
    for name in ("cuda", "triton"):
        if name not in backends.available_backends(OP, "cuda"):
            pytest.skip(f"{name} does not run here")
    args, state = titan_case_inputs("linear", case, device="cuda", dtype=dtype)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 Triton products exact (ieee), as the CUDA kernels
    try:
        expected = titan_outputs_and_grads(backend_fn("triton"), args, state, case[-1], rule)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    actual = titan_outputs_and_grads(backend_fn("cuda"), args, state, case[-1], rule)
    assert_titan_close(actual, expected, TOL_FP32 if dtype == torch.float32 else TOL_BF16, f"{rule} {dtype}")


@pytest.mark.gpu
def test_noncontiguous_inputs_and_second_device_stream(backend):
    """Permuted q / k / v (as the layers pass them) go through the op's .contiguous(); runs on a side stream."""
    args, state = titan_inputs(1, 2, 33, 16, 24, device="cuda")
    q, k, v = (a.transpose(1, 2).contiguous().transpose(1, 2) for a in args[:3])
    assert not q.is_contiguous()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out, st = titan_memory_update(q, k, v, *args[3:], chunk_size=16, rule="dgd", state=LinearMemoryState(*state),
                                      backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    ref, st_r = titan_memory_update_naive(*args, 16, "linear", "dgd", LinearMemoryState(*state))
    assert_rel_close("out", out, ref, TOL_FP32)
    assert_rel_close("W_T", st.W, st_r.W, TOL_FP32)


@pytest.mark.gpu
def test_cuda_limits_refuse_by_name_and_auto_runs_the_next_backend(monkeypatch):
    if "cuda" not in backends.available_backends(OP, "cuda"):
        pytest.skip("cuda does not run here")
    args, _ = titan_inputs(1, 1, 20, 8, 8, device="cuda")
    st = MLPMemoryState(*(0.2 * torch.randn(1, 1, *shape, device="cuda") for shape in [(8, 12), (12, 8), (8, 12),
                                                                                        (12, 8)]))
    with pytest.raises(ValueError, match="chunk_size <= 64"):
        titan_memory_update(*args, chunk_size=128, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size <= 64"):
        titan_memory_update(*args, chunk_size=128, memory="mlp", state=st, backend="cuda")
    for memory, state in (("linear", None), ("mlp", st)):
        out, _ = titan_memory_update(*args, chunk_size=128, memory=memory, state=state)
        ref, _ = titan_memory_update(*args, chunk_size=128, memory=memory, state=state, backend="reference")
        assert_rel_close(f"{memory} chunk 128 via auto", out, ref, TOL_FP32)
    monkeypatch.setenv("HOPE_BACKEND", "cuda")
    out, _ = titan_memory_update(*args, chunk_size=4, memory="mlp", state=st)
    ref, _ = titan_memory_update(*args, chunk_size=4, memory="mlp", state=st, backend="reference")
    assert_rel_close("mlp via HOPE_BACKEND=cuda", out, ref, TOL_FP32)


def test_non_finite_inputs_pass_with_value_checks_off():
    """The finiteness checks of q, k, v follow the value-check switch, as the gate range checks do."""
    from hope_kernels._checks import value_checks_off

    args, _ = good_inputs()
    args = replaced(args, 0, _with(args[0], (0, 1, 2, 3), float("nan")))
    with value_checks_off():
        out, _ = call(args)
    assert torch.isnan(out).any()
