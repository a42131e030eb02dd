"""C++ CPU ``titan_memory_update`` for the linear memory, rules ``titans`` and ``dgd`` (csrc/titan_linear_cpu.cpp).

Same split as the Triton and CUDA backends (``triton.py``, ``cuda.py``, docs/kernels/titan_memory.md "kernel
split"): ``chunk_terms.linear_chunk_terms`` computes every state-independent chunk term with batched PyTorch ops
(autograd differentiates it), then the extension's two state passes carry the state, one task per (b, h) with the
full [Dv, Dk] state: forward (``titan_linear_fwd``) and backward (``titan_linear_bwd``, which re-runs the forward
to store the chunk-start states). They take the Triton launchers' tensor contract in fp32 (half inputs are cast
here, results cast back) and are registered as the custom ops ``hope::titan_linear_fwd_cpp`` /
``hope::titan_linear_bwd_cpp`` (fake implementations + ``register_autograd``, from ``state_pass.py``), so
``torch.compile(fullgraph=True)`` traces them.

Registered with the dispatcher as backend "cpp" for CPU tensors only for the rules it measured faster than the
PyTorch reference on (fwd+bwd, see ``MEASURED_FASTER`` and docs/kernels/csrc.md); ``auto_declines`` names the
calls ``backend="auto"`` leaves to the reference.

The mlp memory (M(x) = x + W1 gelu(W2 x)) has its own pair, ``titan_mlp_fwd`` / ``titan_mlp_bwd``
(csrc/titan_mlp_cpu.cpp: the block-phased body csrc/titan_mlp_body.h that csrc/titan_mlp.cu shares), registered as
``hope::titan_mlp_fwd_cpp`` / ``hope::titan_mlp_bwd_cpp``; auto takes it only where it measured faster
(``MLP_MEASURED_FASTER``).
"""
from __future__ import annotations

import torch

from hope_kernels import _ext
from hope_kernels.backends import Backend, on_cpu, on_cuda
from hope_kernels.titan_memory_update.state_pass import (backend_entry, define_mlp_state_pass_ops,
                                                         define_state_pass_ops)

OP = "titan_memory_update"
#: the extension was built with these kernels (an older build of _C_cpu may lack them)
AVAILABLE = _ext.cpu is not None and hasattr(_ext.cpu, "titan_linear_fwd")
#: the extension has the mlp kernels too
MLP_AVAILABLE = AVAILABLE and hasattr(_ext.cpu, "titan_mlp_fwd")
#: rules on which the C++ state pass measured faster than the reference fwd+bwd (2-core CPU, torch 2.13.0+cpu,
#: 2026-11-25, bench/bench_titan_memory_update.py cpu; table in docs/kernels/csrc.md): titans 1.5-1.6x, dgd 12-16x
MEASURED_FASTER = ("titans", "dgd")
#: rules on which it also measured faster forward-only (no gradients): titans forward-only lost at B2 H4 T512 D32
#: (0.6-0.9x: its batched chunk terms cost about what the whole reference forward does), so auto keeps the
#: reference there
MEASURED_FASTER_FWD_ONLY = ("dgd",)


def why_not(Dk: int, Dv: int, chunk_size: int, rule: str, backward: bool) -> str | None:
    """None: the C++ kernels take every shape (no shape limits)."""
    return None


#: mlp memory: (rule, backward) pairs on which the C++ state pass measured faster than the reference (2-core CPU,
#: torch 2.13.0+cpu, 2026-11-25, bench/bench_titan_mlp_cpu.py, B2 H4 T512 D32 E64 C32 and B1 H2 T256 D64 E128 C64,
#: fp32; table in docs/kernels/csrc.md): dgd fwd 2.1-2.4x and fwd+bwd 2.5-2.8x on 1 thread (4.7-5.3x on 2: the
#: reference's per-token loop), titans 0.27-0.43x on 1 thread (0.6-0.8x on 2; the reference's batched matmuls win),
#: so auto takes the C++ mlp kernels for dgd only
MLP_MEASURED_FASTER = (("dgd", True), ("dgd", False))


def why_not_mlp(D: int, E: int, chunk_size: int, rule: str, backward: bool) -> str | None:
    """None: the C++ mlp kernels take every shape (no shape limits), when the extension has them."""
    if not MLP_AVAILABLE:
        return "was built without the mlp kernels (rebuild hope_kernels._C_cpu)"
    return None


def auto_declines(rule: str, backward: bool, memory: str = "linear") -> bool:
    """Whether ``backend="auto"`` passes this call on to the reference (measured slower there; an explicit
    ``backend="cpp"`` still runs it)."""
    if memory == "mlp":
        return (rule, backward) not in MLP_MEASURED_FASTER
    return rule not in MEASURED_FASTER or (not backward and rule not in MEASURED_FASTER_FWD_ONLY)


def _ext_fn(name: str):
    if not AVAILABLE:
        why = _ext.why_unavailable("_C_cpu") or "the loaded hope_kernels._C_cpu was built without it"
        raise RuntimeError(f"hope_kernels._C_cpu.{name} is not available: {why}")
    return getattr(_ext.cpu, name)


def _f32(*xs):
    return [x.float().contiguous() if x is not None else None for x in xs]


def _fwd(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size):
    out, WT, ST, _ = _ext_fn("titan_linear_fwd")(*_f32(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0),
                                                 chunk_size, False)
    return out.to(q.dtype), WT, ST


def _bwd(do, dWT, dST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size):
    xs = _f32(do, dWT, dST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0)
    grads = list(_ext_fn("titan_linear_bwd")(*xs, chunk_size))
    grads[0], grads[1], grads[3] = grads[0].to(q.dtype), grads[1].to(k.dtype), grads[3].to(v.dtype)
    return grads


#: ``hope::titan_linear_fwd_cpp`` / ``hope::titan_linear_bwd_cpp`` (fakes and autograd: state_pass.py); the kernels
#: take fp32, half inputs are cast here and results cast back
titan_linear_fwd_cpp, titan_linear_bwd_cpp = define_state_pass_ops("_cpp", _fwd, _bwd)


def _mlp_fwd(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, chunk_size):
    xs = _f32(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2)
    out, *st, _ = _ext_fn("titan_mlp_fwd")(*xs, chunk_size, False)
    return (out.to(q.dtype), *st)


def _mlp_bwd(do, dW1T, dW2T, dS1T, dS2T, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, chunk_size):
    xs = _f32(do, dW1T, dW2T, dS1T, dS2T, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2)
    grads = list(_ext_fn("titan_mlp_bwd")(*xs, chunk_size))
    grads[0], grads[1], grads[3] = grads[0].to(q.dtype), grads[1].to(k.dtype), grads[3].to(v.dtype)
    return grads


#: ``hope::titan_mlp_fwd_cpp`` / ``hope::titan_mlp_bwd_cpp`` (mlp memory; fakes and autograd: state_pass.py)
titan_mlp_fwd_cpp, titan_mlp_bwd_cpp = define_mlp_state_pass_ops("_cpp", _mlp_fwd, _mlp_bwd)
titan_memory_update_cpp = backend_entry("cpp", titan_linear_fwd_cpp, why_not, mlp_fwd_op=titan_mlp_fwd_cpp,
                                        mlp_why_not=why_not_mlp)


def supports(call) -> tuple[bool, str]:
    if call.dtype == torch.float64:
        return False, "takes fp32/bf16/fp16 q, k, v (float64 runs on the reference)"
    why = why_not_mlp(call.Dk, call.width, call.chunk_size, call.rule, call.backward) if call.memory == "mlp" else None
    return why is None, why or ""


def _auto_skips(call) -> str | None:
    if auto_declines(call.rule, call.backward, call.memory):
        return "measured slower than the reference on this call"
    return None


if not AVAILABLE:
    raise ImportError(_ext.why_unavailable("_C_cpu") or "the loaded hope_kernels._C_cpu lacks the titan kernels")
BACKEND = Backend(OP, "cpp", priority=10, kernel=titan_memory_update_cpp, runs_on=on_cpu, supports=supports,
                  auto_skips=_auto_skips, env="HOPE_USE_CPP")
