"""teach_signal: the reference against F.cross_entropy + autograd, then every backend against the reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hope_kernels import _ext, backends
from hope_kernels._checks import value_checks_off
from hope_kernels.teach_signal import OP, teach_signal
from tests.kernels.helpers import assert_rel_close, triton_interpret_enabled

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
# (N, D, V): V never a multiple of the tiles, N = 1, N not a multiple of the token block
SIZES = [(1, 16, 37), (37, 33, 101), (64, 48, 130)]


def _inputs(N, D, V, device=DEV, dtype=torch.float32, seed=0, n_ignored=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(device, dtype)
    weight = (torch.randn(V, D, generator=g) * D**-0.5 * 3).to(device, dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:n_ignored]] = -100
    return hidden, weight, targets.to(device)


def _autograd_truth(hidden, weight, targets, ignore_index=-100):
    """Independent ground truth: F.cross_entropy on materialised fp32 logits, grads by autograd."""
    h = hidden.detach().float().requires_grad_()
    w = weight.detach().float().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), targets, ignore_index=ignore_index)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _run(backend, hidden, weight, targets, ignore_index=-100):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, delta = teach_signal(h, w, targets, ignore_index=ignore_index, backend=backend)
    loss.backward()
    return loss.detach(), delta, h.grad, w.grad


def _backends(device):
    names = list(backends.available_backends(OP, device))
    if device.type == "cpu" and triton_interpret_enabled() and "triton" not in names:
        names.append("triton")
    return [b for b in names if b != "reference"]


# ---------------------------------------------------------------- reference semantics
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_reference_matches_cross_entropy_and_autograd(size):
    hidden, weight, targets = _inputs(*size, n_ignored=size[0] // 4)
    loss_t, dh_t, dw_t = _autograd_truth(hidden, weight, targets)
    loss, delta, dh, dw = _run("reference", hidden, weight, targets)
    assert_rel_close("loss", loss, loss_t, 1e-6)
    assert_rel_close("delta", delta, dh_t, 1e-5)
    assert_rel_close("d hidden", dh, dh_t, 1e-5)
    assert_rel_close("d weight", dw, dw_t, 1e-5)
    assert not delta.requires_grad and delta.dtype == hidden.dtype


def test_reference_delta_finite_difference_float64():
    """delta = d loss / d hidden, against central differences of the float64 loss on every entry.

    The reference accumulates in fp32, so its delta is compared at fp32 accuracy; the differences
    themselves are taken on the exact float64 loss so they carry no fp32 rounding.
    """
    hidden, weight, targets = _inputs(5, 4, 7, device="cpu", dtype=torch.float64)
    targets[1] = -100

    def loss64(h):
        return F.cross_entropy(h @ weight.t(), targets, ignore_index=-100)

    _, delta = teach_signal(hidden, weight, targets, backend="reference")
    eps = 1e-6
    fd = torch.zeros_like(hidden)
    for i in range(hidden.shape[0]):
        for j in range(hidden.shape[1]):
            hp, hm = hidden.clone(), hidden.clone()
            hp[i, j] += eps
            hm[i, j] -= eps
            fd[i, j] = (loss64(hp) - loss64(hm)) / (2 * eps)
    assert_rel_close("delta vs finite differences", delta, fd, 1e-6)
    assert torch.all(delta[1] == 0)


def test_reference_all_ignored_gives_zero_not_nan():
    hidden, weight, targets = _inputs(6, 8, 11, device="cpu")
    targets[:] = -100
    loss, delta = teach_signal(hidden, weight, targets, backend="reference")
    assert float(loss) == 0.0 and torch.all(delta == 0)


# ---------------------------------------------------------------- backends vs the reference
@pytest.mark.parametrize("backend", _backends(DEV))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("n_ignored", [0, 3], ids=["all-valid", "ignored-rows"])
def test_backend_matches_reference_fp32(backend, size, n_ignored):
    hidden, weight, targets = _inputs(*size, n_ignored=min(n_ignored, size[0] - 1))
    ref = _run("reference", hidden, weight, targets)
    out = _run(backend, hidden, weight, targets)
    for name, a, e in zip(("loss", "delta", "d hidden", "d weight"), out, ref):
        assert_rel_close(f"{backend} {name}", a, e, 2e-5)
    assert out[1].dtype == hidden.dtype and not out[1].requires_grad


@pytest.mark.parametrize("backend", _backends(DEV))
def test_backend_all_ignored_and_custom_ignore_index(backend):
    hidden, weight, targets = _inputs(9, 16, 40)
    targets[:] = 7
    loss, delta = teach_signal(hidden, weight, targets, ignore_index=7, backend=backend)
    assert float(loss) == 0.0 and torch.all(delta == 0)
    targets[::2] = 3  # ignore_index=3 drops those rows, the others (target 7) count
    ref = _run("reference", hidden, weight, targets, ignore_index=3)
    out = _run(backend, hidden, weight, targets, ignore_index=3)
    for name, a, e in zip(("loss", "delta", "d hidden", "d weight"), out, ref):
        assert_rel_close(f"{backend} {name}", a, e, 2e-5)


@pytest.mark.parametrize("backend", _backends(DEV))
def test_backend_hidden_only_grad_and_no_grad(backend):
    """Without weight grads the kernel skips dW; under no_grad it still returns loss and delta."""
    hidden, weight, targets = _inputs(20, 16, 50)
    h = hidden.clone().requires_grad_()
    loss, delta = teach_signal(h, weight, targets, backend=backend)
    (2.0 * loss).backward()
    _, ref_delta = teach_signal(hidden, weight, targets, backend="reference")
    assert_rel_close("2 * delta", h.grad, 2.0 * ref_delta, 2e-5)
    with torch.no_grad():
        loss_ng, delta_ng = teach_signal(hidden, weight, targets, backend=backend)
    assert_rel_close("no_grad delta", delta_ng, ref_delta, 2e-5)


@pytest.mark.parametrize("backend", _backends(DEV))
def test_backend_nan_hidden_is_not_hidden(backend):
    """A NaN in a valid row poisons the loss and that row's delta, as in the reference."""
    hidden, weight, targets = _inputs(17, 16, 33)
    hidden[4, 2] = float("nan")
    loss, delta = teach_signal(hidden, weight, targets, backend=backend)
    assert torch.isnan(loss)
    assert torch.isnan(delta[4]).any()


def test_triton_backend_registered_where_triton_runs():
    pytest.importorskip("triton")
    if not (HAS_CUDA or triton_interpret_enabled()):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    assert "triton" in backends.available_backends(OP, DEV)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_half_hidden_fp32_accumulation(backend, dtype):
    hidden, weight, targets = _inputs(300, 128, 1000, device="cuda", dtype=dtype, n_ignored=20)
    loss_t, dh_t, dw_t = _autograd_truth(hidden, weight, targets)
    loss, delta, dh, dw = _run(backend, hidden, weight, targets)
    assert delta.dtype == dtype and dh.dtype == dtype and dw.dtype == dtype
    assert_rel_close("loss", loss, loss_t, 1e-3)
    assert_rel_close("delta", delta, dh_t, 2e-2)
    assert_rel_close("d weight", dw, dw_t, 2e-2)


@pytest.mark.gpu
def test_triton_large_vocab_gpu():
    hidden, weight, targets = _inputs(1000, 256, 32003, device="cuda", n_ignored=100)
    ref = _run("reference", hidden, weight, targets)
    out = _run("triton", hidden, weight, targets)
    for name, a, e in zip(("loss", "delta", "d hidden", "d weight"), out, ref):
        assert_rel_close(f"triton {name}", a, e, 1e-4)


# ---------------------------------------------------------------- custom op and torch.compile
def test_custom_op_traces_under_compile_fullgraph():
    pytest.importorskip("triton")
    if not (HAS_CUDA or triton_interpret_enabled()):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")

    def step(h, w, t):
        loss, delta = teach_signal(h, w, t, backend="triton")
        return loss * 2.0, delta

    hidden, weight, targets = _inputs(19, 16, 45, n_ignored=2)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, delta = compiled(h, w, targets)
    loss.backward()
    ref = _run("reference", hidden, weight, targets)
    assert_rel_close("compiled loss", loss / 2.0, ref[0], 2e-5)
    assert_rel_close("compiled delta", delta, ref[1], 2e-5)
    assert_rel_close("compiled d hidden", h.grad / 2.0, ref[2], 2e-5)
    assert_rel_close("compiled d weight", w.grad / 2.0, ref[3], 2e-5)


def test_custom_op_opcheck():
    pytest.importorskip("triton")
    if not (HAS_CUDA or triton_interpret_enabled()):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    hidden, weight, targets = _inputs(8, 16, 33)
    torch.library.opcheck(torch.ops.hope.teach_signal.default, (hidden, weight, targets, -100, False, 0, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------- bad input names the argument
@pytest.mark.parametrize(
    "mutate,exc,word",
    [
        (lambda h, w, t: (h[0], w, t), ValueError, "hidden"),
        (lambda h, w, t: (h, w[:, :-1], t), ValueError, "weight"),
        (lambda h, w, t: (h, w.double(), t), TypeError, "weight"),
        (lambda h, w, t: (h, w, t[:-1]), ValueError, "targets"),
        (lambda h, w, t: (h, w, t.float()), TypeError, "targets"),
        (lambda h, w, t: (h, w, torch.full_like(t, 10_000)), ValueError, "targets"),
        (lambda h, w, t: (h.tolist(), w, t), TypeError, "hidden"),
        (lambda h, w, t: (h, w[:0], torch.full_like(t, -100)), ValueError, "weight must have at least one row"),
    ],
    ids=["hidden-1d", "weight-D", "weight-dtype", "targets-N", "targets-dtype", "targets-range", "hidden-list",
         "empty-vocabulary"],
)
def test_bad_input_names_the_argument(mutate, exc, word):
    hidden, weight, targets = _inputs(6, 8, 11, device="cpu")
    with pytest.raises(exc, match=word):
        teach_signal(*mutate(hidden, weight, targets))


def test_bad_ignore_index_and_backend():
    hidden, weight, targets = _inputs(6, 8, 11, device="cpu")
    with pytest.raises(TypeError, match="ignore_index"):
        teach_signal(hidden, weight, targets, ignore_index=1.5)
    with pytest.raises(ValueError, match="backend"):
        teach_signal(hidden, weight, targets, backend="nope")


# ---------------------------------------------------------------- the CUDA kernel (csrc/teach_signal.cu), GPU only
# The CUDA teach_signal kernel (csrc/teach_signal.cu) against a float64 ground truth; every test needs a GPU.
# 
# The ground truth is the reference's math (mean CE over valid rows, 0 when none; delta = d loss / d hidden) on the
# same inputs upcast to float64, with gradients by autograd. ``chunk_rows`` is forced small in some cases so that
# several chunks and a partial last chunk run; V % 4 == 0 cases take the kernel's vectorised path.
# (N, V, D): V odd (scalar path) and V % 4 == 0 (vectorised path); N = 1 and N not a multiple of chunk_rows
CUDA_SIZES = [(1, 7, 3), (37, 101, 40), (129, 2048, 64), (300, 5003, 96)]
# loss, delta, d hidden, d weight; fp32 as the triton fp32 tests, half as the existing bf16/fp16 tests
CUDA_TOLS = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-3, 2e-2), torch.float16: (1e-3, 2e-2)}


def _cuda_inputs(N, V, D, dtype=torch.float32, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to("cuda", dtype)
    weight = (torch.randn(V, D, generator=g) * D**-0.5 * 3).to("cuda", dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        targets[1::ignore_every] = -100
    return hidden, weight, targets.to("cuda")


def _truth64(hidden, weight, targets, ignore_index=-100, grad_scale=1.0):
    """(loss, delta, d hidden, d weight) of grad_scale * loss in float64, from the same (rounded) inputs."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    n_valid = (targets != ignore_index).sum().clamp_min(1)
    loss = F.cross_entropy(h @ w.t(), targets, ignore_index=ignore_index, reduction="sum") / n_valid
    (delta,) = torch.autograd.grad(loss, h, retain_graph=True)
    dh, dw = torch.autograd.grad(loss * grad_scale, (h, w))
    return loss.detach(), delta, dh, dw


def _run_cuda(hidden, weight, targets, ignore_index=-100, chunk_rows=0, grad_scale=1.0):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, delta = teach_signal(h, w, targets, ignore_index=ignore_index, chunk_rows=chunk_rows, backend="cuda")
    (loss * grad_scale).backward()
    return loss.detach(), delta, h.grad, w.grad


def _assert_matches(out, truth, dtype, label):
    tol_loss, tol = CUDA_TOLS[dtype]
    for name, a, e, t in zip(("loss", "delta", "d hidden", "d weight"), out, truth, (tol_loss, tol, tol, tol)):
        assert_rel_close(f"cuda {label} {name}", a, e, t)


def _poison_cuda_cache():
    """Leave NaN-filled freed blocks in both allocator pools, so a buffer the kernel forgets to write shows up."""
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in (1 << 14, 1 << 18, 1 << 26)]
    torch.cuda.synchronize()
    del blocks


@pytest.mark.gpu
def test_cuda_backend_registered_and_picked_by_auto():
    assert _ext.cuda is not None, f"hope_kernels._C_cuda did not load: {_ext.why_unavailable('_C_cuda')}"
    assert "cuda" in backends.available_backends(OP, "cuda")
    assert backends.resolve_backend(OP, "cuda").backend == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("chunk_rows", [0, 7], ids=["auto-chunk", "chunk7"])
@pytest.mark.parametrize("size", CUDA_SIZES, ids=lambda s: "N{}_V{}_D{}".format(*s))
def test_matches_float64_truth_fwd_bwd(size, chunk_rows, dtype):
    hidden, weight, targets = _cuda_inputs(*size, dtype=dtype)
    truth = _truth64(hidden, weight, targets, grad_scale=1.7)
    _poison_cuda_cache()
    out = _run_cuda(hidden, weight, targets, chunk_rows=chunk_rows, grad_scale=1.7)
    _assert_matches(out, truth, dtype, f"{size} chunk={chunk_rows}")
    loss, delta, dh, dw = out
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert delta.dtype == dh.dtype == dw.dtype == dtype and not delta.requires_grad
    assert torch.all(delta[1::4] == 0), "ignored rows must have exactly zero delta"


@pytest.mark.gpu
def test_large_vocab_through_the_public_op():
    hidden, weight, targets = _cuda_inputs(1000, 32003, 256, ignore_every=10)
    truth = _truth64(hidden, weight, targets)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, delta = teach_signal(h, w, targets, backend="cuda")
    loss.backward()
    for name, a, e in zip(("loss", "delta", "d hidden", "d weight"), (loss, delta, h.grad, w.grad), truth):
        assert_rel_close(f"cuda V=32003 {name}", a.detach(), e, 1e-4)


@pytest.mark.gpu
def test_float64_inputs_run_in_fp32_like_the_reference():
    """The public op accepts float64: the kernel computes in fp32 (as the reference) and returns float64."""
    hidden, weight, targets = _cuda_inputs(37, 101, 40, dtype=torch.float64)
    truth = _truth64(hidden, weight, targets, grad_scale=1.7)
    out = _run_cuda(hidden, weight, targets, chunk_rows=8, grad_scale=1.7)
    _assert_matches(out, truth, torch.float32, "float64 inputs")
    assert out[1].dtype == out[2].dtype == out[3].dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_all_rows_ignored_and_custom_ignore_index(dtype):
    hidden, weight, targets = _cuda_inputs(37, 101, 40, dtype=dtype, ignore_every=0)
    targets[:] = 5
    _poison_cuda_cache()
    loss, delta, dh, dw = _run_cuda(hidden, weight, targets, ignore_index=5, chunk_rows=8)
    assert float(loss) == 0.0
    assert torch.all(delta == 0) and torch.all(dh == 0) and torch.all(dw == 0)
    targets[::3] = 2  # ignore_index=2 drops those rows, the others (target 5) count
    truth = _truth64(hidden, weight, targets, ignore_index=2)
    _assert_matches(_run_cuda(hidden, weight, targets, ignore_index=2, chunk_rows=8), truth, dtype, "ignore_index=2")


@pytest.mark.gpu
def test_empty_batch():
    hidden, weight, targets = _cuda_inputs(0, 11, 8, ignore_every=0)
    loss, delta, dh, dw = _run_cuda(hidden, weight, targets)
    assert float(loss) == 0.0 and delta.shape == (0, 8) and dh.shape == (0, 8)
    assert torch.all(dw == 0)


@pytest.mark.gpu
def test_hidden_only_grad_and_no_grad():
    """Without weight grads dW is skipped (compute_dw=False); under no_grad loss and delta are still returned."""
    hidden, weight, targets = _cuda_inputs(64, 257, 48)
    _, delta_t, _, _ = _truth64(hidden, weight, targets)
    h = hidden.clone().requires_grad_()
    loss, delta = teach_signal(h, weight, targets, backend="cuda")
    (2.0 * loss).backward()
    assert_rel_close("2 * delta", h.grad, 2.0 * delta_t, 2e-5)
    assert weight.grad is None
    with torch.no_grad():
        loss_ng, delta_ng = teach_signal(hidden, weight, targets, backend="cuda")
    assert_rel_close("no_grad delta", delta_ng, delta_t, 2e-5)
    assert_rel_close("no_grad loss", loss_ng, loss.detach(), 1e-6)


@pytest.mark.gpu
def test_runs_on_the_current_stream():
    hidden, weight, targets = _cuda_inputs(300, 5003, 96)
    truth = _truth64(hidden, weight, targets)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = _run_cuda(hidden, weight, targets, chunk_rows=64)
    torch.cuda.current_stream().wait_stream(side)
    _assert_matches(out, truth, torch.float32, "side stream")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_nan_hidden_is_not_hidden(dtype):
    """A NaN in a valid row poisons the loss and that row's delta; the other rows' deltas stay finite."""
    hidden, weight, targets = _cuda_inputs(37, 101, 40, dtype=dtype)
    assert targets[4] != -100
    hidden[4, 2] = float("nan")
    loss, delta, _, dw = _run_cuda(hidden, weight, targets, chunk_rows=8)
    assert torch.isnan(loss)
    assert torch.isnan(delta[4]).all()
    others = torch.ones(37, dtype=torch.bool, device="cuda")
    others[4] = False
    assert torch.isfinite(delta[others]).all()
    assert torch.isnan(dw).any()


@pytest.mark.gpu
def test_out_of_range_target_gives_nan_not_a_wrong_answer():
    """With the host-side range check off, a target outside [0, V) makes the loss and its row NaN (device signal)."""
    hidden, weight, targets = _cuda_inputs(37, 101, 40)
    targets[6] = 101
    targets[9] = -3
    with value_checks_off():
        loss, delta = teach_signal(hidden, weight, targets, backend="cuda")
    assert torch.isnan(loss)
    assert torch.isnan(delta[6]).all() and torch.isnan(delta[9]).all()
    assert torch.isfinite(delta[0]).all()


def _cuda_raw_args():
    hidden, weight, targets = _cuda_inputs(6, 11, 8)
    return dict(hidden=hidden, weight=weight, targets=targets, ignore_index=-100, compute_dw=True, chunk_rows=0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "bad_arg,make_bad",
    [
        ("hidden", lambda a: dict(a, hidden=a["hidden"].cpu())),
        ("hidden", lambda a: dict(a, hidden=a["hidden"].double(), weight=a["weight"].double())),
        ("hidden", lambda a: dict(a, hidden=a["hidden"].t().contiguous().t())),
        ("hidden", lambda a: dict(a, hidden=a["hidden"][0])),
        ("weight", lambda a: dict(a, weight=a["weight"].half())),
        ("weight", lambda a: dict(a, weight=a["weight"][:, :-1].contiguous())),
        ("weight", lambda a: dict(a, weight=a["weight"].t().contiguous().t())),
        ("targets", lambda a: dict(a, targets=a["targets"].int())),
        ("targets", lambda a: dict(a, targets=a["targets"][:-1])),
        ("targets", lambda a: dict(a, targets=a["targets"].cpu())),
        ("chunk_rows", lambda a: dict(a, chunk_rows=-1)),
    ],
    ids=["hidden-cpu", "hidden-f64", "hidden-strided", "hidden-1d", "weight-dtype", "weight-D", "weight-strided",
         "targets-int32", "targets-N", "targets-cpu", "chunk_rows-negative"],
)
def test_raw_extension_checks_name_the_argument(bad_arg, make_bad):
    with pytest.raises(RuntimeError, match=rf"\b{bad_arg}\b"):
        _ext.cuda.teach_signal(**make_bad(_cuda_raw_args()))
