"""cms_update: the reference against an independent autograd computation, then every backend against it."""
from __future__ import annotations

import pytest
import torch

from hope_kernels import _ext, backends
from hope_kernels.cms_update import OP, CMSParams, cms_forward, cms_update
from tests.kernels.helpers import assert_rel_close, triton_interpret_enabled

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
# (B, C, D, E): C = 1, 3 (a chunk smaller than a tile), 64, 100 (not a tile multiple); D, E odd or E = 4D
SIZES = [(2, 1, 16, 64), (2, 3, 33, 65), (1, 64, 24, 96), (2, 100, 40, 160)]


def _inputs(B, C, D, E, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    params = CMSParams(rand(B, E, D, scale=D**-0.5), rand(B, D, E, scale=E**-0.5))
    momenta = CMSParams(rand(B, E, D, scale=0.1), rand(B, D, E, scale=0.1))
    return params, momenta, rand(B, C, D), rand(B, C, D)


def _vjp_grads(params, x, delta):
    """g = sum_t J_W f(x_t)^T delta_t by torch.func.vjp of the level's forward w.r.t. its weights (float64)."""
    def f(w1, w2):
        return cms_forward(w1, w2, x.double())

    _, vjp = torch.func.vjp(f, params.w1.double(), params.w2.double())
    return vjp(delta.double())


def _all_outputs(out):
    p, m, s = out
    return {"w1": p.w1, "w2": p.w2, "m1": m.w1, "m2": m.w2,
            "w1_update_norm": s.w1_update_norm, "w2_update_norm": s.w2_update_norm}


def _backends(device):
    names = list(backends.available_backends(OP, device))
    if device.type == "cpu" and triton_interpret_enabled() and "triton" not in names:
        names.append("triton")
    return [b for b in names if b != "reference"]


# ---------------------------------------------------------------- reference semantics
@pytest.mark.parametrize("precond", [False, True], ids=["plain", "precond"])
@pytest.mark.parametrize("size", SIZES[:3], ids=lambda s: "x".join(map(str, s)))
def test_reference_matches_vjp_momentum_and_precond(size, precond):
    params, momenta, x, delta = _inputs(*size, device="cpu")
    lr, beta = 0.05, 0.9
    g1, g2 = _vjp_grads(params, x, delta)
    m1 = beta * momenta.w1.double() + g1
    m2 = beta * momenta.w2.double() + g2
    w1 = params.w1.double()
    if precond:  # NL eq. 27-29: W1 (I - lr xbar xbar^T) - lr m, xbar the mean normalised input
        xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
        xbar = xn.mean(1)
        eye = torch.eye(w1.shape[2], dtype=torch.float64)
        w1_new = w1 @ (eye - lr * xbar[:, :, None] * xbar[:, None, :]) - lr * m1
    else:
        w1_new = w1 - lr * m1
    w2_new = params.w2.double() - lr * m2
    out = _all_outputs(cms_update(params, momenta, x, delta, lr=lr, beta=beta, precond=precond, backend="reference"))
    expected = {"w1": w1_new, "w2": w2_new, "m1": m1, "m2": m2,
                "w1_update_norm": (w1_new - w1).flatten(1).norm(dim=1),
                "w2_update_norm": (w2_new - params.w2.double()).flatten(1).norm(dim=1)}
    for name, e in expected.items():
        assert_rel_close(f"reference {name}", out[name], e, 1e-5)
    assert out["w1"].dtype == torch.float32


def test_reference_inplace_and_stats():
    params, momenta, x, delta = _inputs(2, 5, 17, 23, device="cpu")
    fresh = cms_update(params, momenta, x, delta, lr=0.1, beta=0.5, backend="reference")
    p = CMSParams(params.w1.clone(), params.w2.clone())
    m = CMSParams(momenta.w1.clone(), momenta.w2.clone())
    out_p, out_m, stats = cms_update(p, m, x, delta, lr=0.1, beta=0.5, inplace=True, backend="reference")
    assert out_p.w1 is p.w1 and out_m.w2 is m.w2
    assert torch.equal(p.w1, fresh[0].w1) and torch.equal(m.w2, fresh[1].w2)
    assert stats.update_count == 1 and stats.w1_update_norm.shape == (2,)


def test_reference_lr_zero_keeps_weights_and_beta_zero_is_plain_gradient():
    params, momenta, x, delta = _inputs(1, 4, 8, 32, device="cpu")
    p, m, s = cms_update(params, momenta, x, delta, lr=0.0, beta=0.0, backend="reference")
    g1, g2 = _vjp_grads(params, x, delta)
    assert torch.equal(p.w1, params.w1) and float(s.w1_update_norm.max()) == 0.0
    assert_rel_close("m1 = g1", m.w1, g1, 1e-5)
    assert_rel_close("m2 = g2", m.w2, g2, 1e-5)


# ---------------------------------------------------------------- backends vs the reference
@pytest.mark.parametrize("backend", _backends(DEV))
@pytest.mark.parametrize("precond", [False, True], ids=["plain", "precond"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_reference(backend, size, precond):
    params, momenta, x, delta = _inputs(*size)
    ref = _all_outputs(cms_update(params, momenta, x, delta, lr=0.05, beta=0.9, precond=precond, backend="reference"))
    out_tuple = cms_update(params, momenta, x, delta, lr=0.05, beta=0.9, precond=precond, backend=backend)
    out = _all_outputs(out_tuple)
    for name in ref:
        assert_rel_close(f"{backend} {name}", out[name], ref[name], 2e-5)
    assert out_tuple[2].update_count == 1
    assert out_tuple[0].w1 is not params.w1  # not inplace: the inputs are left alone


@pytest.mark.parametrize("backend", _backends(DEV))
def test_backend_inplace_matches_reference(backend):
    params, momenta, x, delta = _inputs(2, 7, 33, 65)
    ref = _all_outputs(cms_update(params, momenta, x, delta, lr=0.1, beta=0.5, precond=True, backend="reference"))
    p = CMSParams(params.w1.clone(), params.w2.clone())
    m = CMSParams(momenta.w1.clone(), momenta.w2.clone())
    out_p, out_m, _ = cms_update(p, m, x, delta, lr=0.1, beta=0.5, precond=True, inplace=True, backend=backend)
    assert out_p.w1 is p.w1 and out_p.w2 is p.w2 and out_m.w1 is m.w1 and out_m.w2 is m.w2
    for name, t in (("w1", p.w1), ("w2", p.w2), ("m1", m.w1), ("m2", m.w2)):
        assert_rel_close(f"{backend} inplace {name}", t, ref[name], 2e-5)


@pytest.mark.parametrize("backend", _backends(DEV))
def test_backend_inplace_into_strided_params(backend):
    """Non-contiguous (transposed-storage) params still get the update written into them."""
    params, momenta, x, delta = _inputs(2, 5, 16, 48)
    ref = _all_outputs(cms_update(params, momenta, x, delta, lr=0.1, beta=0.5, backend="reference"))
    w1 = params.w1.transpose(1, 2).contiguous().transpose(1, 2)
    p = CMSParams(w1, params.w2.clone())
    m = CMSParams(momenta.w1.clone(), momenta.w2.clone())
    cms_update(p, m, x, delta, lr=0.1, beta=0.5, inplace=True, backend=backend)
    assert not p.w1.is_contiguous()
    assert_rel_close(f"{backend} strided w1", p.w1, ref["w1"], 2e-5)


@pytest.mark.parametrize("backend", _backends(DEV))
def test_backend_nan_input_is_not_hidden(backend):
    params, momenta, x, delta = _inputs(2, 6, 16, 64)
    x[1, 3, 5] = float("nan")
    p, m, s = cms_update(params, momenta, x, delta, lr=0.1, beta=0.5, backend=backend)
    assert torch.isnan(p.w1[1]).any() and torch.isnan(s.w1_update_norm[1])
    assert torch.isfinite(p.w1[0]).all()  # the other sample is untouched by it


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("C", [1, 64, 1024])
def test_backend_gpu_shapes(backend, C):
    params, momenta, x, delta = _inputs(8, C, 256, 1024, device="cuda")
    ref = _all_outputs(cms_update(params, momenta, x, delta, lr=0.01, beta=0.9, precond=True, backend="reference"))
    out = _all_outputs(cms_update(params, momenta, x, delta, lr=0.01, beta=0.9, precond=True, backend=backend))
    for name in ref:
        assert_rel_close(f"{backend} {name}", out[name], ref[name], 1e-4)


def test_triton_backend_registered_where_triton_runs():
    pytest.importorskip("triton")
    if not (HAS_CUDA or triton_interpret_enabled()):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    assert "triton" in backends.available_backends(OP, DEV)


def test_custom_op_traces_under_compile_fullgraph():
    pytest.importorskip("triton")
    if not (HAS_CUDA or triton_interpret_enabled()):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    params, momenta, x, delta = _inputs(2, 5, 16, 64)

    def step(p, m, x, delta):
        new_p, new_m, stats = cms_update(p, m, x, delta, lr=0.05, beta=0.9, precond=True, backend="triton")
        return new_p.w1, new_p.w2, new_m.w1, new_m.w2, stats.w1_update_norm, stats.w2_update_norm

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(params, momenta, x, delta)
    ref = _all_outputs(cms_update(params, momenta, x, delta, lr=0.05, beta=0.9, precond=True, backend="reference"))
    for name, a in zip(("w1", "w2", "m1", "m2", "w1_update_norm", "w2_update_norm"), out):
        assert_rel_close(f"compiled {name}", a, ref[name], 2e-5)


# ---------------------------------------------------------------- bad input names the argument
def _bad(params, momenta, x, delta, **kw):
    return cms_update(params, momenta, x, delta, **{"lr": 0.1, "beta": 0.5, **kw})


@pytest.mark.parametrize(
    "mutate,exc,word",
    [
        (lambda p, m, x, d: ((p.w1,), m, x, d, {}), TypeError, "params"),
        (lambda p, m, x, d: (p, m, x[0], d, {}), ValueError, "x"),
        (lambda p, m, x, d: (p, m, x, d[:, :-1], {}), ValueError, "delta"),
        (lambda p, m, x, d: (CMSParams(p.w1[:, :, :-1], p.w2), m, x, d, {}), ValueError, "params.w1"),
        (lambda p, m, x, d: (CMSParams(p.w1, p.w2.double()), m, x, d, {}), TypeError, "params.w2"),
        (lambda p, m, x, d: (p, CMSParams(m.w1, m.w2[:1]), x, d, {}), ValueError, "momenta.w2"),
        (lambda p, m, x, d: (p, m, x, d, {"lr": -1.0}), ValueError, "lr"),
        (lambda p, m, x, d: (p, m, x, d, {"lr": float("inf")}), ValueError, "lr must be a finite float"),
        (lambda p, m, x, d: (p, m, x, d, {"lr": float("nan")}), ValueError, "lr must be a finite float"),
        (lambda p, m, x, d: (p, m, x, d, {"beta": 1.5}), ValueError, "beta"),
        (lambda p, m, x, d: (p, m, x, d, {"precond": 1}), TypeError, "precond"),
        (lambda p, m, x, d: (p, m, x, d, {"backend": "nope"}), ValueError, "backend"),
    ],
    ids=["params-type", "x-ndim", "delta-shape", "w1-shape", "w2-dtype", "m2-shape", "lr", "lr-inf", "lr-nan", "beta",
         "precond", "backend"],
)
def test_bad_input_names_the_argument(mutate, exc, word):
    params, momenta, x, delta = _inputs(2, 3, 8, 32, device="cpu")
    *args, kw = mutate(params, momenta, x, delta)
    with pytest.raises(exc, match=word):
        _bad(*args, **kw)


@pytest.mark.parametrize("backend", _backends(DEV) + ["reference"])
def test_non_finite_lr_never_reaches_the_weights(backend):
    """lr = inf would write inf / NaN weights on every backend: the call is refused before any kernel runs."""
    params, momenta, x, delta = _inputs(2, 3, 8, 32)
    before = params.w1.clone()
    for lr in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="lr must be a finite float"):
            cms_update(params, momenta, x, delta, lr=lr, beta=0.9, inplace=True, backend=backend)
    assert torch.equal(params.w1, before)


@pytest.mark.gpu
def test_cuda_bf16_tokens_match_reference():
    params, momenta, x, delta = _inputs(2, 9, 40, 72, device="cuda")
    x, delta = x.bfloat16(), delta.bfloat16()
    ref_p, _, _ = cms_update(params, momenta, x, delta, lr=0.05, beta=0.9, backend="reference")
    out_p, _, _ = cms_update(params, momenta, x, delta, lr=0.05, beta=0.9, backend="cuda")
    assert_rel_close("w1 bf16 tokens", out_p.w1, ref_p.w1, 1e-4)


EXTENSIONS = [pytest.param("cpp", "cpu", id="cpp"), pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("backend,device", EXTENSIONS)
@pytest.mark.parametrize(
    "bad_arg,make_bad",
    [
        ("delta", lambda t: dict(t, delta=t["delta"][:, :-1].contiguous())),
        ("w1", lambda t: dict(t, w1=t["w1"].double())),
        ("m2", lambda t: dict(t, m2=t["m2"][..., :-1].contiguous())),
        ("x", lambda t: dict(t, x=t["x"][0])),
    ],
)
def test_raw_extension_checks_name_the_argument(backend, device, bad_arg, make_bad):
    module = {"cpp": _ext.cpu, "cuda": _ext.cuda}[backend]
    if module is None:
        pytest.skip(f"{backend} extension not loaded: {_ext.why_unavailable('_C_cpu' if backend == 'cpp' else '_C_cuda')}")
    params, momenta, x, delta = _inputs(2, 3, 8, 6, device=torch.device(device))
    good = dict(w1=params.w1, w2=params.w2, m1=momenta.w1, m2=momenta.w2, x=x, delta=delta)
    with pytest.raises(RuntimeError, match=rf"\b{bad_arg}\b"):
        module.cms_update(**make_bad(good), lr=0.1, beta=0.9, precond=False)
