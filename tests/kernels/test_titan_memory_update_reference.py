"""Chunk-parallel reference of titan_memory_update vs the float64 per-token oracle (forward and backward),
plus chunking invariants, precision, gradcheck and the public function's argument checks."""
import pytest
import torch

from tests.kernels.helpers import rel_rms_error
from hope_kernels.titan_memory_update import LinearMemoryState, MLPMemoryState, titan_memory_update
from hope_kernels.titan_memory_update.oracle import titan_memory_update_oracle
from hope_kernels.titan_memory_update.reference import (
    gelu,
    gelu_grad,
    memory_apply,
    titan_memory_update_reference,
)

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
    out_r, st_r, g_r = run_with_grads(titan_memory_update_reference, args, state, C, memory, rule)
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
    out_r, st_r, g_r = run_with_grads(titan_memory_update_reference, args, state, 4, "linear", rule)
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
    out_r, st_r = titan_memory_update_reference(*args, 1, memory, rule, state)
    out_p, st_p = per_token_recurrence(args, state, memory, rule)
    assert rel_rms_error(out_r, out_p) <= TOL64
    for a, b in zip(st_r, st_p):
        assert rel_rms_error(a, b) <= TOL64


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_two_calls_equal_one_call(memory, rule):
    args, state = make_inputs(memory, T=14, seed=4)
    C, T1 = 4, 8
    out, final = titan_memory_update_reference(*args, C, memory, rule, state)
    first = [a[:, :, :T1] for a in args]
    second = [a[:, :, T1:] for a in args]
    out1, mid = titan_memory_update_reference(*first, C, memory, rule, state)
    out2, final2 = titan_memory_update_reference(*second, C, memory, rule, mid)
    assert rel_rms_error(torch.cat([out1, out2], 2), out) <= 1e-12
    for a, b in zip(final2, final):
        assert rel_rms_error(a, b) <= 1e-12


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_fp32_reference_close_to_fp64(memory, rule):
    args, state = make_inputs(memory, T=13, seed=5)
    out64, st64 = titan_memory_update_reference(*args, 4, memory, rule, state)
    args32 = [a.float() for a in args]
    state32 = type(state)(*(s.float() for s in state))
    out32, st32 = titan_memory_update_reference(*args32, 4, memory, rule, state32)
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
        out, st = titan_memory_update_reference(*xs[:n_args], 2, memory, rule, type(state)(*xs[n_args:]))
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
    out, st = titan_memory_update_reference(*args, 4, "linear", "dgd", state)
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
