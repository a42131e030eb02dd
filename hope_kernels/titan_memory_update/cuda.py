"""CUDA ``titan_memory_update`` for the linear memory, rules ``titans`` and ``dgd`` (csrc/titan_linear.cu).

Same split as the Triton backend (``triton.py``, docs/kernels/titan_memory.md "kernel split" and "CUDA port"):
``chunk_terms.linear_chunk_terms`` computes every state-independent chunk term with batched PyTorch ops
(autograd differentiates it), then the extension's two state-pass kernels carry the state: forward
(``titan_linear_fwd``) and backward (``titan_linear_bwd``, which re-runs the forward to store the chunk-start
states). They take the Triton launchers' tensor contract and are registered as the custom ops
``hope::titan_linear_fwd_cuda`` / ``hope::titan_linear_bwd_cuda`` (fake implementations + ``register_autograd``),
so ``torch.compile(fullgraph=True)`` traces them.

Limits of the kernels: Dk, Dv <= 128 and chunk_size <= 64 (state tiles in shared memory); ``titan_memory_update``
under ``backend="auto"`` runs larger shapes on the next backend (see ``why_not``).

The mlp memory (M(x) = x + W1 gelu(W2 x)) has its own pair, ``titan_mlp_fwd`` / ``titan_mlp_bwd`` (csrc/titan_mlp.cu:
one thread block per (b, h) running the block-phased body csrc/titan_mlp_body.h, which the C++ CPU backend shares),
registered as ``hope::titan_mlp_fwd_cuda`` / ``hope::titan_mlp_bwd_cuda``; limits D <= 128, E <= 512,
chunk_size <= 64 (``why_not_mlp``). Compile-checked only: until a GPU run passes its tests, ``backend="auto"`` does not
pick it (``auto_declines``; Triton, then the reference, run those calls); ``backend="cuda"`` or $HOPE_BACKEND=cuda
runs it.
"""
from __future__ import annotations

import torch

from hope_kernels import _ext
from hope_kernels.backends import Backend, on_cpu, on_cuda
from hope_kernels.titan_memory_update.state_pass import (backend_entry, define_mlp_state_pass_ops,
                                                         define_state_pass_ops)

OP = "titan_memory_update"
#: largest head dims (Dk, Dv) and chunk size the CUDA kernels take (csrc/titan_linear.cu kMaxDim, kMaxChunk)
MAX_HEAD_DIM = 128
MAX_CHUNK = 64
#: the extension was built with these kernels (an older build of _C_cuda may lack them)
AVAILABLE = _ext.cuda is not None and hasattr(_ext.cuda, "titan_linear_fwd")
#: mlp memory: largest head dim D, hidden width E and chunk size the CUDA kernels take (csrc/titan_mlp_checks.h
#: kTitanMlpMaxDim, kTitanMlpMaxHidden, kTitanMlpMaxChunk: they bound the per-(b, h) global scratch)
MLP_MAX_HEAD_DIM = 128
MLP_MAX_HIDDEN = 512
MLP_MAX_CHUNK = 64
#: the extension has the mlp kernels too
MLP_AVAILABLE = AVAILABLE and hasattr(_ext.cuda, "titan_mlp_fwd")


#: memories whose CUDA kernels passed their tests on a GPU (the linear port on the H100, 2026-11-25); auto picks only
#: these: an unvalidated kernel must not be chosen silently
VALIDATED_ON_GPU = ("linear",)


def auto_declines(rule: str, backward: bool, memory: str = "linear") -> bool:
    """Whether ``backend="auto"`` passes this call on to the next backend (kernels not yet validated on a GPU)."""
    return memory not in VALIDATED_ON_GPU


def fits(Dk: int, Dv: int, chunk_size: int) -> bool:
    """Whether the CUDA kernels take these sizes."""
    return Dk <= MAX_HEAD_DIM and Dv <= MAX_HEAD_DIM and chunk_size <= MAX_CHUNK


def why_not(Dk: int, Dv: int, chunk_size: int, rule: str, backward: bool) -> str | None:
    """None when the CUDA kernels run this call, else why not (the dispatcher's per-shape check)."""
    if fits(Dk, Dv, chunk_size):
        return None
    return (f"takes Dk, Dv <= {MAX_HEAD_DIM} and chunk_size <= {MAX_CHUNK}, got Dk={Dk}, Dv={Dv}, "
            f"chunk_size={chunk_size}")


def why_not_mlp(D: int, E: int, chunk_size: int, rule: str, backward: bool) -> str | None:
    """None when the CUDA mlp kernels run this call, else why not (the dispatcher's per-shape check)."""
    if not MLP_AVAILABLE:
        return "was built without the mlp kernels (rebuild hope_kernels._C_cuda)"
    if D <= MLP_MAX_HEAD_DIM and E <= MLP_MAX_HIDDEN and chunk_size <= MLP_MAX_CHUNK:
        return None
    return (f"takes D <= {MLP_MAX_HEAD_DIM}, E <= {MLP_MAX_HIDDEN} and chunk_size <= {MLP_MAX_CHUNK} for "
            f"memory='mlp', got D={D}, E={E}, chunk_size={chunk_size}")


def _ext_fn(name: str):
    if not AVAILABLE:
        why = _ext.why_unavailable("_C_cuda") or "the loaded hope_kernels._C_cuda was built without it"
        raise RuntimeError(f"hope_kernels._C_cuda.{name} is not available: {why}")
    return getattr(_ext.cuda, name)


def _fwd(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size):
    out, WT, ST, _ = _ext_fn("titan_linear_fwd")(q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size,
                                                 False)
    return out, WT, ST


def _bwd(do, dWT, dST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size):
    return _ext_fn("titan_linear_bwd")(do, dWT, dST, q, k, kh, v, aqk, akk, tinv, aqw, vec, end, W0, S0, chunk_size)


#: ``hope::titan_linear_fwd_cuda`` / ``hope::titan_linear_bwd_cuda`` (fakes and autograd: state_pass.py)
titan_linear_fwd_cuda, titan_linear_bwd_cuda = define_state_pass_ops("_cuda", _fwd, _bwd)


def _mlp_fwd(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, chunk_size):
    out, *st, _ = _ext_fn("titan_mlp_fwd")(q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2,
                                           chunk_size, False)
    return (out, *st)


def _mlp_bwd(do, dW1T, dW2T, dS1T, dS2T, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end, W1, W2, S1, S2, chunk_size):
    return _ext_fn("titan_mlp_bwd")(do, dW1T, dW2T, dS1T, dS2T, q, k, kh, v, aqk, gth, akk, tinv, aqw, vec, end,
                                    W1, W2, S1, S2, chunk_size)


#: ``hope::titan_mlp_fwd_cuda`` / ``hope::titan_mlp_bwd_cuda`` (mlp memory; fakes and autograd: state_pass.py)
titan_mlp_fwd_cuda, titan_mlp_bwd_cuda = define_mlp_state_pass_ops("_cuda", _mlp_fwd, _mlp_bwd)
titan_memory_update_cuda = backend_entry("cuda", titan_linear_fwd_cuda, why_not, mlp_fwd_op=titan_mlp_fwd_cuda,
                                         mlp_why_not=why_not_mlp)


def supports(call) -> tuple[bool, str]:
    if call.dtype == torch.float64:
        return False, "takes fp32/bf16/fp16 q, k, v (float64 runs on the reference)"
    why = (why_not_mlp if call.memory == "mlp" else why_not)(call.Dk, call.width, call.chunk_size, call.rule,
                                                              call.backward)
    return why is None, why or ""


def auto_skips(call) -> str | None:
    return None if call.memory in VALIDATED_ON_GPU else "its kernels have not yet passed their tests on a GPU"


if not AVAILABLE:
    raise ImportError(_ext.why_unavailable("_C_cuda") or "the loaded hope_kernels._C_cuda lacks the titan kernels")
BACKEND = Backend(OP, "cuda", priority=20, kernel=titan_memory_update_cuda, runs_on=on_cuda, supports=supports,
                  auto_skips=auto_skips, env="HOPE_USE_CUDA")
