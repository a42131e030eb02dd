"""The CUDA teach_signal kernel (csrc/teach_signal.cu) against a float64 ground truth; every test needs a GPU.

The ground truth is the reference's math (mean CE over valid rows, 0 when none; delta = d loss / d hidden) on the
same inputs upcast to float64, with gradients by autograd. ``chunk_rows`` is forced small in some cases so that
several chunks and a partial last chunk run; V % 4 == 0 cases take the kernel's vectorised path.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hope_kernels import _ext, backends
from hope_kernels._checks import value_checks_off
from hope_kernels.teach_signal import OP, teach_signal
from tests.kernels.helpers import assert_rel_close

pytestmark = pytest.mark.gpu

# (N, V, D): V odd (scalar path) and V % 4 == 0 (vectorised path); N = 1 and N not a multiple of chunk_rows
SIZES = [(1, 7, 3), (37, 101, 40), (129, 2048, 64), (300, 5003, 96)]
# loss, delta, d hidden, d weight; fp32 as the triton fp32 tests, half as the existing bf16/fp16 tests
TOLS = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-3, 2e-2), torch.float16: (1e-3, 2e-2)}


def _inputs(N, V, D, dtype=torch.float32, seed=0, ignore_every=4):
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
    tol_loss, tol = TOLS[dtype]
    for name, a, e, t in zip(("loss", "delta", "d hidden", "d weight"), out, truth, (tol_loss, tol, tol, tol)):
        assert_rel_close(f"cuda {label} {name}", a, e, t)


def _poison_cuda_cache():
    """Leave NaN-filled freed blocks in both allocator pools, so a buffer the kernel forgets to write shows up."""
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in (1 << 14, 1 << 18, 1 << 26)]
    torch.cuda.synchronize()
    del blocks


def test_cuda_backend_registered_and_picked_by_auto():
    assert _ext.cuda is not None, f"hope_kernels._C_cuda did not load: {_ext.why_unavailable('_C_cuda')}"
    assert "cuda" in backends.available_backends(OP, "cuda")
    assert backends.resolve_backend(OP, "cuda").backend == "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("chunk_rows", [0, 7], ids=["auto-chunk", "chunk7"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}_V{}_D{}".format(*s))
def test_matches_float64_truth_fwd_bwd(size, chunk_rows, dtype):
    hidden, weight, targets = _inputs(*size, dtype=dtype)
    truth = _truth64(hidden, weight, targets, grad_scale=1.7)
    _poison_cuda_cache()
    out = _run_cuda(hidden, weight, targets, chunk_rows=chunk_rows, grad_scale=1.7)
    _assert_matches(out, truth, dtype, f"{size} chunk={chunk_rows}")
    loss, delta, dh, dw = out
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert delta.dtype == dh.dtype == dw.dtype == dtype and not delta.requires_grad
    assert torch.all(delta[1::4] == 0), "ignored rows must have exactly zero delta"


def test_large_vocab_through_the_public_op():
    hidden, weight, targets = _inputs(1000, 32003, 256, ignore_every=10)
    truth = _truth64(hidden, weight, targets)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, delta = teach_signal(h, w, targets, backend="cuda")
    loss.backward()
    for name, a, e in zip(("loss", "delta", "d hidden", "d weight"), (loss, delta, h.grad, w.grad), truth):
        assert_rel_close(f"cuda V=32003 {name}", a.detach(), e, 1e-4)


def test_float64_inputs_run_in_fp32_like_the_reference():
    """The public op accepts float64: the kernel computes in fp32 (as the reference) and returns float64."""
    hidden, weight, targets = _inputs(37, 101, 40, dtype=torch.float64)
    truth = _truth64(hidden, weight, targets, grad_scale=1.7)
    out = _run_cuda(hidden, weight, targets, chunk_rows=8, grad_scale=1.7)
    _assert_matches(out, truth, torch.float32, "float64 inputs")
    assert out[1].dtype == out[2].dtype == out[3].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_all_rows_ignored_and_custom_ignore_index(dtype):
    hidden, weight, targets = _inputs(37, 101, 40, dtype=dtype, ignore_every=0)
    targets[:] = 5
    _poison_cuda_cache()
    loss, delta, dh, dw = _run_cuda(hidden, weight, targets, ignore_index=5, chunk_rows=8)
    assert float(loss) == 0.0
    assert torch.all(delta == 0) and torch.all(dh == 0) and torch.all(dw == 0)
    targets[::3] = 2  # ignore_index=2 drops those rows, the others (target 5) count
    truth = _truth64(hidden, weight, targets, ignore_index=2)
    _assert_matches(_run_cuda(hidden, weight, targets, ignore_index=2, chunk_rows=8), truth, dtype, "ignore_index=2")


def test_empty_batch():
    hidden, weight, targets = _inputs(0, 11, 8, ignore_every=0)
    loss, delta, dh, dw = _run_cuda(hidden, weight, targets)
    assert float(loss) == 0.0 and delta.shape == (0, 8) and dh.shape == (0, 8)
    assert torch.all(dw == 0)


def test_hidden_only_grad_and_no_grad():
    """Without weight grads dW is skipped (compute_dw=False); under no_grad loss and delta are still returned."""
    hidden, weight, targets = _inputs(64, 257, 48)
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


def test_runs_on_the_current_stream():
    hidden, weight, targets = _inputs(300, 5003, 96)
    truth = _truth64(hidden, weight, targets)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = _run_cuda(hidden, weight, targets, chunk_rows=64)
    torch.cuda.current_stream().wait_stream(side)
    _assert_matches(out, truth, torch.float32, "side stream")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_nan_hidden_is_not_hidden(dtype):
    """A NaN in a valid row poisons the loss and that row's delta; the other rows' deltas stay finite."""
    hidden, weight, targets = _inputs(37, 101, 40, dtype=dtype)
    assert targets[4] != -100
    hidden[4, 2] = float("nan")
    loss, delta, _, dw = _run_cuda(hidden, weight, targets, chunk_rows=8)
    assert torch.isnan(loss)
    assert torch.isnan(delta[4]).all()
    others = torch.ones(37, dtype=torch.bool, device="cuda")
    others[4] = False
    assert torch.isfinite(delta[others]).all()
    assert torch.isnan(dw).any()


def test_out_of_range_target_gives_nan_not_a_wrong_answer():
    """With the host-side range check off, a target outside [0, V) makes the loss and its row NaN (device signal)."""
    hidden, weight, targets = _inputs(37, 101, 40)
    targets[6] = 101
    targets[9] = -3
    with value_checks_off():
        loss, delta = teach_signal(hidden, weight, targets, backend="cuda")
    assert torch.isnan(loss)
    assert torch.isnan(delta[6]).all() and torch.isnan(delta[9]).all()
    assert torch.isfinite(delta[0]).all()


def _raw_args():
    hidden, weight, targets = _inputs(6, 11, 8)
    return dict(hidden=hidden, weight=weight, targets=targets, ignore_index=-100, compute_dw=True, chunk_rows=0)


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
        _ext.cuda.teach_signal(**make_bad(_raw_args()))
