"""self_modifying_titans: the fused op against the reference layer (its loop over generator chunks through
titan_memory_update) and against naive.py, per kernel backend: loss and every parameter gradient, fp32, odd sizes,
T not a multiple of any chunk, both rules, the update bound active on some chunks; the op's flags; custom ops
(opcheck, torch.compile); NaN propagation; argument checks; backend choice and its reasons."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

from hope.layers.self_modifying import SelfModifyingTitans
from hope_kernels.self_modifying_titans import (
    SelfModifyingTitansCall,
    kernel_backend,
    self_modifying_titans,
    self_modifying_titans_naive,
)
from hope_kernels import backends
from hope_kernels._checks import value_checks_off
from hope_kernels.self_modifying_titans.chunk import OP
from hope_kernels.titan_memory_update import MLPMemoryState

RULES = ("titans", "dgd")
HAS_CUDA = torch.cuda.is_available()
HAS_CPP = "cpp" in backends.available_backends(OP, "cpu")
CPP = pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="C++ kernels not built"))
KERNEL_BACKENDS = [CPP, "triton"]
#: relative error bound of the fused fp32 paths against the fp32 reference
REL = 1e-5
#: every metric the layer reports, on either path
METRIC_KEYS = {"memory_update_norm", "generator_update_norm", "memory_lr_mean", "memory_clip_fraction",
               "generator_clip_fraction"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu(), b.detach().cpu()
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN / inf never passes"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _device(backend: str) -> torch.device:
    """Where a backend's kernels run here: Triton on the GPU when there is one (else under its interpreter)."""
    return torch.device("cuda" if backend == "triton" and HAS_CUDA else "cpu")


def _backend_available(backend: str):
    if backend == "triton":
        pytest.importorskip("triton")
        if "triton" not in {r.name for r in backends.records(OP)}:
            pytest.skip("the triton backend did not register")


def _layer_pair(rule: str, backend: str, *, dim=36, heads=3, gen_chunk=5, mem_chunk=11, lr_shift=2.0, **kw):
    """The reference layer and a copy that runs the fused op on ``backend`` (same weights)."""
    torch.manual_seed(0)
    ref = SelfModifyingTitans(dim, heads, gen_chunk_size=gen_chunk, mem_chunk_size=mem_chunk, rule=rule,
                              backend="reference", **kw)
    with torch.no_grad():  # larger learning rates than at init, so the bounds bite on some chunks
        ref.gate_bias[0].add_(lr_shift)
        ref.gate_readout.normal_(0.0, 0.3)
    fused = copy.deepcopy(ref).to(_device(backend))
    fused.backend = backend
    return ref, fused


def _loss_and_grads(layer, x):
    layer.zero_grad(set_to_none=True)
    y, st, metrics = layer(x)
    # the output and both final states carry gradient (the next segment reads them)
    loss = y.square().mean() + sum(s.square().mean() for s in (*st["gen"], *st["mem"]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}, metrics


#: the layer's settings besides its defaults (dgd / titans, 4 generators, normalize_v, read-out before the update,
#: no momentum, no bound): every other flag the fused op computes, the bounds biting on some chunks
LAYER_FLAGS = {
    "defaults": {},
    "flags": dict(adaptive_q=True, momentum=True, mem_readout="after_update", gen_update_clip=0.2,
                  mem_update_clip=0.2),
    "paper-v": dict(normalize_v=False, gen_update_clip=0.2),
}
# (backend, rule, flags, layer sizes B, T, dim, heads, gen chunk, mem chunk): the C++ kernels at a larger odd size,
# the Triton interpreter (slow) at a small one
LAYER_CASES = [pytest.param(CPP.values[0], rule, f, (2, 37, 36, 3, 5, 11), marks=CPP.marks, id=f"cpp-{rule}-{f}")
               for rule in RULES for f in LAYER_FLAGS] + [
    pytest.param("triton", rule, f, (1, 11, 12, 2, 4, 5), id=f"triton-{rule}-{f}")
    for rule, f in (("dgd", "defaults"), ("titans", "defaults"), ("dgd", "flags"))]


@pytest.mark.parametrize("backend, rule, flags, sizes", LAYER_CASES)
def test_layer_matches_reference_layer(backend, rule, flags, sizes):
    """Loss, every parameter gradient and every metric of the layer on the fused op vs the layer's own loop, fp32,
    rel <= 1e-5 (T a multiple of neither chunk)."""
    _backend_available(backend)
    B, T, dim, heads, gen_chunk, mem_chunk = sizes
    ref, fused = _layer_pair(rule, backend, dim=dim, heads=heads, gen_chunk=gen_chunk, mem_chunk=mem_chunk,
                             **LAYER_FLAGS[flags])
    x = torch.randn(B, T, dim, generator=torch.Generator().manual_seed(1))
    loss_r, grads_r, met_r = _loss_and_grads(ref, x)
    loss_f, grads_f, met_f = _loss_and_grads(fused, x.to(_device(backend)))
    assert ref.fused_path is None and fused.fused_path == backend, fused.fused_reason
    assert rel_err(loss_f, loss_r) <= REL
    assert set(grads_f) == set(grads_r)
    for name, g in grads_r.items():
        assert rel_err(grads_f[name], g) <= REL, name
    assert set(met_f) == set(met_r) == METRIC_KEYS
    for key in METRIC_KEYS:
        assert abs(float(met_f[key]) - float(met_r[key])) <= REL * (1 + abs(float(met_r[key]))), key
    if flags == "flags":  # the bounds were active (so the clip fractions above compared something)
        assert 0 < float(met_r["generator_clip_fraction"]) < 1 and float(met_r["memory_clip_fraction"]) > 0


@pytest.mark.parametrize("backend, adaptive_q", [pytest.param(CPP.values[0], a, marks=CPP.marks, id=f"cpp-q{a:d}")
                                                for a in (False, True)] + [pytest.param("triton", False, id="triton")])
def test_layer_local_grad_matches_reference_layer(backend, adaptive_q):
    """``local_grad=True`` (the CMS teach pass) on the fused op: the same outputs as the loop's and the same
    same-token gradient of the input (and of the parameters the output reaches), rel <= 1e-5."""
    _backend_available(backend)
    sizes = dict(dim=12, heads=2, gen_chunk=4, mem_chunk=5) if backend == "triton" else {}
    ref, fused = _layer_pair("dgd", backend, adaptive_q=adaptive_q, **sizes)
    x0 = torch.randn(1, 11, ref.dim, generator=torch.Generator().manual_seed(4))
    results = []
    for layer in (ref, fused):
        layer.zero_grad(set_to_none=True)
        x = x0.to(layer.gate_bias.device).requires_grad_()
        y, _, _ = layer(x, local_grad=True)
        y.square().sum().backward()
        results.append((y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    assert fused.fused_path == backend, fused.fused_reason
    (y_r, dx_r, g_r), (y_f, dx_f, g_f) = results
    assert rel_err(y_f, y_r) <= REL and rel_err(dx_f, dx_r) <= REL
    for name, g in g_r.items():
        assert (g is None) == (g_f[name] is None), name
        if g is not None:
            assert rel_err(g_f[name], g) <= REL, name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_teach_pass_call_takes_the_xq_only_backward(backend, monkeypatch):
    """The layer's teach-pass call (``local_grad=True``, 4 generators) reaches the kernel's backward with q_only set
    (no generator backward, no generator checkpoint); a training call does not."""
    _backend_available(backend)
    kernel = backends.get(OP, backend).kernel
    seen = []
    original = kernel.bwd

    def spy(grads, inputs, saved, settings, q_only=False):
        seen.append((q_only, settings.checkpoint_every, saved[2].shape[2]))
        return original(grads, inputs, saved, settings, q_only)

    monkeypatch.setattr(kernel, "bwd", staticmethod(spy))
    _, layer = _layer_pair("dgd", backend, dim=12, heads=2, gen_chunk=4, mem_chunk=5)
    x = torch.randn(1, 11, 12, generator=torch.Generator().manual_seed(4)).to(_device(backend)).requires_grad_()
    y, _, _ = layer(x, local_grad=True)
    torch.autograd.grad(y.square().sum(), x)
    layer(x)[0].square().sum().backward()
    # (q_only, checkpoint_every, generator checkpoints stored): none for the teach call, every chunk's for training
    assert seen == [(True, 0, 0), (False, 1, 3)]


def _op_inputs(B=2, H=3, T=23, D=6, E=10, G=5, seed=1, dtype=torch.float64, lr_shift=0.0):
    """Random op inputs: W1 small, W2 unit-ish, learning rates large enough that the bounds bite (``lr_shift``
    lowers the eta gate's bias: without a bound these generators' self-generated targets run away)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    xs = [r(B, H, T, D) for _ in range(3)]
    gen = [r(B, G * H, D, E) * 0.3, r(B, G * H, E, D) / D**0.5, r(B, G * H, D, E) * 0.01, r(B, G * H, E, D) * 0.01]
    mem = [r(B, H, D, E) * 0.3, r(B, H, E, D) / D**0.5, r(B, H, D, E) * 0.01, r(B, H, E, D) * 0.01]
    readout = r(2, H, D) * 0.5
    bias = torch.tensor([[0.5 + lr_shift, -0.5 + lr_shift, -1.5 + lr_shift][:H], [-1.0, -2.0, -0.5][:H]],
                        dtype=torch.float64)
    mom = torch.tensor([[0.7, 0.0, 0.9][:H], [0.6, 0.8, 0.0][:H]], dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (*xs, *gen, *mem, readout, bias, mom)]


def _run_op(fn, ins, **kw):
    xq, xk, xv = ins[:3]
    return fn(xq, xk, xv, MLPMemoryState(*ins[3:7]), MLPMemoryState(*ins[7:11]), *ins[11:], **kw)


def _cotangents(y, gen, mem, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (y, *gen, *mem)]


def _pairing(outs, cots):
    return sum((o * c).sum() for o, c in zip(outs, cots))


# (G, normalize_v, readout_before, gen clip, mem clip): the layer's flags today, the paper's defaults, mixtures
FLAG_CASES = [(5, True, False, 0.5, 0.3), (4, False, True, 0.0, 0.0), (4, False, False, 0.5, 0.3),
              (5, False, True, 0.5, 0.0)]
_flag_id = "G{}-v{:d}-before{:d}-clip{}".format
# (backend, rule, flags, sizes B, H, T, D, E): every flag case on the C++ kernels; small ones under the Triton
# interpreter (slow), together covering both rules, G 4 and 5, both read-outs and the bounds, and a hidden width of
# two state tiles (E 40: the memory pass's backward reloads its parked operands in every tile)
OP_CASES = [pytest.param(CPP.values[0], rule, f, (2, 3, 13, 6, 10), marks=CPP.marks, id=f"cpp-{rule}-{_flag_id(*f)}")
            for rule in RULES for f in FLAG_CASES] + [
    pytest.param("triton", "titans", FLAG_CASES[0], (1, 2, 11, 4, 6), id="triton-titans-" + _flag_id(*FLAG_CASES[0])),
    pytest.param("triton", "dgd", FLAG_CASES[1], (1, 2, 11, 4, 6), id="triton-dgd-" + _flag_id(*FLAG_CASES[1])),
    pytest.param("triton", "dgd", (4, False, False, 0.0, 0.3), (1, 1, 16, 4, 40),
                 id="triton-dgd-" + _flag_id(4, False, False, 0.0, 0.3) + "-E40")]


@pytest.mark.parametrize("backend, rule, flags, sizes", OP_CASES)
def test_op_matches_naive(backend, rule, flags, sizes):
    """The op's outputs, final states and the gradient of every input (fp32) vs naive.py in float64, rel <= 1e-5."""
    _backend_available(backend)
    G, normalize_v, readout_before, gclip, mclip = flags
    kw = dict(gen_chunk_size=4, mem_chunk_size=7, gen_update_clip=gclip, mem_update_clip=mclip, rule=rule,
              normalize_v=normalize_v, readout_before=readout_before)
    B, H, T, D, E = sizes
    # learning rates that make the bounds bite on some chunks, lower without a bound: unbounded, these generators'
    # self-generated targets compound, and so does fp32 rounding against float64
    ins64 = _op_inputs(B=B, H=H, T=T, D=D, E=E, G=G, lr_shift=-1.0 if gclip > 0 else -3.0)
    y, gen, mem, eta = self_modifying_titans_naive(*ins64[:3], MLPMemoryState(*ins64[3:7]),
                                                   MLPMemoryState(*ins64[7:11]), *ins64[11:], **kw)
    cots = _cotangents(y, gen, mem)
    grads64 = torch.autograd.grad(_pairing((y, *gen, *mem), cots), ins64)
    ins = [t.detach().float().to(_device(backend)).requires_grad_() for t in ins64]
    # every chunk checkpointed (the C++ forward then keeps every chunk's intermediates for the backward) and every
    # second one (the backward recomputes them)
    for every in (1, 2) if backend == "cpp" else (2,):
        out = _run_op(self_modifying_titans, ins, backend=backend, checkpoint_every=every, **kw)
        for a, b in zip((out.y, *out.gen, *out.mem, out.eta), (y, *gen, *mem, eta)):
            assert rel_err(a.double(), b) <= REL
        grads = torch.autograd.grad(_pairing((out.y, *out.gen, *out.mem), [c.float().to(ins[0].device) for c in cots]),
                                    ins)
        for i, (a, b) in enumerate(zip(grads, grads64)):
            assert rel_err(a.double(), b) <= REL, (every, i)
    if gclip > 0:  # the bound is active on some chunks and not on others
        assert (out.gen_update_scale < 1).any() and (out.gen_update_scale == 1).any()
    if mclip > 0:
        assert (out.mem_update_scale < 1).any()


@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("rule", RULES)
def test_triton_at_the_pilot_tiles_matches_naive(rule, precision, monkeypatch):
    """The pilot's head (D 64, E 128: four state tiles), generator chunk 8 and M_mem chunk 64 (the memory pass's
    backward reloading its parked operands), three M_mem chunks, the memory bound active: outputs, final states and
    every input gradient vs naive.py in float64, rel <= 1e-5; on a GPU also titans and three-pass TF32 products."""
    _backend_available("triton")
    if not HAS_CUDA and (rule, precision) != ("dgd", "ieee"):
        pytest.skip("on the GPU only: the interpreter takes over a minute per case and computes fp32 products "
                    "whatever the precision")
    triton_rec = importlib.import_module("hope_kernels.self_modifying_titans.triton")
    monkeypatch.setitem(triton_rec.TUNING, "precision", precision)
    kw = dict(gen_chunk_size=8, mem_chunk_size=64, gen_update_clip=0.5, mem_update_clip=0.3, rule=rule,
              normalize_v=True, readout_before=False)
    ins64 = _op_inputs(B=1, H=2, T=150, D=64, E=128, G=4, lr_shift=-1.0)
    y, gen, mem, eta = self_modifying_titans_naive(*ins64[:3], MLPMemoryState(*ins64[3:7]),
                                                   MLPMemoryState(*ins64[7:11]), *ins64[11:], **kw)
    cots = _cotangents(y, gen, mem)
    grads64 = torch.autograd.grad(_pairing((y, *gen, *mem), cots), ins64)
    ins = [t.detach().float().to(_device("triton")).requires_grad_() for t in ins64]
    out = _run_op(self_modifying_titans, ins, backend="triton", **kw)
    for a, b in zip((out.y, *out.gen, *out.mem, out.eta), (y, *gen, *mem, eta)):
        assert rel_err(a.double(), b) <= REL
    grads = torch.autograd.grad(_pairing((out.y, *out.gen, *out.mem), [c.float().to(ins[0].device) for c in cots]),
                                ins)
    for i, (a, b) in enumerate(zip(grads, grads64)):
        assert rel_err(a.double(), b) <= REL, i
    assert (out.mem_update_scale < 1).any()


# (backend, rule, readout_before, mem clip): the xq-only backward (the teach pass's) on both read-outs, with and
# without the memory bound (read-out before the update takes no bound), both rules; one case under the interpreter
XQ_ONLY_CASES = [pytest.param(CPP.values[0], rule, before, mclip, marks=CPP.marks,
                              id=f"cpp-{rule}-before{before:d}-clip{mclip}")
                 for rule in RULES for before, mclip in ((True, 0.0), (False, 0.0), (False, 0.3))] + [
    pytest.param("triton", "dgd", True, 0.0, id="triton-dgd-before1-clip0.0")]


@pytest.mark.parametrize("backend, rule, readout_before, mclip", XQ_ONLY_CASES)
def test_xq_only_backward_matches_naive(backend, rule, readout_before, mclip):
    """Only xq requiring a gradient (4 generators: the teach pass's call) takes the backward that skips the
    generators: xq's gradient vs naive.py's in float64, rel <= 1e-5, with every output (y and both final states)
    carrying a cotangent."""
    _backend_available(backend)
    kw = dict(gen_chunk_size=4, mem_chunk_size=7, gen_update_clip=0.5, mem_update_clip=mclip, rule=rule,
              normalize_v=True, readout_before=readout_before)
    small = backend == "triton"
    ins64 = _op_inputs(B=1 if small else 2, H=2 if small else 3, T=11 if small else 13, D=4 if small else 6,
                       E=6 if small else 10, G=4, lr_shift=-1.0)
    y, gen, mem, _ = self_modifying_titans_naive(*ins64[:3], MLPMemoryState(*ins64[3:7]),
                                                 MLPMemoryState(*ins64[7:11]), *ins64[11:], **kw)
    cots = _cotangents(y, gen, mem)
    (dxq64,) = torch.autograd.grad(_pairing((y, *gen, *mem), cots), ins64[:1])
    ins = [t.detach().float().to(_device(backend)) for t in ins64]
    ins[0].requires_grad_()
    out = _run_op(self_modifying_titans, ins, backend=backend, **kw)
    (dxq,) = torch.autograd.grad(_pairing((out.y, *out.gen, *out.mem), [c.float().to(ins[0].device) for c in cots]),
                                 ins[:1])
    assert rel_err(dxq.double(), dxq64) <= REL


@pytest.mark.parametrize("backend", [CPP])
def test_checkpointing_does_not_change_results(backend):
    """The backward recomputes generator segments from checkpoints, or (every chunk checkpointed, C++) loads each
    chunk's intermediates from the forward's store: any spacing gives the same gradients, bit for bit."""
    _backend_available(backend)
    ins = [t.detach().float().requires_grad_() for t in _op_inputs(T=19)]
    kw = dict(gen_chunk_size=3, mem_chunk_size=5, gen_update_clip=0.2, mem_update_clip=0.3, rule="dgd",
              backend=backend)
    results = []
    for every in (1, 3, 100):
        out = _run_op(self_modifying_titans, ins, checkpoint_every=every, **kw)
        cots = _cotangents(out.y, out.gen, out.mem)
        results.append(torch.autograd.grad(_pairing((out.y, *out.gen, *out.mem), cots), ins))
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [CPP])
def test_backward_reads_the_forwards_chunk_store(backend):
    """Every chunk checkpointed, the C++ forward also returns each chunk's intermediates (``store``) and the backward
    loads them instead of running the chunks again: the same backward on an empty store (the recompute) gives the
    same gradients bit for bit, and on a poisoned store NaN ones. Other spacings store nothing."""
    _backend_available(backend)
    from hope_kernels.self_modifying_titans.chunk import LayerSettings, LayerTensors, N_DIFFERENTIABLE, OUTPUT_ROLES

    ins = [t.detach().float() for t in _op_inputs(T=19, lr_shift=-1.0)]
    tensors = LayerTensors(ins[0], ins[1], ins[2], MLPMemoryState(*ins[3:7]), MLPMemoryState(*ins[7:11]),
                           *ins[11:]).as_list()
    S = OUTPUT_ROLES.index("store")
    for every, stored in ((1, True), (2, False)):
        settings = LayerSettings(3, 5, 0.2, 0.3, True, True, False, every).as_args()
        out = torch.ops.hope.self_modifying_titans_fwd(tensors, *settings, backend)
        assert (out[S].numel() > 0) == stored
        grads = [c.float() for c in _cotangents(out[0], out[1:5], out[5:9])]
        assert len(grads) == N_DIFFERENTIABLE
        saved = out[9:11] + out[13:15]

        def bwd(store):
            return torch.ops.hope.self_modifying_titans_bwd(grads, tensors, *saved, store, *settings, backend)

        loaded = bwd(out[S])
        assert all(torch.isfinite(g).all() for g in loaded)
        if stored:
            recomputed = bwd(out[S].new_empty(*out[S].shape[:2], 0))
            assert all(torch.equal(a, b) for a, b in zip(loaded, recomputed))
            poisoned = bwd(torch.full_like(out[S], float("nan")))
            assert all(torch.isnan(g).any() for g in poisoned[:11])


@pytest.mark.parametrize("backend", [CPP])
def test_checkpoint_buffers_are_reused(backend):
    """The C++ forward's checkpoints and store come from a cache of freed buffers: the next forward of the same sizes
    gets the same memory (no fresh pages to fault in), and ``empty_cache`` hands them back."""
    _backend_available(backend)
    from hope_kernels.self_modifying_titans.chunk import LayerSettings, LayerTensors, OUTPUT_ROLES
    from hope_kernels.self_modifying_titans.cpp import empty_cache

    ins = [t.detach().float() for t in _op_inputs(T=19)]
    tensors = LayerTensors(ins[0], ins[1], ins[2], MLPMemoryState(*ins[3:7]), MLPMemoryState(*ins[7:11]),
                           *ins[11:]).as_list()
    settings = LayerSettings(3, 5, 0.2, 0.3, True, True, False, 1).as_args()
    roles = [OUTPUT_ROLES.index(r) for r in ("gen_ckpt", "mem_ckpt", "store")]
    empty_cache()
    out = torch.ops.hope.self_modifying_titans_fwd(tensors, *settings, backend)
    first = [out[i].clone() for i in roles]
    ptrs = {out[i].data_ptr() for i in roles}
    del out
    again = torch.ops.hope.self_modifying_titans_fwd(tensors, *settings, backend)
    assert {again[i].data_ptr() for i in roles} == ptrs
    # bit for bit (a short last chunk fills only the start of its store slot: the rest is whatever the memory held)
    assert all(torch.equal(again[i].view(torch.int32), f.view(torch.int32)) for i, f in zip(roles, first))
    del again
    assert empty_cache() == sum(f.numel() * 4 for f in first)
    assert empty_cache() == 0


_BUILD_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_self_modifying_titans import _cotangents, _op_inputs, _pairing, _run_op
from hope_kernels.self_modifying_titans import self_modifying_titans
ins = [t.detach().float().requires_grad_() for t in _op_inputs(T=19, lr_shift=-1.0)]
out = _run_op(self_modifying_titans, ins, gen_chunk_size=4, mem_chunk_size=7, gen_update_clip=0.5,
              mem_update_clip=0.3, rule="dgd", normalize_v=True, backend="cpp")
outs = (out.y, *out.gen, *out.mem)
grads = torch.autograd.grad(_pairing(outs, _cotangents(*outs[:1], outs[1:5], outs[5:])), ins)
values = [o.detach() for o in outs] + list(grads)
torch.save({{"isa": torch.ops.hope_cpu.self_modifying_titans_isa(), "values": values}}, {path!r})
"""


@pytest.mark.parametrize("backend", [CPP])
def test_cpp_builds_agree(backend, tmp_path):
    """The C++ operators are built twice (baseline ISA, and AVX2 + FMA where the compiler can) and pick one at run
    time; ATEN_CPU_CAPABILITY=default forces the baseline. Both give the same outputs and gradients (rel <= 1e-5)."""
    import os
    import subprocess
    import sys

    results = {}
    for cap in ("default", None):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if cap:
            env["ATEN_CPU_CAPABILITY"] = cap
        path = tmp_path / f"{cap}.pt"
        script = _BUILD_SCRIPT.format(tests=os.path.dirname(__file__), path=str(path))
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
        results[cap] = torch.load(path)
    assert results["default"]["isa"] == "portable"
    assert results[None]["isa"] in ("avx2", "portable")
    for a, b in zip(results[None]["values"], results["default"]["values"]):
        assert rel_err(a, b) <= REL


def test_naive_matches_reference_layer():
    """naive.py (the op's ground truth) computes what the reference layer's loop does: the layer with its memory
    recurrences replaced by naive gives the same loss and gradients."""
    for rule in RULES:
        ref, alt = _layer_pair(rule, "reference")
        x = torch.randn(2, 37, 36, generator=torch.Generator().manual_seed(1))
        loss_r, grads_r, _ = _loss_and_grads(ref, x)
        alt._fused_backend = lambda xq: "reference"  # the op's reference backend: naive under autograd
        loss_a, grads_a, _ = _loss_and_grads(alt, x)
        assert rel_err(loss_a, loss_r) <= REL
        for name, g in grads_r.items():
            assert rel_err(grads_a[name], g) <= REL, name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_propagates(backend):
    """A NaN in one head's input reaches that head's output; the other heads stay finite (no silent zeros)."""
    _backend_available(backend)
    ins = [t.detach().float().to(_device(backend)) for t in _op_inputs(H=2, T=11, D=4, E=6)]
    ins[1][0, 1, 5, 2] = float("nan")
    with value_checks_off():  # the kernels' own propagation (with checks on, the NaN gates raise: test below)
        out = _run_op(self_modifying_titans, ins, gen_chunk_size=4, mem_chunk_size=7, rule="dgd", backend=backend)
    assert torch.isnan(out.y[0, 1, 5:]).any()
    assert torch.isfinite(out.y[1]).all() and torch.isfinite(out.y[0, 0]).all()


def test_nan_gates_raise_under_value_checks():
    """NaN weights make NaN gates: the fused path raises the NonFiniteError the layer's loop raises ("lr contains
    NaN"), so a trainer's guard tells a diverged model the same way on either path."""
    from hope_kernels._checks import NonFiniteError

    if not HAS_CPP:
        pytest.skip("C++ kernels not built")
    layer = SelfModifyingTitans(16, 2, gen_chunk_size=4, mem_chunk_size=8)
    with torch.no_grad():
        layer.gate_readout.fill_(float("nan"))
    for fused in (True, False):
        layer.fused = fused
        with pytest.raises(NonFiniteError, match="lr contains NaN"):
            layer(torch.randn(1, 9, 16))
        assert layer.fused_path == ("cpp" if fused else None)


def test_custom_ops_opcheck():
    """The custom ops' fake, schema and autograd registrations (torch.library.opcheck) on the C++ backend."""
    if not HAS_CPP:
        pytest.skip("C++ kernels not built")
    from hope_kernels.self_modifying_titans.chunk import LayerSettings, LayerTensors

    ins = [t.detach().float() for t in _op_inputs(B=1, H=2, T=9, D=4, E=6, G=4)]
    tensors = LayerTensors(ins[0], ins[1], ins[2], MLPMemoryState(*ins[3:7]), MLPMemoryState(*ins[7:11]), *ins[11:])
    args = [t.requires_grad_() for t in tensors.as_list()]
    settings = LayerSettings(4, 5, 0.2, 0.3, True, False, True, 1).as_args()
    torch.library.opcheck(torch.ops.hope.self_modifying_titans_fwd.default, (args, *settings, "cpp"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compile_fullgraph_traces_the_op():
    """torch.compile(fullgraph=True) traces the layer on the fused op (no graph break) and matches eager."""
    if not HAS_CPP:
        pytest.skip("C++ kernels not built")
    ref, fused = _layer_pair("dgd", "cpp", dim=24, heads=2, gen_chunk=4, mem_chunk=8)
    x = torch.randn(1, 13, 24, generator=torch.Generator().manual_seed(3))

    def step(inp):
        y, st, _ = fused(inp)
        return y.square().mean() + st["mem"].W1.square().mean()

    eager = step(x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(compiled.detach(), eager.detach()) <= REL


def test_bad_arguments_name_the_argument():
    ins = [t.detach().float() for t in _op_inputs()]
    kw = dict(gen_chunk_size=4, mem_chunk_size=7, backend="cpp" if HAS_CPP else "reference")
    with pytest.raises(ValueError, match="xk"):
        _run_op(self_modifying_titans, [ins[0], ins[1][:, :, :5], *ins[2:]], **kw)
    with pytest.raises(ValueError, match="gen.W1"):
        bad = ins[3][:, :4]  # 4 generators of 3 heads: neither 4 H nor 5 H
        _run_op(self_modifying_titans, [*ins[:3], bad, *ins[4:]], **kw)
    with pytest.raises(ValueError, match="momentum"):
        _run_op(self_modifying_titans, [*ins[:13], ins[13] + 2.0], **kw)
    with pytest.raises(ValueError, match="gen_chunk_size"):
        _run_op(self_modifying_titans, ins, **dict(kw, gen_chunk_size=0))
    with pytest.raises(ValueError, match="rule"):
        _run_op(self_modifying_titans, ins, rule="sgd", **kw)
    with pytest.raises(ValueError, match="mem_update_clip"):
        _run_op(self_modifying_titans, ins, mem_update_clip=-1.0, **kw)


def _call(**over):
    base = dict(device=torch.device("cpu"), dtype=torch.float32, B=2, H=3, T=40, D=8, E=16, G=5, rule="dgd",
                gen_chunk_size=8, mem_chunk_size=16, gen_update_clip=0.1, mem_update_clip=0.5, normalize_v=True,
                readout_before=False)
    return SelfModifyingTitansCall(**{**base, **over})


def test_backend_choice_and_reasons():
    """auto takes the C++ kernels on the CPU; declined calls say why, and the layer then runs its own loop."""
    name, _ = kernel_backend(_call())
    assert name == ("cpp" if HAS_CPP else None)
    for over, reason in ((dict(selfmod=False), "selfmod"), (dict(other_flags=("new_flag=1",)), "new_flag"),
                         (dict(dtype=torch.float64), "float32"),
                         (dict(readout_before=True, mem_update_clip=0.5), "mem_update_clip")):
        name, why = kernel_backend(_call(**over))
        assert name is None and reason in why
    assert kernel_backend(_call(), "reference")[0] is None
    if HAS_CPP:
        with pytest.raises(ValueError, match="selfmod"):
            backends.resolve_backend(OP, "cpu", "cpp", _call(selfmod=False))


def test_triton_record_takes_the_chunks_that_fit_an_h100(monkeypatch):
    """The Triton record declines, with the reason, the chunks whose kernels need more shared memory than an H100 has
    (bench/triton_resources.py): the pilot heads' M_mem chunk 64 with a backward (the teach pass's xq-only call runs
    that backward too), not 128; at the D 128 tile chunk 32; and the layer tells a training call from an evaluation
    one."""
    triton_rec = pytest.importorskip("hope_kernels.self_modifying_titans.triton")

    def pilot(**over):
        return _call(**{**dict(device=torch.device("cuda"), D=64, E=128, G=4, gen_update_clip=0.0,
                               mem_update_clip=0.0, readout_before=True, gen_chunk_size=8, mem_chunk_size=64), **over})

    assert triton_rec.supports(pilot()) == (True, "")
    assert triton_rec.supports(pilot(backward=False)) == (True, "")
    ok, why = triton_rec.supports(pilot(mem_chunk_size=128))
    assert not ok and "mem_chunk_size <= 64" in why and "shared memory" in why and "backward" in why
    ok, why = triton_rec.supports(pilot(mem_chunk_size=16, gen_chunk_size=64))
    assert not ok and "gen_chunk_size <= 32" in why
    assert triton_rec.supports(pilot(mem_chunk_size=32, D=96, E=192)) == (True, "")  # the D 128 tile
    ok, why = triton_rec.supports(pilot(D=96, E=192, backward=False))
    assert not ok and "mem_chunk_size <= 32 at D=96" in why
    ok, why = triton_rec.supports(pilot(mem_chunk_size=16, D=129, E=258, backward=False))
    assert not ok and "D <= 128" in why
    # the layer's call says whether a backward follows
    pkg = importlib.import_module("hope_kernels.self_modifying_titans")  # the package (its function shares the name)
    asked, resolve = [], pkg.kernel_backend
    monkeypatch.setattr(pkg, "kernel_backend", lambda call, backend="auto": asked.append(call.backward)
                        or resolve(call, backend))
    layer, x = SelfModifyingTitans(16, 2, gen_chunk_size=4, mem_chunk_size=8), torch.randn(1, 9, 16)
    layer(x)
    with torch.no_grad():
        layer(x)
    layer.requires_grad_(False)
    layer(x)
    assert asked == [True, False, False]


def test_layer_falls_back_to_its_loop_when_declined():
    """Settings the fused op does not compute run the layer's loop, with the same metrics, and say why."""
    layer = SelfModifyingTitans(16, 2, gen_chunk_size=4, mem_chunk_size=8)
    x = torch.randn(1, 9, 16)
    _, _, metrics = layer(x)
    assert layer.fused_path == ("cpp" if HAS_CPP else None)
    assert set(metrics) == METRIC_KEYS
    layer.fused = False
    _, _, metrics = layer(x)
    assert layer.fused_path is None and layer.fused_reason == "fused=False" and set(metrics) == METRIC_KEYS
    static = SelfModifyingTitans(16, 2, gen_chunk_size=4, mem_chunk_size=8, selfmod=False)
    static(x)
    assert static.fused_path is None and "selfmod" in static.fused_reason
    clipped = SelfModifyingTitans(16, 2, gen_chunk_size=4, mem_chunk_size=8, mem_update_clip=0.5)
    clipped(x)
    assert clipped.fused_path is None and "mem_update_clip" in clipped.fused_reason
