"""C++ CPU titan_memory_update (csrc/titan_linear_cpu.cpp, linear memory; csrc/titan_mlp_cpu.cpp, mlp memory; titans
and dgd) vs the reference and the float64 oracle: forward, final state and every gradient; odd sizes, chunk sizes 8/16/64, exact 0 / 1 gates; zero
initial state; NaN propagation; argument checks naming the argument; custom ops and torch.compile; dispatch.
Runs on the CPU (needs hope_kernels._C_cpu built)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hope_kernels import _ext, backends
from tests.kernels.helpers import (TITAN_CASES, TITAN_MLP_CASES, TITAN_STATE_PASS_GRAD_NAMES, assert_rel_close,
                                  assert_titan_close, check_bf16_inputs_are_cast, check_titan_compiles_fullgraph,
                                  check_titan_mlp_bad_argument, check_titan_mlp_every_output_is_written,
                                  check_titan_mlp_matches_reference, check_titan_mlp_nan_input_is_not_hidden,
                                  check_titan_mlp_public_api, check_titan_mlp_raw_ops, check_titan_state_pass_opcheck,
                                  titan_inputs, titan_mlp_bad_args, titan_mlp_inputs, titan_mlp_state_pass_args,
                                  titan_outputs_and_grads, titan_state_pass_args)
from hope_kernels.titan_memory_update import LinearMemoryState, MLPMemoryState, titan_memory_update
from hope_kernels.titan_memory_update.oracle import titan_memory_update_oracle
from hope_kernels.titan_memory_update.reference import titan_memory_update_reference

CASES = TITAN_CASES
_run = titan_outputs_and_grads
_compare = assert_titan_close

TOL_FP32 = 1e-4


@pytest.fixture(scope="module")
def cpp():
    from hope_kernels.titan_memory_update import cpp as mod

    if not mod.AVAILABLE:
        pytest.fail(f"the C++ titan_linear kernels did not load: {_ext.why_unavailable('_C_cpu')}")
    return mod


def _cpu_inputs(*shape, **kw):
    return titan_inputs(*shape, device="cpu", **kw)


@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}T{}Dk{}Dv{}C{}".format(*c))
def test_cpp_matches_reference_fp32(cpp, rule, case):
    B, H, T, Dk, Dv, C = case
    args, state = _cpu_inputs(B, H, T, Dk, Dv)
    expected = _run(titan_memory_update_reference, args, state, C, rule)
    actual = _run(cpp.titan_memory_update_cpp, args, state, C, rule)
    _compare(actual, expected, TOL_FP32, f"cpp {rule} {case}")


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_cpp_matches_float64_oracle(cpp, rule):
    args, state = _cpu_inputs(2, 2, 23, 9, 11)
    expected = _run(titan_memory_update_oracle, [a.double() for a in args], [s.double() for s in state], 8, rule)
    actual = _run(cpp.titan_memory_update_cpp, args, state, 8, rule)
    _compare(actual, expected, TOL_FP32, f"cpp {rule} vs oracle")


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_zero_initial_state_through_public_api(cpp, rule):
    """state=None (zero memory) through titan_memory_update(backend='cpp') vs the reference, with gradients."""
    args, _ = _cpu_inputs(1, 3, 41, 12, 20, with_state=False)
    leaves = [a.clone().requires_grad_(True) for a in args]
    out_c, st_c = titan_memory_update(*leaves, chunk_size=16, rule=rule, backend="cpp")
    out_r, st_r = titan_memory_update(*args, chunk_size=16, rule=rule, backend="reference")
    assert_rel_close("out", out_c.detach(), out_r, TOL_FP32)
    assert_rel_close("W_T", st_c.W.detach(), st_r.W, TOL_FP32)
    assert_rel_close("S_T", st_c.S.detach(), st_r.S, TOL_FP32)


def test_bf16_inputs_are_cast(cpp):
    args, state = _cpu_inputs(1, 2, 20, 8, 8)
    check_bf16_inputs_are_cast(cpp.titan_memory_update_cpp, "linear", args, state)


def test_nan_input_is_not_hidden(cpp):
    args, state = _cpu_inputs(1, 1, 12, 16, 16)
    args[2][0, 0, 3, 5] = float("nan")
    for rule in ("titans", "dgd"):
        out, st = cpp.titan_memory_update_cpp(*args, 8, "linear", rule, LinearMemoryState(*state))
        assert torch.isnan(out).any() and torch.isnan(st.W).any()


_fwd_args = titan_state_pass_args


def test_bad_arguments_name_the_argument(cpp):
    args, state = _cpu_inputs(1, 2, 13, 8, 8)
    fa = list(_fwd_args(args, state, 8, True))
    fwd = _ext.cpu.titan_linear_fwd
    with pytest.raises(RuntimeError, match="vec has shape"):
        fwd(*fa[:8], fa[8][..., :-1].contiguous(), *fa[9:], False)
    with pytest.raises(RuntimeError, match="W0 must be float32"):
        fwd(*fa[:10], fa[10].double(), *fa[11:], False)
    with pytest.raises(RuntimeError, match="tinv is required"):
        fwd(*fa[:6], None, *fa[7:], False)
    with pytest.raises(RuntimeError, match="k must be contiguous"):
        fwd(fa[0], fa[1].transpose(2, 3).contiguous().transpose(2, 3), *fa[2:], False)
    with pytest.raises(RuntimeError, match="chunk_size must be >= 1"):
        fwd(*fa[:12], 0, False)
    out, WT, ST, _ = fwd(*fa, False)
    with pytest.raises(RuntimeError, match="dST has shape"):
        _ext.cpu.titan_linear_bwd(out, WT, ST[..., :-1].contiguous(), *fa)


@pytest.mark.parametrize("dgd", [False, True])
def test_kernel_gradients_match_autograd_of_the_state_pass(cpp, dgd):
    """The raw backward against autograd through chunk_terms.linear_state_pass (every one of its 12 outputs)."""
    from hope_kernels.titan_memory_update.chunk_terms import LinearChunkTerms, linear_state_pass

    args, state = _cpu_inputs(1, 2, 21, 6, 10)
    fa = _fwd_args(args, state, 8, dgd)
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in fa[:12]]
    q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0 = leaves
    terms = LinearChunkTerms(aqk, akk, tinv, aqw, vec, end, kh)
    out, W, S = linear_state_pass(q, k, v, terms, W0, S0, 8)
    g = torch.Generator().manual_seed(3)
    dout, dW, dS = (torch.randn(x.shape, generator=g) for x in (out, W, S))
    ((out * dout).sum() + (W * dW).sum() + (S * dS).sum()).backward()
    got = _ext.cpu.titan_linear_bwd(dout, dW, dS, *fa)
    for name, x, gr in zip(TITAN_STATE_PASS_GRAD_NAMES, leaves, got):
        if x is None:
            assert gr.numel() == 0, name
            continue
        exp = x.grad if x.grad is not None else torch.zeros_like(x)
        assert_rel_close(f"kernel {name}", gr, exp, TOL_FP32)


def test_custom_ops_opcheck(cpp):
    args, state = _cpu_inputs(1, 2, 13, 16, 16)
    check_titan_state_pass_opcheck(cpp.titan_linear_fwd_cpp, torch.ops.hope.titan_linear_fwd_cpp.default,
                                   torch.ops.hope.titan_linear_bwd_cpp.default,
                                   lambda dgd: _fwd_args(args, state, 8, dgd))


def test_compile_fullgraph_traces_the_op(cpp):
    args, state = _cpu_inputs(1, 2, 19, 16, 16)
    check_titan_compiles_fullgraph(cpp.titan_memory_update_cpp, args, state, tol=TOL_FP32)


def test_dispatch_picks_cpp_on_cpu_where_measured_faster(cpp, monkeypatch):
    """Registered for the CPU; auto takes it for every rule in MEASURED_FASTER when gradients are needed, and for
    forward-only calls only on the rules in MEASURED_FASTER_FWD_ONLY (the reference elsewhere)."""
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    seen = []
    real = cpp.titan_memory_update_cpp

    def spy(*a):
        seen.append(a[8])
        return real(*a)

    rec = backends.get("titan_memory_update", "cpp")
    monkeypatch.setitem(backends._RECORDS["titan_memory_update"], "cpp", dataclasses.replace(rec, kernel=spy))
    assert "cpp" in backends.available_backends("titan_memory_update", "cpu")
    assert "cpp" not in backends.available_backends("titan_memory_update", "meta")
    args, _ = _cpu_inputs(1, 1, 9, 8, 8)
    for rule in ("titans", "dgd"):
        leaves = [a.clone().requires_grad_(True) for a in args]
        seen.clear()
        titan_memory_update(*leaves, chunk_size=4, rule=rule)
        assert seen == ([rule] if rule in cpp.MEASURED_FASTER else []), rule
        seen.clear()
        with torch.no_grad():
            titan_memory_update(*args, chunk_size=4, rule=rule)
        assert seen == ([rule] if rule in cpp.MEASURED_FASTER_FWD_ONLY else []), rule
    assert cpp.why_not(300, 300, 128, "dgd", True) is None  # no shape limits
    seen.clear()
    with torch.no_grad():  # an explicit backend="cpp" runs what auto leaves to the reference
        titan_memory_update(*args, chunk_size=4, rule="titans", backend="cpp")
    assert seen == ["titans"]


# --------------------------------------------------------------- mlp memory (csrc/titan_mlp_cpu.cpp)
# The CPU build of the block-phased body (csrc/titan_mlp_body.h) that csrc/titan_mlp.cu shares: these tests check
# the CUDA kernels' arithmetic too.


@pytest.fixture(scope="module")
def cpp_mlp(cpp):
    if not cpp.MLP_AVAILABLE:
        pytest.fail("hope_kernels._C_cpu was built without titan_mlp_fwd / titan_mlp_bwd")
    return cpp


def _mlp_case_id(c):
    return "B{}H{}T{}D{}E{}C{}".format(*c)


@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("case", TITAN_MLP_CASES, ids=_mlp_case_id)
def test_cpp_mlp_matches_reference_fp32(cpp_mlp, rule, case):
    check_titan_mlp_matches_reference(cpp_mlp.titan_memory_update_cpp, case, rule, TOL_FP32, "cpp mlp")


@pytest.mark.parametrize("dgd", [False, True])
@pytest.mark.parametrize("case", TITAN_MLP_CASES, ids=_mlp_case_id)
def test_cpp_mlp_raw_ops_match_the_state_pass(cpp_mlp, dgd, case):
    """Raw forward vs chunk_terms.mlp_state_pass; raw backward vs its float64 autograd (all 15 gradients; padded
    rows zero, the dgd-only ones empty for titans)."""
    check_titan_mlp_raw_ops(_ext.cpu, case, dgd, TOL_FP32)


@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("case", [(1, 2, 21, 6, 9, 8), (1, 1, 5, 3, 1, 16)], ids=_mlp_case_id)
def test_cpp_mlp_every_output_is_written(cpp_mlp, rule, case):
    check_titan_mlp_every_output_is_written(_ext.cpu, case, rule)


def test_cpp_mlp_nan_input_is_not_hidden(cpp_mlp):
    check_titan_mlp_nan_input_is_not_hidden(cpp_mlp.titan_memory_update_cpp, (1, 1, 12, 8, 8))


@pytest.mark.parametrize(
    "bad_arg,make_bad",
    titan_mlp_bad_args(
        q=lambda a: dict(a, q=a["q"].double()),
        v=lambda a: dict(a, v=a["v"].transpose(2, 3).contiguous().transpose(2, 3)),
        gth=lambda a: dict(a, gth=a["gth"][..., :-1].contiguous()),
        chunk_size=lambda a: dict(a, chunk_size=0),
    ),
)
def test_cpp_mlp_checks_name_the_argument(cpp_mlp, bad_arg, make_bad):
    check_titan_mlp_bad_argument(_ext.cpu, bad_arg, make_bad, (1, 2, 13, 8, 6))


def test_cpp_mlp_checks_name_the_gradient_arguments(cpp_mlp):
    args, state = titan_mlp_inputs(1, 2, 13, 8, 6)
    op_args = titan_mlp_state_pass_args(args, state, 8, False)
    out, W1T, W2T, S1T, S2T, _ = _ext.cpu.titan_mlp_fwd(*op_args, False)
    bwd = _ext.cpu.titan_mlp_bwd
    with pytest.raises(RuntimeError, match=r"\bdo\b"):
        bwd(out[..., :-1].contiguous(), W1T, W2T, S1T, S2T, *op_args)
    with pytest.raises(RuntimeError, match=r"\bdW1T\b"):
        bwd(out, W1T.double(), W2T, S1T, S2T, *op_args)
    with pytest.raises(RuntimeError, match=r"\bdW2T\b"):
        bwd(out, W1T, W1T, S1T, S2T, *op_args)
    with pytest.raises(RuntimeError, match=r"\bdS1T\b"):
        bwd(out, W1T, W2T, S1T[..., :-1].contiguous(), S2T, *op_args)
    with pytest.raises(RuntimeError, match=r"\bdS2T\b"):
        bwd(out, W1T, W2T, S1T, S2T.transpose(-1, -2), *op_args)


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_cpp_mlp_through_public_api(cpp_mlp, rule):
    check_titan_mlp_public_api("cpp", rule, TOL_FP32)


def test_cpp_mlp_bf16_inputs_are_cast(cpp_mlp):
    args, state = titan_mlp_inputs(1, 2, 20, 8, 12)
    check_bf16_inputs_are_cast(cpp_mlp.titan_memory_update_cpp, "mlp", args, state)


def test_cpp_mlp_custom_ops_opcheck(cpp_mlp):
    args, state = titan_mlp_inputs(1, 2, 13, 8, 12)
    check_titan_state_pass_opcheck(cpp_mlp.titan_mlp_fwd_cpp, torch.ops.hope.titan_mlp_fwd_cpp.default,
                                   torch.ops.hope.titan_mlp_bwd_cpp.default,
                                   lambda dgd: titan_mlp_state_pass_args(args, state, 8, dgd))


def test_cpp_mlp_dispatch_where_measured_faster(cpp_mlp, monkeypatch):
    """backend='auto' takes the C++ mlp kernels exactly for the (rule, backward) pairs in MLP_MEASURED_FASTER and
    the reference elsewhere; an explicit backend='cpp' always runs them."""
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    seen = []
    real = cpp_mlp.titan_memory_update_cpp

    def spy(*a):
        seen.append((a[8], a[7]))
        return real(*a)

    rec = backends.get("titan_memory_update", "cpp")
    monkeypatch.setitem(backends._RECORDS["titan_memory_update"], "cpp", dataclasses.replace(rec, kernel=spy))
    args, state = titan_mlp_inputs(1, 1, 9, 8, 8)
    for rule in ("titans", "dgd"):
        for backward in (True, False):
            leaves = [a.clone().requires_grad_(backward) for a in args]
            seen.clear()
            with torch.set_grad_enabled(backward):
                titan_memory_update(*leaves, chunk_size=4, memory="mlp", rule=rule, state=MLPMemoryState(*state))
            assert seen == ([(rule, "mlp")] if (rule, backward) in cpp_mlp.MLP_MEASURED_FASTER else []), (rule, backward)
    assert cpp_mlp.why_not_mlp(300, 1000, 128, "dgd", True) is None  # no shape limits
    seen.clear()
    with torch.no_grad():
        titan_memory_update(*args, chunk_size=4, memory="mlp", rule="titans", state=MLPMemoryState(*state),
                            backend="cpp")
    assert seen == [("titans", "mlp")]
