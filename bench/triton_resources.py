"""What our Triton kernels need on a GPU, measured without one: compile each launch for an sm_90 target.

A launcher runs as usual (on small CPU tensors) with its ``@triton.jit`` kernels replaced by recorders; every
recorded launch is then compiled ahead of time for the target with Triton's own CUDA backend (ptxas ships in the
Triton wheel) and its resources are read off the result: shared memory (``metadata.shared``), registers and spill
stack (``cuobjdump --dump-resource-usage`` on the cubin). A kernel asking for more shared memory than the GPU has
fails at launch there (``OutOfResources``); this finds it here. Checked against the H100 once: the dgd linear
backward at Dk = 128, C = 64 needed 270336 bytes on the GPU (Triton 3.6) and compiles to 270336 here with Triton 3.6.

    python bench/triton_resources.py [--arch 90] [--json PATH]     # report every launch of LAUNCHES
    python bench/triton_resources.py --op self_modifying_titans --no-ptxas   # shared memory only, faster

``--no-ptxas`` stops each compile once Triton has allocated shared memory, before PTX and ptxas (the fused op's
memory-pass backward: about a minute instead of eight on 2 cores): shared memory is exact, registers and spills are
not reported. To see which buffers make a kernel's peak, run it with ``MLIR_ENABLE_DUMP=1`` and read the IR before
``TritonTensorMemoryAllocationPass``: every shared buffer carries its ``allocation.offset``, and its source line in
the ``loc`` table.

Runs with TRITON_INTERPRET unset (the interpreter replaces kernels by Python functions that cannot be compiled).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable

#: shared memory per block an H100 (sm_90) grants a kernel, bytes (Triton's "Hardware limit")
H100_MAX_SHARED = 232448

_TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int32": "i32",
                    "int64": "i64", "uint8": "u8", "bool": "i1"}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, name: str, kernel):
        self.name, self.kernel, self.calls = name, kernel, []

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.calls.append((args, kwargs))
        return record


def record_launches(module, kernel_names: tuple[str, ...], launch: Callable[[], object]) -> list:
    """Runs ``launch()`` with ``module.<name>`` replaced by recorders; returns ``[(name, kernel, args, kwargs)]``."""
    recorders = {n: _Recorder(n, getattr(module, n)) for n in kernel_names}
    saved = {n: getattr(module, n) for n in kernel_names}
    try:
        for n, r in recorders.items():
            setattr(module, n, r)
        launch()
    finally:
        for n, k in saved.items():
            setattr(module, n, k)
    return [(r.name, r.kernel, a, kw) for r in recorders.values() for a, kw in r.calls]


def _signature(kernel, args, kwargs):
    import torch

    params = kernel.params
    names = {p.name for p in params}
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs = {}, {}
    for p in params:
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"argument {p.name!r} of {kernel.__name__}: unsupported type {type(value).__name__}")
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    return signature, constexprs, options


class _StopBeforePtx(Exception):
    """Raised by the PTX stage that ``shared_without_ptxas`` installs: carries the allocated shared memory."""


def _compile(kernel, args, kwargs, arch: int):
    """Triton's compile of one recorded launch for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, options = _signature(kernel, args, kwargs)
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def shared_without_ptxas(kernel, args, kwargs, arch: int = 90) -> int:
    """Shared memory (bytes) of one recorded launch for ``sm_<arch>``, compiling only up to Triton's allocation (its
    LLVM-IR stage records it): no PTX, no ptxas."""
    from triton.backends.nvidia.compiler import CUDABackend

    def stop(src, metadata):
        raise _StopBeforePtx(metadata["shared"])

    add_stages = CUDABackend.add_stages

    def add_stages_then_stop(self, stages, options, language):
        add_stages(self, stages, options, language)
        stages["ptx"] = stop

    CUDABackend.add_stages = add_stages_then_stop
    try:
        compiled = _compile(kernel, args, kwargs, arch)
    except _StopBeforePtx as stopped:
        return int(stopped.args[0])
    finally:
        CUDABackend.add_stages = add_stages
    return int(compiled.metadata.shared)  # compiled before: Triton's cache returned it without running a stage


def compile_resources(kernel, args, kwargs, arch: int = 90) -> dict:
    """Compiles one recorded launch for ``sm_<arch>``: ``{shared, regs, spill_stack, num_warps, num_stages}``."""
    import triton

    compiled = _compile(kernel, args, kwargs, arch)
    row = {"shared": int(compiled.metadata.shared), "num_warps": compiled.metadata.num_warps,
           "num_stages": compiled.metadata.num_stages}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if m:
        row.update(regs=int(m.group(1)), spill_stack=int(m.group(2)))
    return row


# ------------------------------------------------------------------------------------------ what we launch
def _titan_launches():
    """(tag, module, kernel names, launch) for the titan_memory_update launchers at the GPU benchmark / test shapes."""
    import torch

    from hope_kernels.titan_memory_update.chunk import chunk_terms
    from hope_kernels.titan_memory_update.triton import linear, mlp

    def raw(q, k, v, lr, mo, de, state, C, rule, memory):
        t = chunk_terms(q, k, lr, mo, de, C, dgd=rule == "dgd", mlp=memory == "mlp")
        return q, k, v, [x.contiguous() for x in t.kernel_terms()], [s.float().contiguous() for s in state], C

    def inputs(D, W, C, memory, dtype):
        T = 2 * C
        q, k, v = (torch.randn(1, 1, T, D if i < 2 else (D if memory == "mlp" else W)).to(dtype) for i in range(3))
        gates = [torch.rand(1, 1, T) for _ in range(3)]
        shapes = [(D, W), (W, D), (D, W), (W, D)] if memory == "mlp" else [(W, D), (W, D)]
        return q, k, v, *gates, [torch.zeros(1, 1, *s) for s in shapes]

    out = []
    dtype = torch.bfloat16
    for D, C in ((64, 64), (128, 64), (128, 32)):
        for rule in ("titans", "dgd"):
            if linear.why_not(D, D, C, rule, backward=True) is not None:
                continue
            a = raw(*inputs(D, D, C, "linear", dtype), C, rule, "linear")
            tag = f"linear {rule} D{D} C{C} {str(dtype)[6:]}"
            out.append((tag + " fwd", linear, ("_linear_fwd_kernel",), lambda a=a: linear.forward(*a)))
            out.append((tag + " bwd", linear, ("_linear_fwd_kernel", "_linear_bwd_kernel"),
                        lambda a=a: linear.backward([torch.zeros_like(a[2]), *(torch.zeros_like(s) for s in a[4])],
                                                    *a)))
    # the mlp kernels at the largest chunk each head-dim tile allows, forward-only and with a backward; on bf16
    # inputs (TF32 products) and fp32 ones (exact fp32 products: other layouts, other shared memory)
    for (D, rule, backward), C in mlp.MLP_MAX_CHUNK.items():
        for mlp_dtype in (dtype, torch.float32):
            a = raw(*inputs(D, 2 * D, C, "mlp", mlp_dtype), C, rule, "mlp")
            tag = f"mlp {rule} D{D} E{2 * D} C{C} {str(mlp_dtype)[6:]}"
            if backward:
                out.append((tag + " bwd", mlp, ("_mlp_fwd_kernel", "_mlp_bwd_kernel"),
                            lambda a=a: mlp.backward([torch.zeros_like(a[0]), *(torch.zeros_like(s) for s in a[4])],
                                                     *a)))
            else:
                out.append((tag + " fwd", mlp, ("_mlp_fwd_kernel",), lambda a=a: mlp.forward(*a)))
    return out


def _with_gpu_config(module, launch):
    """``launch`` with ``module._config`` picking the GPU tiles although the tensors are on the CPU."""
    def run():
        original = module._config
        module._config = functools.partial(original, gpu=True)
        try:
            launch()
        finally:
            module._config = original
    return run


def _teach_signal_launches():
    """teach_signal at the benchmark's vocabularies: fp32 and bf16 hidden states (their tiles differ)."""
    import importlib

    import torch

    ts = importlib.import_module("hope_kernels.teach_signal.triton")

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for D, V in ((768, 32000), (4096, 128256)):
            h = torch.zeros(64, D, dtype=dtype)
            w = torch.zeros(V, D, dtype=dtype)
            t = torch.zeros(64, dtype=torch.long)
            launch = _with_gpu_config(ts, lambda h=h, w=w, t=t: ts._teach_signal_forward(h, w, t, -100, True))
            out.append((f"teach_signal N64 D{D} V{V} {str(dtype)[6:]}", ts, ("_ts_lse_kernel", "_ts_grad_kernel"),
                        launch))
    return out


def _cms_update_launches():
    """cms_update at the benchmark's chunk lengths (the tile over tokens depends on C), plain and preconditioned."""
    import importlib

    import torch

    cms = importlib.import_module("hope_kernels.cms_update.triton")

    out = []
    for C in (1, 16, 64, 1024):
        for precond in (False, True):
            D, E = 768, 1024
            x = torch.zeros(2, C, D)
            ws = [torch.zeros(2, E, D), torch.zeros(2, D, E)]  # w1 [B, E, D], w2 [B, D, E]

            def launch(x=x, ws=ws, precond=precond):
                cms.cms_update_kernel(ws[0], ws[1], ws[0].clone(), ws[1].clone(), x, x, 0.1, 0.9, precond)
            out.append((f"cms_update C{C} D{D} E{E} precond={precond}", cms, ("_cms_update_kernel",),
                        _with_gpu_config(cms, launch)))
    return out


def _self_modifying_titans_launches():
    """self_modifying_titans' four kernels at the largest chunks its backend record takes (``MAX_CHUNKS`` in
    ``self_modifying_titans/triton``) per head-dim tile: the forward kernels at the forward-only caps, the backward
    kernels at the caps with a backward."""
    import importlib

    import torch

    smt = importlib.import_module("hope_kernels.self_modifying_titans.triton")
    from hope_kernels.self_modifying_titans.chunk import LayerSettings

    def launch(H, D, E, G, gen_chunk, mem_chunk, rule, clip, backward):
        B, T = 1, 2 * max(gen_chunk, mem_chunk)
        f = lambda *s: torch.zeros(*s)  # noqa: E731
        inputs = [f(B, H, T, D), f(B, H, T, D), f(B, H, T, D), f(B, G * H, D, E), f(B, G * H, E, D),
                  f(B, G * H, D, E), f(B, G * H, E, D), f(B, H, D, E), f(B, H, E, D), f(B, H, D, E), f(B, H, E, D),
                  f(2, H, D), f(2, H), f(2, H)]
        # the read-out before the update (the default) refuses an M_mem bound: bound the generators only then
        settings = LayerSettings(gen_chunk, mem_chunk, clip, 0.0, rule == "dgd", True, True, 1)
        saved = (f(B, H, T, 3, D), f(B, H, T, 2), f(B, H, T // gen_chunk, G, 4, D * E),
                 f(B, H, T // mem_chunk, 4, D * E), f(B, H, 0))
        grads = [f(B, H, T, D)] + [x.clone() for x in inputs[3:11]]

        def run():
            if backward:
                smt.TritonKernel.bwd(grads, inputs, saved, settings)
                return
            try:
                smt.TritonKernel.fwd(inputs, settings)
            except (TypeError, IndexError, ValueError):
                pass  # the recorded launches return nothing: unpacking their outputs fails after they are recorded
        return run

    out = []
    for (D, backward), caps in smt.MAX_CHUNKS.items():
        names = ("_mem_bwd_kernel", "_gen_bwd_kernel") if backward else ("_gen_fwd_kernel", "_mem_fwd_kernel")
        for G, rule, clip in ((4, "dgd", 0.0), (5, "titans", 0.1)):  # the defaults; titans, adaptive q, gen bound
            tag = (f"self_modifying_titans D{D} E{2 * D} G{G} {rule} clip={clip} gen C{caps[0]} mem C{caps[1]} "
                   f"{'bwd' if backward else 'fwd'}")
            out.append((tag, smt, names, launch(2, D, 2 * D, G, *caps, rule, clip, backward)))
    return out


#: every launch family the report covers by default
LAUNCHES = {"titan_memory_update": _titan_launches, "teach_signal": _teach_signal_launches,
            "cms_update": _cms_update_launches}
#: families reported only when named (--op): self_modifying_titans' kernels take minutes each to compile on 2 cores
OPT_IN = {"self_modifying_titans": _self_modifying_titans_launches}


def report(arch: int = 90, ops=None, ptxas: bool = True):
    """Yields one row per compiled launch: op, case, kernel, shared, regs, spill_stack, fits (shared <= limit);
    without ``ptxas`` shared memory only (``shared_without_ptxas``)."""
    seen = set()
    for op, launches in {**LAUNCHES, **OPT_IN}.items():
        if (ops and op not in ops) or (not ops and op in OPT_IN):
            continue
        for tag, module, names, launch in launches():
            for name, kernel, args, kwargs in record_launches(module, names, launch):
                sig = _signature(kernel, args, kwargs)
                key = (name, repr(sig))
                if key in seen:  # the backward's forward re-run is the forward's kernel with other flags only
                    continue
                seen.add(key)
                flags = "+".join(k for k, v in kwargs.items() if k.isupper() and v is True and k != "DGD")
                resources = (compile_resources(kernel, args, kwargs, arch) if ptxas
                             else {"shared": shared_without_ptxas(kernel, args, kwargs, arch)})
                row = {"op": op, "case": tag, "kernel": name, "flags": flags, **resources}
                row["fits_h100"] = row["shared"] <= H100_MAX_SHARED
                yield row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--json", help="also write the rows (with the Triton version) to this file")
    parser.add_argument("--op", action="append",
                        help="only these ops (default: every op of LAUNCHES; those of OPT_IN only when named)")
    parser.add_argument("--no-ptxas", action="store_true",
                        help="shared memory only, from Triton's allocation (no PTX, no ptxas: much faster)")
    ns = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("triton_resources: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    import triton

    rows = []
    for row in report(ns.arch, ns.op, ptxas=not ns.no_ptxas):
        rows.append(row)
        print(f"{row['case']:<34} {row['kernel']:<20} {row['flags']:<20} shared {row['shared'] / 1024:6.1f} KiB  regs "
              f"{row.get('regs', '?'):>3}  spill stack {row.get('spill_stack', '?'):>5} B"
              f"{'' if row['fits_h100'] else '  DOES NOT FIT an H100'}", flush=True)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": ns.arch, "ptxas": not ns.no_ptxas, "rows": rows}, f,
                      indent=1)
    return 0 if all(r["fits_h100"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
