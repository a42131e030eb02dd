"""Triton titan_memory_update (linear memory, titans and dgd) vs the reference and the float64 oracle:
forward, final state and every gradient; odd sizes; chunk sizes 8/16/64; NaN poisoning; custom op and
torch.compile. On the CPU these run under TRITON_INTERPRET=1 (tests/conftest.py) in fp32; bf16 on GPU."""
from __future__ import annotations

import importlib

import pytest
import torch

from hope_kernels import backends
from tests.kernels.helpers import (TITAN_CASES, TITAN_OUTPUT_NAMES, assert_rel_close, assert_titan_close,
                                  check_titan_compiles_fullgraph, poison_, titan_inputs, titan_outputs_and_grads,
                                  titan_state_pass_args, triton_interpret_enabled)
from hope_kernels.titan_memory_update import LinearMemoryState, MLPMemoryState, titan_memory_update
from hope_kernels.titan_memory_update.chunk_terms import linear_chunk_terms, linear_state_pass
from hope_kernels.titan_memory_update.oracle import titan_memory_update_oracle
from hope_kernels.titan_memory_update.reference import titan_memory_update_reference

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not (HAS_CUDA or triton_interpret_enabled()), reason="triton needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if HAS_CUDA else "cpu"
# exact fp32 (ieee) products: the error is rounding only, far below the 5e-3 bound
TOL_FP32 = 1e-4
TOL_BF16 = 2e-2


def _tri():
    return importlib.import_module("hope_kernels.titan_memory_update.triton")


def _inputs(*shape, device=DEVICE, **kw):
    return titan_inputs(*shape, device=device, **kw)


_run = titan_outputs_and_grads
_compare = assert_titan_close


CASES = TITAN_CASES


@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}T{}Dk{}Dv{}C{}".format(*c))
def test_triton_matches_reference_fp32(rule, case):
    B, H, T, Dk, Dv, C = case
    args, state = _inputs(B, H, T, Dk, Dv)
    expected = _run(titan_memory_update_reference, args, state, C, rule)
    actual = _run(_tri().titan_memory_update_triton, args, state, C, rule)
    _compare(actual, expected, TOL_FP32, f"{rule} {case}")


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_triton_matches_float64_oracle(rule):
    args, state = _inputs(2, 2, 23, 9, 11, device="cpu")
    expected = _run(titan_memory_update_oracle, [a.double() for a in args], [s.double() for s in state], 8, rule)
    args_d = [a.to(DEVICE) for a in args]
    actual = _run(_tri().titan_memory_update_triton, args_d, [s.to(DEVICE) for s in state], 8, rule)
    _compare([a.cpu() for a in actual], expected, TOL_FP32, f"{rule} vs oracle")


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_zero_initial_state_through_public_api(rule):
    """state=None (zero memory) through titan_memory_update(backend='triton') vs the reference."""
    args, _ = _inputs(1, 3, 41, 12, 20, with_state=False)
    out_t, st_t = titan_memory_update(*args, chunk_size=16, rule=rule, backend="triton")
    out_r, st_r = titan_memory_update(*args, chunk_size=16, rule=rule, backend="reference")
    assert_rel_close("out", out_t, out_r, TOL_FP32)
    assert_rel_close("W_T", st_t.W, st_r.W, TOL_FP32)
    assert_rel_close("S_T", st_t.S, st_r.S, TOL_FP32)


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_chunk_terms_state_pass_matches_reference_float64(rule):
    """The kernel split itself (chunk terms + the state pass the kernel implements) is exact in float64."""
    args, state = _inputs(2, 2, 45, 6, 9, dtype=torch.float64, device="cpu")
    args = [a.double() for a in args]
    state = [s.double() for s in state]
    for C in (4, 16, 64):
        terms = linear_chunk_terms(*args[:2], *args[3:], C, rule == "dgd")
        out, W, S = linear_state_pass(args[0], args[1], args[2], terms, *state, C)
        ref_out, ref_st = titan_memory_update_reference(*args, C, "linear", rule, LinearMemoryState(*state))
        assert_rel_close("out", out, ref_out, 1e-12)
        assert_rel_close("W", W, ref_st.W, 1e-12)
        assert_rel_close("S", S, ref_st.S, 1e-12)


@pytest.mark.parametrize("rule", ["titans", "dgd"])
def test_every_output_is_written(rule, monkeypatch):
    """Outputs and gradient buffers start as NaN: an element a kernel forgets to write fails the test."""
    tri = _tri()

    def poisoned(*shape, device, dtype):
        return poison_(torch.empty(*shape, device=device, dtype=dtype))

    monkeypatch.setattr(tri, "_empty", poisoned)
    args, state = _inputs(1, 2, 21, 20, 40)  # Dv 40: two value blocks of 32 would leave a gap if mis-tiled
    actual = _run(tri.titan_memory_update_triton, args, state, 8, rule)
    for name, t in zip(TITAN_OUTPUT_NAMES, actual):
        assert torch.isfinite(t).all(), f"{name} has non-finite entries: a kernel left part of it unwritten"


def test_nan_input_is_not_hidden():
    args, state = _inputs(1, 1, 12, 16, 16)
    args[2][0, 0, 3, 5] = float("nan")
    out, st = _tri().titan_memory_update_triton(*args, 8, "linear", "titans", LinearMemoryState(*state))
    assert torch.isnan(out).any() and torch.isnan(st.W).any()


def test_dispatch_registers_triton():
    """(The mlp memory's dispatch is tested in test_titan_memory_update_triton_mlp.py.)"""
    assert "triton" in [r.name for r in backends.records("titan_memory_update")]
    args, state = _inputs(1, 1, 9, 8, 8)
    out, _ = titan_memory_update(*args, chunk_size=4, state=LinearMemoryState(*state), backend="triton")
    ref, _ = titan_memory_update(*args, chunk_size=4, state=LinearMemoryState(*state), backend="reference")
    assert_rel_close("linear via triton", out, ref, TOL_FP32)


def test_dgd_backward_at_wide_keys_and_large_chunks():
    """dgd with Dk > 64 and chunk 64 once needed more shared memory in the backward than an H100 has (measured);
    it now runs value blocks of 16 (tests/kernels/test_triton_resources.py checks the fit). Dk > 128 is refused
    with a clear error."""
    args, state = _inputs(1, 1, 70, 72, 20)
    expected = _run(titan_memory_update_reference, args, state, 64, "dgd")
    actual = _run(_tri().titan_memory_update_triton, args, state, 64, "dgd")
    _compare(actual, expected, TOL_FP32, "dgd Dk 72 C 64")
    assert _tri()._blocks(64, 72, 20, backward=True, dgd=True)[2] == 16
    args, state = _inputs(1, 1, 5, 136, 16)
    with pytest.raises(ValueError, match="Dk <= 128"):
        titan_memory_update(*args, chunk_size=4, state=LinearMemoryState(*state), backend="triton")


def test_custom_ops_opcheck():
    tri = _tri()
    args, state = _inputs(1, 2, 13, 16, 16)
    q, k, v, lr, mo, de = args
    for dgd in (False, True):
        fwd_args = titan_state_pass_args(args, state, 8, dgd)
        torch.library.opcheck(torch.ops.hope.titan_linear_fwd.default, fwd_args,
                              test_utils=("test_schema", "test_faketensor"))
        out, WT, ST = tri.titan_linear_fwd(*fwd_args)
        bwd_args = (torch.randn_like(out), torch.randn_like(WT), torch.randn_like(ST), *fwd_args)
        torch.library.opcheck(torch.ops.hope.titan_linear_bwd.default, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_traces_the_op():
    args, state = _inputs(1, 2, 19, 16, 16)
    check_titan_compiles_fullgraph(_tri().titan_memory_update_triton, args, state, tol=TOL_FP32)


# ---------------------------------------------------------------- GPU only: bf16 and the benchmark shapes
@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_inputs_gpu(rule, dtype):
    args, state = _inputs(2, 3, 300, 64, 64, dtype=dtype)
    expected = _run(titan_memory_update_reference, [a.float() if a.dim() == 4 else a for a in args], state, 64, rule)
    actual = _run(_tri().titan_memory_update_triton, args, state, 64, rule)
    _compare(actual, expected, TOL_BF16, f"{rule} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["titans", "dgd"])
@pytest.mark.parametrize("shape", [(2, 4, 1000, 64, 64, 64), (1, 2, 2100, 128, 128, 64), (1, 2, 257, 96, 80, 16)])
def test_triton_fp32_gpu_head_dims(rule, shape):
    B, H, T, Dk, Dv, C = shape
    args, state = _inputs(B, H, T, Dk, Dv)
    expected = _run(titan_memory_update_reference, args, state, C, rule)
    actual = _run(_tri().titan_memory_update_triton, args, state, C, rule)
    _compare(actual, expected, 5e-3, f"{rule} {shape}")
