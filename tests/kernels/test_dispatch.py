"""The dispatcher: auto order, forcing by argument and by HOPE_BACKEND, clear errors."""
import pytest
import torch

import hope_kernels
from hope_kernels import dispatch

OPS = ("titan_memory_update", "teach_signal", "cms_update")


@pytest.mark.parametrize("op", OPS)
def test_reference_always_available_on_cpu(op):
    assert "reference" in dispatch.available_backends(op, "cpu")


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_never_picks_the_triton_interpreter(op, monkeypatch):
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    impl = dispatch.resolve_backend(op, torch.device("cpu"), "auto")
    assert impl.backend in ("cpp", "reference")
    # auto takes the first available non-interpreter backend in preference order
    expected = [b for b in dispatch.available_backends(op, "cpu") if b != "triton"][0]
    assert impl.backend == expected


def test_force_by_argument_and_env(monkeypatch):
    impl = dispatch.resolve_backend("teach_signal", "cpu", "reference")
    assert impl.backend == "reference"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
    assert dispatch.resolve_backend("teach_signal", "cpu", "auto").backend == "reference"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "nonsense")
    with pytest.raises(ValueError, match="HOPE_BACKEND"):
        dispatch.resolve_backend("teach_signal", "cpu", "auto")


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cuda"):
        dispatch.resolve_backend("teach_signal", "cpu", "cuda")
    with pytest.raises(ValueError, match="backend must be"):
        dispatch.resolve_backend("teach_signal", "cpu", "fastest")
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.resolve_backend("no_such_op", "cpu")
    with pytest.raises(TypeError, match="backend must be a str"):
        dispatch.resolve_backend("teach_signal", "cpu", 3)


def test_public_op_forwards_backend_argument():
    h = torch.randn(5, 8)
    w = torch.randn(11, 8)
    t = torch.randint(0, 11, (5,))
    loss, delta = hope_kernels.teach_signal(h, w, t, backend="reference")
    assert loss.shape == () and delta.shape == h.shape
    with pytest.raises(RuntimeError, match="not available|cannot run"):
        hope_kernels.teach_signal(h, w, t, backend="cuda")


def test_register_rejects_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.register("teach_signal", "opencl", lambda *a: None)


def test_prefer_reorders_one_op_and_checks_the_order():
    assert dispatch.backend_order("titan_memory_update")[0] == "triton"  # measured faster than the CUDA port
    assert dispatch.backend_order("cms_update") == dispatch.BACKEND_ORDER
    assert "titan_memory_update" in dispatch.PREFERENCE_NOTES
    with pytest.raises(ValueError, match="permutation"):
        dispatch.prefer("cms_update", ("triton", "reference"), "incomplete order")


def test_auto_skips_kernels_not_validated_on_a_gpu():
    """The CUDA mlp kernels are compile-checked only: backend='auto' must not pick them (an explicit backend or
    $HOPE_BACKEND still does); the linear port passed its H100 tests and is picked."""
    from hope_kernels.titan_memory_update import cuda

    assert cuda.auto_declines("titans", True, "mlp") and cuda.auto_declines("dgd", False, "mlp")
    assert not cuda.auto_declines("titans", True, "linear") and not cuda.auto_declines("dgd", True)
