"""CUDA titan_memory_update (csrc/titan_linear.cu, linear memory; csrc/titan_mlp.cu, mlp memory; titans and dgd) vs the reference, the float64
oracle and the Triton backend: forward, final state and every gradient; odd sizes, chunk sizes 8/16/64,
head dims up to 128; half inputs; every output element written; NaN propagation; argument checks naming the
argument; custom ops and torch.compile; dispatch. All need a GPU (skipped on the CPU)."""
from __future__ import annotations

import importlib

import pytest
import torch

from hope_kernels import _ext, backends
from tests.kernels.helpers import (TITAN_CASES, TITAN_MLP_CASES, TITAN_STATE_PASS_GRAD_NAMES, assert_outputs_written,
                                  assert_rel_close, assert_titan_close, assert_titan_mlp_close,
                                  check_titan_compiles_fullgraph, check_titan_mlp_bad_argument,
                                  check_titan_mlp_every_output_is_written, check_titan_mlp_matches_reference,
                                  check_titan_mlp_nan_input_is_not_hidden, check_titan_mlp_public_api,
                                  check_titan_mlp_raw_ops, check_titan_state_pass_opcheck, nan_filled_empty,
                                  titan_inputs, titan_mlp_bad_args, titan_mlp_inputs, titan_mlp_outputs_and_grads,
                                  titan_mlp_state_pass_args, titan_outputs_and_grads, titan_state_pass_args)
from hope_kernels.titan_memory_update import LinearMemoryState, MLPMemoryState, titan_memory_update
from hope_kernels.titan_memory_update.oracle import titan_memory_update_oracle
from hope_kernels.titan_memory_update.reference import titan_memory_update_reference
from hope_kernels.titan_memory_update.state_pass import MLP_GRAD_NAMES

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
TOL_FP32 = 1e-4  # exact fp32 FMA products in the kernels: the error is rounding only
TOL_BF16 = 2e-2


def _cuda():
    mod = importlib.import_module("hope_kernels.titan_memory_update.cuda")
    if not mod.AVAILABLE:
        pytest.fail(f"the CUDA titan_linear kernels did not load: {_ext.why_unavailable('_C_cuda')}")
    return mod


def _inputs(*shape, device=DEVICE, **kw):
    return titan_inputs(*shape, device=device, **kw)


_run = titan_outputs_and_grads
_compare = assert_titan_close
_op_args = titan_state_pass_args


# the shared cases, plus the largest head dims (several value blocks, shared memory above 48 KB)
CASES = [*TITAN_CASES, (1, 2, 300, 64, 64, 64), (1, 2, 300, 128, 128, 64)]


@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}T{}Dk{}Dv{}C{}".format(*c))
def test_cuda_matches_reference_fp32(rule, case):
    B, H, T, Dk, Dv, C = case
    args, state = _inputs(B, H, T, Dk, Dv)
    expected = _run(titan_memory_update_reference, args, state, C, rule)
    actual = _run(_cuda().titan_memory_update_cuda, args, state, C, rule)
    _compare(actual, expected, TOL_FP32, f"{rule} {case}")


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_cuda_matches_float64_oracle(rule):
    args, state = _inputs(2, 2, 23, 9, 11, device="cpu")
    expected = _run(titan_memory_update_oracle, [a.double() for a in args], [s.double() for s in state], 8, rule)
    actual = _run(_cuda().titan_memory_update_cuda, [a.to(DEVICE) for a in args], [s.to(DEVICE) for s in state],
                  8, rule)
    _compare([a.cpu() for a in actual], expected, TOL_FP32, f"{rule} vs oracle")


@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_inputs(rule, dtype):
    args, state = _inputs(2, 3, 300, 64, 64, dtype=dtype)
    expected = _run(titan_memory_update_reference, [a.float() if a.dim() == 4 else a for a in args], state, 64, rule)
    actual = _run(_cuda().titan_memory_update_cuda, args, state, 64, rule)
    assert actual[0].dtype == dtype and actual[3].dtype == dtype and actual[5].dtype == dtype
    _compare(actual, expected, TOL_BF16, f"{rule} {dtype}")


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_zero_initial_state_through_public_api(rule):
    """state=None (zero memory) through titan_memory_update(backend='cuda') vs the reference."""
    _cuda()
    args, _ = _inputs(1, 3, 41, 12, 20, with_state=False)
    out_c, st_c = titan_memory_update(*args, chunk_size=16, rule=rule, backend="cuda")
    out_r, st_r = titan_memory_update(*args, chunk_size=16, rule=rule, backend="reference")
    assert_rel_close("out", out_c, out_r, TOL_FP32)
    assert_rel_close("W_T", st_c.W, st_r.W, TOL_FP32)
    assert_rel_close("S_T", st_c.S, st_r.S, TOL_FP32)


@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("case", [(1, 2, 21, 20, 40, 8), (2, 1, 67, 128, 33, 64), (1, 1, 5, 3, 1, 16)],
                         ids=lambda c: "B{}H{}T{}Dk{}Dv{}C{}".format(*c))
def test_every_output_is_written(rule, case):
    """Every output of both kernels (partials included: Dv 40 = three value blocks of 16, the last one short;
    T not a multiple of C) starts as NaN: an element a kernel forgets to write fails the test."""
    ext = _cuda()
    B, H, T, Dk, Dv, C = case
    args, state = _inputs(B, H, T, Dk, Dv)
    with torch.no_grad():
        op_args = _op_args(args, state, C, rule == "dgd")
    d_out, d_WT, d_ST = torch.randn(B, H, T, Dv, device=DEVICE), torch.randn_like(state[0]), torch.randn_like(state[0])
    with nan_filled_empty(DEVICE):
        out, WT, ST, states = _ext.cuda.titan_linear_fwd(*op_args, True)
        grads = ext.titan_linear_bwd_cuda(d_out, d_WT, d_ST, *op_args)
        torch.cuda.synchronize()
    assert_outputs_written("forward", ["out", "W_T", "S_T", "states"], [out, WT, ST, states])
    assert_outputs_written("backward", TITAN_STATE_PASS_GRAD_NAMES, grads)
    # the stored chunk-start states are those of the state pass: the first is the initial state
    assert torch.equal(states[:, :, 0, 0], op_args[10]) and torch.equal(states[:, :, 0, 1], op_args[11])


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_nan_input_is_not_hidden(rule):
    ext = _cuda()
    args, state = _inputs(1, 1, 12, 16, 16)
    args[2][0, 0, 3, 5] = float("nan")
    out, st = ext.titan_memory_update_cuda(*args, 8, "linear", rule, LinearMemoryState(*state))
    assert torch.isnan(out).any() and torch.isnan(st.W).any()


@pytest.mark.parametrize(
    "bad_arg,make_bad",
    [
        ("q", lambda a: dict(a, q=a["q"].cpu())),
        ("k", lambda a: dict(a, k=a["k"][:, :, :-1].contiguous())),
        ("v", lambda a: dict(a, v=a["v"].double())),
        ("kh", lambda a: dict(a, kh=a["kh"][:, :, :-1].contiguous())),
        ("aqk", lambda a: dict(a, aqk=a["aqk"].transpose(-1, -2))),
        ("tinv", lambda a: dict(a, tinv=None)),
        ("vec", lambda a: dict(a, vec=a["vec"].double())),
        ("end", lambda a: dict(a, end=a["end"][..., :2].contiguous())),
        ("W0", lambda a: dict(a, W0=a["W0"][0])),
        ("S0", lambda a: dict(a, S0=a["S0"].half())),
        ("chunk_size", lambda a: dict(a, chunk_size=65)),
    ],
)
def test_raw_extension_checks_name_the_argument(bad_arg, make_bad):
    _cuda()
    args, state = _inputs(1, 2, 13, 16, 16)
    names = ["q", "k", "kh", "v", "aqk", "akk", "tinv", "aqw", "vec", "end", "W0", "S0", "chunk_size"]
    good = dict(zip(names, _op_args(args, state, 8, True)))
    with pytest.raises(RuntimeError, match=rf"\b{bad_arg}\b"):
        _ext.cuda.titan_linear_fwd(**make_bad(good), store_states=False)
    if bad_arg != "chunk_size":
        with pytest.raises(RuntimeError, match=rf"\b{bad_arg}\b"):
            out, WT, ST, _ = _ext.cuda.titan_linear_fwd(**good, store_states=False)
            _ext.cuda.titan_linear_bwd(torch.zeros_like(out), WT, ST, **make_bad(good))


def test_raw_extension_checks_name_the_gradient_arguments():
    _cuda()
    args, state = _inputs(1, 2, 13, 16, 16)
    op_args = _op_args(args, state, 8, False)
    out, WT, ST, _ = _ext.cuda.titan_linear_fwd(*op_args, False)
    with pytest.raises(RuntimeError, match=r"\bdo\b"):
        _ext.cuda.titan_linear_bwd(out[..., :-1].contiguous(), WT, ST, *op_args)
    with pytest.raises(RuntimeError, match=r"\bdWT\b"):
        _ext.cuda.titan_linear_bwd(out, WT.double(), ST, *op_args)
    with pytest.raises(RuntimeError, match=r"\bdST\b"):
        _ext.cuda.titan_linear_bwd(out, WT, ST.transpose(-1, -2), *op_args)


@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [(2, 3, 150, 64, 48, 32), (1, 2, 77, 96, 80, 16)],
                         ids=lambda c: "B{}H{}T{}Dk{}Dv{}C{}".format(*c))
def test_cuda_matches_triton_backend(rule, dtype, case):
    try:
        tri = importlib.import_module("hope_kernels.titan_memory_update.triton")
    except ImportError as err:
        pytest.skip(f"triton not importable: {err}")
    B, H, T, Dk, Dv, C = case
    args, state = _inputs(B, H, T, Dk, Dv, dtype=dtype)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 Triton products exact (ieee), as the CUDA kernels
    try:
        expected = _run(tri.titan_memory_update_triton, args, state, C, rule)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    actual = _run(_cuda().titan_memory_update_cuda, args, state, C, rule)
    # bf16: both read the same bf16 inputs, compute in fp32 (Triton's state products in TF32) and round
    # out / dq / dk / dv to bf16
    _compare(actual, expected, TOL_FP32 if dtype == torch.float32 else TOL_BF16, f"{rule} {dtype} vs triton")


def test_dispatch_auto_mlp_and_limits(monkeypatch):
    ext = _cuda()
    assert "cuda" in [r.name for r in backends.records("titan_memory_update")]
    # measured on the H100: Triton faster than this port, so auto prefers it and CUDA comes next
    order = [b for b in backends.available_backends("titan_memory_update", DEVICE) if b in ("triton", "cuda")]
    assert order[-1] == "cuda" and order[0] == ("triton" if "triton" in order else "cuda")
    args, _ = _inputs(1, 1, 9, 8, 8)
    E = 12
    st = MLPMemoryState(*(0.2 * torch.randn(1, 1, *shape, device=DEVICE)
                          for shape in [(8, E), (E, 8), (8, E), (E, 8)]))
    ref, _ = titan_memory_update(*args, chunk_size=4, memory="mlp", state=st, backend="reference")
    out, _ = titan_memory_update(*args, chunk_size=4, memory="mlp", state=st, backend="cuda")  # the mlp kernels
    assert_rel_close("mlp via cuda", out, ref, TOL_FP32)
    monkeypatch.setenv("HOPE_BACKEND", "cuda")
    out, _ = titan_memory_update(*args, chunk_size=4, memory="mlp", state=st)
    assert_rel_close("mlp via HOPE_BACKEND=cuda", out, ref, TOL_FP32)
    monkeypatch.delenv("HOPE_BACKEND")
    assert ext.why_not_mlp(128, 512, 64, "dgd", True) is None
    assert "E <= 512" in ext.why_not_mlp(64, 513, 64, "dgd", True)
    # beyond the kernels' limits: named backend refuses, auto runs the next backend
    args, _ = _inputs(1, 1, 20, 8, 8)
    with pytest.raises(ValueError, match="chunk_size <= 64"):
        titan_memory_update(*args, chunk_size=128, backend="cuda")
    out, _ = titan_memory_update(*args, chunk_size=128)
    ref, _ = titan_memory_update(*args, chunk_size=128, backend="reference")
    assert_rel_close("chunk 128 via auto", out, ref, TOL_FP32)
    with pytest.raises((NotImplementedError, ValueError), match="chunk_size <= 64"):
        titan_memory_update(*args, chunk_size=128, memory="mlp", state=st, backend="cuda")
    out, _ = titan_memory_update(*args, chunk_size=128, memory="mlp", state=st)  # auto: the next backend
    ref, _ = titan_memory_update(*args, chunk_size=128, memory="mlp", state=st, backend="reference")
    assert_rel_close("mlp chunk 128 via auto", out, ref, TOL_FP32)


def test_custom_ops_opcheck():
    ext = _cuda()
    args, state = _inputs(1, 2, 13, 16, 20)
    check_titan_state_pass_opcheck(ext.titan_linear_fwd_cuda, torch.ops.hope.titan_linear_fwd_cuda.default,
                                   torch.ops.hope.titan_linear_bwd_cuda.default,
                                   lambda dgd: _op_args(args, state, 8, dgd),
                                   test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_traces_the_op():
    args, state = _inputs(1, 2, 19, 16, 16)
    check_titan_compiles_fullgraph(_cuda().titan_memory_update_cuda, args, state, tol=TOL_FP32)


def test_noncontiguous_inputs_and_second_device_stream():
    """Permuted q/k/v (as the layers pass them) go through the op's .contiguous(); runs on a side stream."""
    ext = _cuda()
    args, state = _inputs(1, 2, 33, 16, 24)
    q, k, v = (a.transpose(1, 2).contiguous().transpose(1, 2) for a in args[:3])
    assert not q.is_contiguous()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out, st = ext.titan_memory_update_cuda(q, k, v, *args[3:], 16, "linear", "dgd", LinearMemoryState(*state))
    torch.cuda.current_stream().wait_stream(s)
    ref, st_r = titan_memory_update_reference(*args, 16, "linear", "dgd", LinearMemoryState(*state))
    assert_rel_close("out", out, ref, TOL_FP32)
    assert_rel_close("W_T", st.W, st_r.W, TOL_FP32)


# --------------------------------------------------------------- mlp memory (csrc/titan_mlp.cu)
# the shared cases, plus the largest sizes the kernels take
MLP_CASES = [*TITAN_MLP_CASES, (1, 2, 300, 64, 128, 64), (1, 1, 130, 128, 512, 64)]


def _mlp_case_id(c):
    return "B{}H{}T{}D{}E{}C{}".format(*c)


def _mlp_inputs(*shape, device=DEVICE, **kw):
    return titan_mlp_inputs(*shape, device=device, **kw)


@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("case", MLP_CASES, ids=_mlp_case_id)
def test_cuda_mlp_matches_reference_fp32(rule, case):
    check_titan_mlp_matches_reference(_cuda().titan_memory_update_cuda, case, rule, TOL_FP32, "cuda mlp",
                                      device=DEVICE)


@pytest.mark.parametrize("dgd", [False, True])
@pytest.mark.parametrize("case", TITAN_MLP_CASES, ids=_mlp_case_id)
def test_cuda_mlp_raw_ops_match_the_state_pass_and_the_cpu_body(dgd, case):
    """Raw forward vs chunk_terms.mlp_state_pass, raw backward vs its float64 autograd (all 15 gradients), and
    both vs the C++ CPU build of the same body (titan_mlp_body.h)."""
    _cuda()
    cot, cpu_args, grads = check_titan_mlp_raw_ops(_ext.cuda, case, dgd, TOL_FP32, device=DEVICE)
    if _ext.cpu is not None and hasattr(_ext.cpu, "titan_mlp_bwd"):
        cpu_grads = _ext.cpu.titan_mlp_bwd(*cot, *cpu_args)
        for name, a, e in zip(MLP_GRAD_NAMES, grads, cpu_grads):
            assert_rel_close(f"cuda vs cpu body {name}", a, e, 1e-5)


@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_mlp_half_inputs(rule, dtype):
    args, state = _mlp_inputs(2, 3, 150, 64, 96, dtype=dtype)
    expected = titan_mlp_outputs_and_grads(titan_memory_update_reference,
                                           [a.float() if a.dim() == 4 else a for a in args], state, 32, rule)
    actual = titan_mlp_outputs_and_grads(_cuda().titan_memory_update_cuda, args, state, 32, rule)
    assert actual[0].dtype == dtype and actual[5].dtype == dtype and actual[7].dtype == dtype
    assert_titan_mlp_close(actual, expected, TOL_BF16, f"cuda mlp {rule} {dtype}")


@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("case", [(1, 2, 21, 20, 40, 8), (2, 1, 67, 128, 33, 64), (1, 1, 5, 3, 1, 16)],
                         ids=_mlp_case_id)
def test_cuda_mlp_every_output_is_written(rule, case):
    _cuda()
    check_titan_mlp_every_output_is_written(_ext.cuda, case, rule, device=DEVICE)


def test_cuda_mlp_nan_input_is_not_hidden():
    check_titan_mlp_nan_input_is_not_hidden(_cuda().titan_memory_update_cuda, (1, 1, 12, 16, 16), device=DEVICE)


@pytest.mark.parametrize(
    "bad_arg,make_bad",
    titan_mlp_bad_args(
        q=lambda a: dict(a, q=a["q"].cpu()),
        v=lambda a: dict(a, v=a["v"].double()),
        gth=lambda a: dict(a, gth=a["gth"].cpu()),
        chunk_size=lambda a: dict(a, chunk_size=65),
    ),
)
def test_cuda_mlp_checks_name_the_argument(bad_arg, make_bad):
    _cuda()
    good, (out, W1T, W2T, S1T, S2T, _) = check_titan_mlp_bad_argument(_ext.cuda, bad_arg, make_bad,
                                                                      (1, 2, 13, 16, 12), device=DEVICE)
    with pytest.raises(RuntimeError, match=r"\bdW2T\b"):
        _ext.cuda.titan_mlp_bwd(out, W1T, W1T, S1T, S2T, **good)


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_cuda_mlp_through_public_api(rule):
    _cuda()
    check_titan_mlp_public_api("cuda", rule, TOL_FP32, device=DEVICE)


def test_cuda_mlp_custom_ops_opcheck():
    ext = _cuda()
    args, state = _mlp_inputs(1, 2, 13, 16, 20)
    check_titan_state_pass_opcheck(ext.titan_mlp_fwd_cuda, torch.ops.hope.titan_mlp_fwd_cuda.default,
                                   torch.ops.hope.titan_mlp_bwd_cuda.default,
                                   lambda dgd: titan_mlp_state_pass_args(args, state, 8, dgd),
                                   test_utils=("test_schema", "test_faketensor"))
