"""Triton titan_memory_update for the mlp memory (M(x) = x + W1 gelu(W2 x)), rules titans and dgd: the raw state
pass vs its spec (chunk_terms.mlp_state_pass) and the spec's float64 autograd, the whole op vs the reference and the
float64 oracle (forward, final state and every gradient), odd T / D / E, chunk sizes 8/16/64, NaN poisoning, custom
ops and torch.compile. On the CPU these run under TRITON_INTERPRET=1 (tests/conftest.py) in fp32; bf16 on GPU."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.kernels.helpers import (TITAN_MLP_CASES, TITAN_MLP_OUTPUT_NAMES, assert_rel_close, assert_titan_mlp_close,
                                  poison_, titan_mlp_inputs, titan_mlp_outputs_and_grads, titan_mlp_state_pass_args,
                                  titan_mlp_state_pass_grads, triton_interpret_enabled)
from hope_kernels.titan_memory_update import MLPMemoryState, titan_memory_update
from hope_kernels.titan_memory_update.chunk_terms import LinearChunkTerms, mlp_state_pass
from hope_kernels.titan_memory_update.oracle import titan_memory_update_oracle
from hope_kernels.titan_memory_update.reference import titan_memory_update_reference
from hope_kernels.titan_memory_update.state_pass import MLP_GRAD_NAMES

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not (HAS_CUDA or triton_interpret_enabled()), reason="triton needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL_FP32 = 1e-4  # exact fp32 (ieee) products: rounding only, far below the 5e-3
TOL_BF16 = 2e-2
RULES = ["titans", "dgd"]


def _tri():
    return importlib.import_module("hope_kernels.titan_memory_update.triton")


def _inputs(*shape, device=DEVICE, **kw):
    return titan_mlp_inputs(*shape, device=device, **kw)


def _largest_chunk(D, rule):
    """The largest chunk the kernels take at head dim D with a backward (triton.MLP_MAX_CHUNK)."""
    import triton
    return _tri().MLP_MAX_CHUNK[(max(64, triton.next_power_of_2(D)), rule, True)]


def _case_id(c):
    return "B{}H{}T{}D{}E{}C{}".format(*c)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", TITAN_MLP_CASES, ids=_case_id)
def test_triton_mlp_matches_reference_fp32(rule, case):
    B, H, T, D, E, C = case
    C = min(C, _largest_chunk(D, rule))  # dgd's backward takes chunks <= 32 (shared memory on the GPU)
    args, state = _inputs(B, H, T, D, E)
    expected = titan_mlp_outputs_and_grads(titan_memory_update_reference, args, state, C, rule)
    actual = titan_mlp_outputs_and_grads(_tri().titan_memory_update_triton, args, state, C, rule)
    assert_titan_mlp_close(actual, expected, TOL_FP32, f"{rule} {case}")


@pytest.mark.parametrize("rule", RULES)
def test_triton_mlp_matches_float64_oracle(rule):
    args, state = _inputs(1, 2, 23, 9, 19, device="cpu")
    expected = titan_mlp_outputs_and_grads(titan_memory_update_oracle, [a.double() for a in args],
                                           [s.double() for s in state], 8, rule)
    actual = titan_mlp_outputs_and_grads(_tri().titan_memory_update_triton, [a.to(DEVICE) for a in args],
                                         [s.to(DEVICE) for s in state], 8, rule)
    assert_titan_mlp_close([a.cpu() for a in actual], expected, TOL_FP32, f"{rule} vs oracle")


@pytest.mark.parametrize("fused", [True, False], ids=["fused-forward", "update-then-parallel-readout"])
@pytest.mark.parametrize("rule", RULES)
def test_raw_state_pass_matches_its_spec(rule, fused, monkeypatch):
    """The raw ops against chunk_terms.mlp_state_pass (forward, by both forward paths) and its float64 autograd
    (all 15 gradients)."""
    tri = _tri()
    monkeypatch.setitem(tri.TUNING, "mlp_fused_fwd", fused)
    args, state = _inputs(2, 1, 45, 20, 36)
    op_args = titan_mlp_state_pass_args(args, state, 16, rule == "dgd")
    out = tri.titan_mlp_fwd(*op_args)
    q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, *st = op_args[:-1]
    spec = mlp_state_pass(q, k, v, LinearChunkTerms(aqk, akk, tinv, aqw, vec, end, kh, gth), *st, 16)
    for name, a, e in zip(("out", "W1_T", "W2_T", "S1_T", "S2_T"), out, spec):
        assert_rel_close(name, a, e, TOL_FP32)
    cot = [torch.randn_like(x) for x in out]
    grads = tri.titan_mlp_bwd(*cot, *op_args)
    expected = titan_mlp_state_pass_grads(cot, *op_args)
    for name, a, e in zip(MLP_GRAD_NAMES, grads, expected):
        if e is None:
            assert a.numel() == 0, f"{name}: expected an empty tensor when not dgd"
        else:
            assert_rel_close(name, a, e, TOL_FP32)


@pytest.mark.parametrize("rule", RULES)
def test_every_output_is_written(rule, monkeypatch):
    """Outputs and gradient buffers start as NaN: an element a kernel forgets to write fails the test."""
    tri = _tri()
    monkeypatch.setattr(tri, "_empty", lambda *shape, device, dtype: poison_(torch.empty(*shape, device=device,
                                                                                         dtype=dtype)))
    args, state = _inputs(1, 2, 21, 20, 40)  # E 40: a partial last tile of 32 hidden units
    actual = titan_mlp_outputs_and_grads(tri.titan_memory_update_triton, args, state, 8, rule)
    for name, t in zip(TITAN_MLP_OUTPUT_NAMES, actual):
        assert torch.isfinite(t).all(), f"{name} has non-finite entries: a kernel left part of it unwritten"


def test_nan_input_is_not_hidden():
    args, state = _inputs(1, 1, 12, 16, 16)
    args[2][0, 0, 3, 5] = float("nan")
    out, st = _tri().titan_memory_update_triton(*args, 8, "mlp", "titans", MLPMemoryState(*state))
    assert torch.isnan(out).any() and torch.isnan(st.W1).any()


def test_dispatch_picks_triton_for_mlp_and_falls_back_beyond_its_limits(monkeypatch):
    """backend='triton' runs the mlp memory; beyond its head-dim limit it refuses with a clear error, and
    backend='auto' (or $HOPE_BACKEND=triton) runs such calls on the next backend."""
    args, state = _inputs(1, 1, 9, 8, 12)
    out, _ = titan_memory_update(*args, chunk_size=4, memory="mlp", state=MLPMemoryState(*state), backend="triton")
    ref, _ = titan_memory_update(*args, chunk_size=4, memory="mlp", state=MLPMemoryState(*state),
                                 backend="reference")
    assert_rel_close("mlp via triton", out, ref, TOL_FP32)
    tri = _tri()
    assert tri.why_not_mlp(136, 64, 16, "titans", True) is not None
    assert tri.why_not_mlp(64, 1000, 64, "titans", True) is None  # any E: it is tiled
    # dgd's backward at D 64 takes chunks up to 32 (a 64-token chunk needs more shared memory than an H100 has)
    assert tri.why_not_mlp(64, 128, 32, "dgd", True) is None and tri.why_not_mlp(64, 128, 64, "dgd", False) is None
    assert "chunk_size <= 32" in tri.why_not_mlp(64, 128, 64, "dgd", True)
    assert tri.why_not_mlp(100, 200, 16, "dgd", True) is None and tri.why_not_mlp(100, 200, 32, "dgd", True)
    leaves = [t.clone().requires_grad_(True) for t in args]
    with pytest.raises(ValueError, match="chunk_size <= 32"):
        titan_memory_update(*leaves, chunk_size=64, memory="mlp", rule="dgd", state=MLPMemoryState(*state),
                            backend="triton")
    args, state = _inputs(1, 1, 5, 136, 16)
    with pytest.raises(ValueError, match="D <= 128"):
        titan_memory_update(*args, chunk_size=4, memory="mlp", state=MLPMemoryState(*state), backend="triton")
    monkeypatch.setenv("HOPE_BACKEND", "triton")
    out, _ = titan_memory_update(*args, chunk_size=4, memory="mlp", state=MLPMemoryState(*state))
    ref, _ = titan_memory_update(*args, chunk_size=4, memory="mlp", state=MLPMemoryState(*state),
                                 backend="reference")
    assert_rel_close("mlp D 136 via the fallback", out, ref, 1e-6)


def test_custom_ops_opcheck():
    tri = _tri()
    args, state = _inputs(1, 2, 13, 16, 20)
    for dgd in (False, True):
        fwd_args = titan_mlp_state_pass_args(args, state, 8, dgd)
        torch.library.opcheck(torch.ops.hope.titan_mlp_fwd.default, fwd_args,
                              test_utils=("test_schema", "test_faketensor"))
        outs = tri.titan_mlp_fwd(*fwd_args)
        bwd_args = (*(torch.randn_like(x) for x in outs), *fwd_args)
        torch.library.opcheck(torch.ops.hope.titan_mlp_bwd.default, bwd_args,
                              test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph_traces_the_op():
    """torch.compile(fullgraph=True) through the Triton mlp memory: loss and every gradient match the reference."""
    args, state = _inputs(1, 2, 19, 16, 24)

    def step(fn, q, k, v, lr, mo, de, *st):
        out, final = fn(q, k, v, lr, mo, de, 8, "mlp", "dgd", MLPMemoryState(*st))
        return out.square().sum() + final.W1.sum() + final.W2.sum()

    fn = _tri().titan_memory_update_triton
    torch._dynamo.reset()
    compiled = torch.compile(lambda *xs: step(fn, *xs), fullgraph=True, backend="aot_eager")
    xs = [t.clone().requires_grad_(True) for t in args + state]
    loss = compiled(*xs)
    loss.backward()
    xr = [t.clone().requires_grad_(True) for t in args + state]
    ref = step(titan_memory_update_reference, *xr)
    ref.backward()
    assert_rel_close("compiled loss", loss.detach(), ref.detach(), TOL_FP32)
    for name, a, b in zip(("q", "k", "v", "lr", "momentum", "decay", "W1", "W2", "S1", "S2"), xs, xr):
        assert_rel_close(f"compiled grad {name}", a.grad, b.grad, TOL_FP32)


# ---------------------------------------------------------------- GPU only: bf16 and model-sized shapes
@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_mlp_half_inputs_gpu(rule, dtype):
    args, state = _inputs(2, 3, 300, 64, 128, dtype=dtype)
    full = [a.float() if a.dim() == 4 else a for a in args]
    C = _largest_chunk(64, rule)
    expected = titan_mlp_outputs_and_grads(titan_memory_update_reference, full, state, C, rule)
    actual = titan_mlp_outputs_and_grads(_tri().titan_memory_update_triton, args, state, C, rule)
    assert_titan_mlp_close(actual, expected, TOL_BF16, f"{rule} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", [(2, 4, 1000, 64, 128), (1, 2, 700, 128, 256), (1, 2, 257, 96, 200)])
def test_triton_mlp_fp32_gpu_head_dims(rule, shape):
    B, H, T, D, E = shape
    C = _largest_chunk(D, rule)
    args, state = _inputs(B, H, T, D, E)
    expected = titan_mlp_outputs_and_grads(titan_memory_update_reference, args, state, C, rule)
    actual = titan_mlp_outputs_and_grads(_tri().titan_memory_update_triton, args, state, C, rule)
    assert_titan_mlp_close(actual, expected, 5e-3, f"{rule} {shape} C{C}")


@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
def test_triton_mlp_forward_only_gpu(rule):
    """Forward-only calls take the larger forward chunk limit (and at D 128 the split forward: update, then the
    parallel read-out)."""
    for D in (64, 128):
        import triton
        C = _tri().MLP_MAX_CHUNK[(max(64, triton.next_power_of_2(D)), rule, False)]
        args, state = _inputs(1, 4, 333, D, 2 * D)
        with torch.no_grad():
            out, st = _tri().titan_memory_update_triton(*args, C, "mlp", rule, MLPMemoryState(*state))
        ref, st_r = titan_memory_update_reference(*args, C, "mlp", rule, MLPMemoryState(*state))
        assert_rel_close(f"out D{D}", out, ref, 5e-3)
        assert_rel_close(f"W1 D{D}", st.W1, st_r.W1, 5e-3)
