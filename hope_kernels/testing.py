"""Comparison helpers shared by kernel tests and benchmarks (importable by downstream users too)."""
from __future__ import annotations

import os
from typing import Iterable

import torch


def rel_rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / max(||expected||_2, tiny), computed in float64.

    The RMS ratio (as in fla's ``assert_close``) is meaningful for tensors whose entries vary in
    scale, where elementwise relative error is dominated by near-zero entries.
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        return float("inf")  # NaN or Inf never passes
    denom = e.norm().item()
    diff = (a - e).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_rel_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Assert relative RMS error <= tol; NaN/Inf in ``actual`` always fails."""
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{name}: expected a tensor, got {type(actual).__name__}")
    err = rel_rms_error(actual, expected)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e} (shape {tuple(actual.shape)})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN in place (so a kernel that forgets to write an element is caught)."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-(2**31) + 1 if t.dtype == torch.int32 else -1)
    return t


def empty_poisoned(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return poison_(torch.empty(*shape, dtype=dtype, device=device))


def grads_of(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor | None]:
    return [t.grad.detach().clone() if t.grad is not None else None for t in tensors]


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_titan_compiles_fullgraph(backend_fn, args, state, chunk_size: int = 8, rule: str = "dgd",
                                   tol: float = 1e-4) -> None:
    """``torch.compile(fullgraph=True, backend="aot_eager")`` through a titan_memory_update backend function
    (linear memory): the loss and every gradient (q, k, v, gates, initial state) match the reference's."""
    from hope_kernels.titan_memory_update.reference import titan_memory_update_reference
    from hope_kernels.titan_memory_update.state import LinearMemoryState

    def step(q, k, v, lr, mo, de, W0, S0):
        out, st = backend_fn(q, k, v, lr, mo, de, chunk_size, "linear", rule, LinearMemoryState(W0, S0))
        return out.square().sum() + st.W.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xs = [t.clone().requires_grad_(True) for t in list(args) + list(state)]
    loss = compiled(*xs)
    loss.backward()
    xr = [t.clone().requires_grad_(True) for t in list(args) + list(state)]
    out, st = titan_memory_update_reference(*xr[:6], chunk_size, "linear", rule, LinearMemoryState(*xr[6:]))
    ref = out.square().sum() + st.W.sum()
    ref.backward()
    assert_rel_close("compiled loss", loss.detach(), ref.detach(), tol)
    for name, a, b in zip(("q", "k", "v", "lr", "momentum", "decay", "W0", "S0"), xs, xr):
        assert_rel_close(f"compiled grad {name}", a.grad, b.grad, tol)
