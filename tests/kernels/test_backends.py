"""The backend records and the dispatcher: auto's choice per op, forcing by argument and by $HOPE_BACKEND, the
switches, clear errors."""
import pytest
import torch

import hope_kernels
from hope_kernels import _ext, backends
from hope_kernels.titan_memory_update import TitanCall

OPS = ("titan_memory_update", "teach_signal", "cms_update")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_forcing(monkeypatch):
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)


@pytest.mark.parametrize("op", OPS)
def test_reference_always_available_on_cpu(op):
    assert "reference" in backends.available_backends(op, "cpu")


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_never_picks_the_triton_interpreter(op):
    rec = backends.resolve_backend(op, CPU, "auto")
    expected = [b for b in backends.available_backends(op, "cpu") if b != "triton"][0]
    assert rec.name == expected and rec.name in ("cpp", "reference")


def test_the_cpu_extension_is_built_and_registered():
    """The C++ CPU extension must build in CI: pip install only warns, so this test is what fails."""
    assert _ext.cpu is not None, f"hope_kernels._C_cpu did not load: {_ext.why_unavailable('_C_cpu')}"
    assert "cpp" in backends.available_backends("cms_update", "cpu")
    assert "cpp" in backends.available_backends("titan_memory_update", "cpu")


def _titan(device, memory="linear", rule="titans", Dk=64, width=64, chunk_size=64, backward=True,
           dtype=torch.float32):
    return TitanCall(torch.device(device), dtype, memory, rule, Dk, width, chunk_size, backward)


# auto's choice for titan_memory_update on the CPU: cpp where it measured faster than the reference
# (docs/performance.md), the reference elsewhere
CPU_CHOICES = [
    (dict(rule="titans", backward=True), "cpp"),
    (dict(rule="titans", backward=False), "reference"),
    (dict(rule="dgd", backward=True), "cpp"),
    (dict(rule="dgd", backward=False), "cpp"),
    (dict(memory="mlp", rule="dgd", backward=True), "cpp"),
    (dict(memory="mlp", rule="dgd", backward=False), "cpp"),
    (dict(memory="mlp", rule="titans", backward=True), "reference"),
    (dict(memory="mlp", rule="titans", backward=False), "reference"),
    (dict(dtype=torch.float64), "reference"),
]


def _facts_id(x):
    return "-".join(str(v).replace("torch.", "") for v in x.values()) if isinstance(x, dict) else str(x)


@pytest.mark.parametrize("facts,expected", CPU_CHOICES, ids=_facts_id)
def test_titan_auto_choice_on_cpu(facts, expected):
    if _ext.cpu is None:
        pytest.skip(_ext.why_unavailable("_C_cpu"))
    assert backends.resolve_backend("titan_memory_update", CPU, "auto", _titan(CPU, **facts)).name == expected


@pytest.mark.skipif(_ext.cuda is not None, reason="this table is for a machine where only Triton's record loads")
def test_titan_auto_choice_on_cuda_from_the_triton_record():
    pytest.importorskip("triton")

    def choose(**kw):
        return backends.resolve_backend("titan_memory_update", CUDA, "auto", _titan(CUDA, **kw)).name

    assert choose() == "triton"
    assert choose(Dk=129, width=129) == "reference"  # Triton's tiles stay on chip up to Dk 128
    assert choose(memory="mlp", rule="dgd", Dk=128, width=256, chunk_size=64, backward=True) == "reference"
    assert choose(memory="mlp", rule="dgd", Dk=128, width=256, chunk_size=32, backward=True) == "triton"
    assert choose(memory="mlp", rule="dgd", Dk=64, width=128, chunk_size=64, backward=True) == "triton"
    assert choose(dtype=torch.float64) == "reference"


def test_force_by_argument_and_env(monkeypatch):
    assert backends.resolve_backend("teach_signal", "cpu", "reference").name == "reference"
    monkeypatch.setenv(backends.BACKEND_ENV, "reference")
    assert backends.resolve_backend("teach_signal", "cpu", "auto").name == "reference"
    assert backends.resolve_backend("cms_update", "cpu", "auto").name == "reference"
    monkeypatch.setenv(backends.BACKEND_ENV, "nonsense")
    with pytest.raises(ValueError, match="HOPE_BACKEND"):
        backends.resolve_backend("teach_signal", "cpu", "auto")


def test_env_forcing_gives_way_to_auto_where_its_backend_cannot_run(monkeypatch):
    """$HOPE_BACKEND=cpp still runs a call the C++ backend refuses (float64) on the reference; the argument raises."""
    if _ext.cpu is None:
        pytest.skip(_ext.why_unavailable("_C_cpu"))
    call = _titan(CPU, dtype=torch.float64)
    monkeypatch.setenv(backends.BACKEND_ENV, "cpp")
    assert backends.resolve_backend("titan_memory_update", CPU, "auto", call).name == "reference"
    # forcing overrides auto's measured preference: titans forward-only runs on cpp
    assert backends.resolve_backend("titan_memory_update", CPU, "auto", _titan(CPU, backward=False)).name == "cpp"
    with pytest.raises(ValueError, match="float64"):
        backends.resolve_backend("titan_memory_update", CPU, "cpp", call)


def test_a_switched_off_backend_is_skipped_and_named(monkeypatch):
    if _ext.cpu is None:
        pytest.skip(_ext.why_unavailable("_C_cpu"))
    monkeypatch.setenv("HOPE_USE_CPP", "0")
    assert "cpp" not in backends.available_backends("cms_update", "cpu")
    assert backends.resolve_backend("cms_update", CPU, "auto").name == "reference"
    with pytest.raises(RuntimeError, match="HOPE_USE_CPP=0"):
        backends.resolve_backend("cms_update", CPU, "cpp")


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cuda"):
        backends.resolve_backend("teach_signal", "cpu", "cuda")
    with pytest.raises(ValueError, match="backend must be"):
        backends.resolve_backend("teach_signal", "cpu", "fastest")
    with pytest.raises(ValueError, match="unknown op"):
        backends.resolve_backend("no_such_op", "cpu")
    with pytest.raises(TypeError, match="backend must be a str"):
        backends.resolve_backend("teach_signal", "cpu", 3)


def test_public_op_forwards_backend_argument():
    h, w, t = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    loss, delta = hope_kernels.teach_signal(h, w, t, backend="reference")
    assert loss.shape == () and delta.shape == h.shape
    with pytest.raises(RuntimeError, match="not available|cannot run"):
        hope_kernels.teach_signal(h, w, t, backend="cuda")


def test_a_record_names_a_known_backend():
    with pytest.raises(ValueError, match="backend name must be one of"):
        backends.Backend("teach_signal", "opencl", priority=1, kernel=lambda *a: None)


@pytest.mark.parametrize("op", OPS)
def test_priorities_order_each_op(op):
    """Auto's order: cuda > triton > cpp > reference, except titan_memory_update, where Triton measured faster than
    the CUDA port (docs/performance.md)."""
    order = [r.name for r in backends.records(op)]
    first = ("triton", "cuda", "cpp", "reference") if op == "titan_memory_update" else ("cuda", "triton", "cpp",
                                                                                         "reference")
    assert order == [b for b in first if b in order]
