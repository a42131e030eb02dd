"""csrc/ backends ("cpp" here, "cuda" on a GPU) against the PyTorch reference, through the dispatcher."""
from __future__ import annotations

import pytest
import torch

from hope_kernels import _ext, dispatch
from hope_kernels.cms_update import CMSParams, cms_update
from hope_kernels.testing import assert_rel_close

EXT_BACKENDS = [
    pytest.param("cpp", "cpu", id="cpp"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
]
# (B, C, D, E): odd sizes so no kernel relies on a power of two or a multiple of its block
CMS_SIZES = [(1, 1, 3, 5), (2, 7, 33, 65), (3, 16, 64, 96)]


def _cms_inputs(B, C, D, E, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    params = CMSParams(rand(B, E, D, scale=D**-0.5), rand(B, D, E, scale=E**-0.5))
    momenta = CMSParams(rand(B, E, D, scale=0.1), rand(B, D, E, scale=0.1))
    return params, momenta, rand(B, C, D), rand(B, C, D)


def test_cpp_backend_registered_on_this_machine():
    """The C++ CPU extension must build in CI: pip install only warns, so this test is what fails."""
    assert _ext.cpu is not None, f"hope_kernels._C_cpu did not load: {_ext.why_unavailable('_C_cpu')}"
    assert "cpp" in dispatch.available_backends("cms_update", "cpu")


@pytest.mark.parametrize("backend,device", EXT_BACKENDS)
@pytest.mark.parametrize("precond", [False, True], ids=["plain", "precond"])
@pytest.mark.parametrize("size", CMS_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_cms_update_matches_reference(backend, device, precond, size):
    params, momenta, x, delta = _cms_inputs(*size, device)
    ref_p, ref_m, ref_s = cms_update(params, momenta, x, delta, lr=0.05, beta=0.9, precond=precond, backend="reference")
    out_p, out_m, out_s = cms_update(params, momenta, x, delta, lr=0.05, beta=0.9, precond=precond, backend=backend)
    for name, a, e in [("w1", out_p.w1, ref_p.w1), ("w2", out_p.w2, ref_p.w2), ("m1", out_m.w1, ref_m.w1),
                       ("m2", out_m.w2, ref_m.w2), ("w1_update_norm", out_s.w1_update_norm, ref_s.w1_update_norm),
                       ("w2_update_norm", out_s.w2_update_norm, ref_s.w2_update_norm)]:
        assert_rel_close(f"{backend} {name}", a, e, tol=1e-5)


@pytest.mark.parametrize("backend,device", EXT_BACKENDS)
def test_cms_update_inplace_matches_reference(backend, device):
    params, momenta, x, delta = _cms_inputs(2, 5, 17, 23, device)
    ref_p, ref_m, _ = cms_update(params, momenta, x, delta, lr=0.1, beta=0.5, backend="reference")
    p_ext = CMSParams(params.w1.clone(), params.w2.clone())
    m_ext = CMSParams(momenta.w1.clone(), momenta.w2.clone())
    out_p, out_m, _ = cms_update(p_ext, m_ext, x, delta, lr=0.1, beta=0.5, inplace=True, backend=backend)
    assert out_p.w1 is p_ext.w1 and out_m.w2 is m_ext.w2
    assert_rel_close("w1 inplace", p_ext.w1, ref_p.w1, 1e-5)
    assert_rel_close("m2 inplace", m_ext.w2, ref_m.w2, 1e-5)


@pytest.mark.parametrize("backend,device", EXT_BACKENDS)
def test_cms_update_nan_input_is_not_hidden(backend, device):
    """A NaN token must poison the update as in the reference (no kernel silently drops it)."""
    params, momenta, x, delta = _cms_inputs(2, 4, 9, 11, device)
    delta[1, 2, 3] = float("nan")
    out_p, _, _ = cms_update(params, momenta, x, delta, lr=0.1, beta=0.9, backend=backend)
    ref_p, _, _ = cms_update(params, momenta, x, delta, lr=0.1, beta=0.9, backend="reference")
    assert torch.equal(torch.isnan(out_p.w2), torch.isnan(ref_p.w2))
    assert torch.isfinite(out_p.w2[0]).all() and torch.isnan(out_p.w2[1]).any()


@pytest.mark.gpu
def test_cms_update_cuda_bf16_tokens_match_reference():
    params, momenta, x, delta = _cms_inputs(2, 9, 40, 72, "cuda")
    x, delta = x.bfloat16(), delta.bfloat16()
    ref_p, _, _ = cms_update(params, momenta, x, delta, lr=0.05, beta=0.9, backend="reference")
    out_p, _, _ = cms_update(params, momenta, x, delta, lr=0.05, beta=0.9, backend="cuda")
    assert_rel_close("w1 bf16 tokens", out_p.w1, ref_p.w1, 1e-4)


@pytest.mark.parametrize("backend,device", EXT_BACKENDS)
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
    params, momenta, x, delta = _cms_inputs(2, 3, 8, 6, device)
    good = dict(w1=params.w1, w2=params.w2, m1=momenta.w1, m2=momenta.w2, x=x, delta=delta)
    bad = make_bad(good)
    with pytest.raises(RuntimeError, match=rf"\b{bad_arg}\b"):
        module.cms_update(**bad, lr=0.1, beta=0.9, precond=False)


@pytest.mark.parametrize("N,V,D", [(1, 3, 2), (37, 101, 24), (64, 257, 33)])
def test_teach_signal_cpp_kernel_matches_reference_fwd_bwd(N, V, D):
    """The C++ teach signal (not registered for auto: not faster) still must be exactly the reference."""
    from hope_kernels.teach_signal.cuda import CPP_AVAILABLE, teach_signal_cpp
    from hope_kernels.teach_signal.reference import teach_signal_reference

    assert CPP_AVAILABLE, _ext.why_unavailable("_C_cpu")
    g = torch.Generator().manual_seed(N)
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[1::4] = -100
    outs = {}
    for name, fn in [("reference", teach_signal_reference), ("cpp", teach_signal_cpp)]:
        loss, delta = fn(hidden, weight, targets, -100)
        grad_h, grad_w = torch.autograd.grad(loss * 1.7, (hidden, weight))
        outs[name] = (loss, delta, grad_h, grad_w)
    for label, a, e in zip(("loss", "delta", "grad_hidden", "grad_weight"), outs["cpp"], outs["reference"]):
        assert_rel_close(f"teach_signal cpp {label}", a.detach(), e.detach(), 1e-5)


def test_teach_signal_cpp_checks_name_the_argument():
    if _ext.cpu is None:
        pytest.skip(_ext.why_unavailable("_C_cpu"))
    hidden, weight = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(RuntimeError, match=r"\bhidden\b"):
        _ext.cpu.teach_signal(hidden.double(), weight, torch.zeros(4, dtype=torch.long), -100)
    with pytest.raises(RuntimeError, match=r"\btargets\b"):
        _ext.cpu.teach_signal(hidden, weight, torch.zeros(3, dtype=torch.long), -100)
    with pytest.raises(RuntimeError, match=r"targets\[2\]"):
        _ext.cpu.teach_signal(hidden, weight, torch.tensor([0, 1, 9, 2]), -100)
