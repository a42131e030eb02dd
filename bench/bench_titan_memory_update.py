"""titan_memory_update timings and peak memory: ``run(device) -> list[dict]`` (called by bench/gpu_suite.py).

Linear memory, chunk 64, fwd and fwd+bwd (gradients to q, k, v, the gates and the initial state):
  eager    the PyTorch reference (titans: dual form per chunk; dgd: per-token loop inside chunks)
  compile  the reference with its per-chunk function under torch.compile (one graph per chunk shape, reused
           across chunks: compiling the whole unrolled loop takes minutes at T=16384 and is not what a user does)
  triton   chunk terms in batched PyTorch + the state-carrying Triton kernels
  cpp      (CPU run) chunk terms in batched PyTorch + the C++ CPU state pass (csrc/titan_linear_cpu.cpp)
  fla      fla's chunk_gated_delta_rule (fla-core, when importable) on the shared case: rule titans with
           momentum 0 has the same per-chunk work as a gated delta rule (different update point), so only
           its time is compared, not its output
Issue targets (GPU): triton >= 10x eager, >= 2x compile, within 1.5x of fla on the shared case, at
B=8 H=12 D=64 T=2048 and B=1 H=16 D=128 T=16384.

``run_mlp(device)``: the same table for the mlp memory (M(x) = x + W1 gelu(W2 x), hidden width E = 2 D as the
pilot configs' memory_expansion), without fla (no peer implements it).
"""
from __future__ import annotations

import functools
import os

import torch
from _timing import peak_mb, time_ms, titan_backend

from hope_kernels import backends

from hope_kernels.titan_memory_update import LinearMemoryState, MLPMemoryState, titan_memory_update
from hope_kernels.titan_memory_update import naive as _reference
from hope_kernels.titan_memory_update.naive import titan_memory_update_naive as titan_memory_update_reference

GPU_SHAPES = [(8, 12, 2048, 64), (1, 16, 16384, 128)]  # (B, H, T, D)
CPU_SHAPES = [(1, 2, 128, 16), (2, 4, 512, 32)]
CHUNK = 64
# the eager dgd reference loops over tokens in Python: too slow to time at T=16384
EAGER_MAX_TOKENS_DGD = 4096
MLP_EXPANSION = 2  # E = 2 D, the pilot configs' memory_expansion


def _inputs(B, H, T, D, device, dtype, momentum_zero=False, memory="linear"):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    q, k = (torch.nn.functional.normalize(rnd(B, H, T, D), dim=-1).to(dtype) for _ in range(2))
    v = rnd(B, H, T, D).to(dtype)
    lr = torch.rand(B, H, T, generator=g).to(device) * 0.5
    momentum = torch.zeros(B, H, T, device=device) if momentum_zero else torch.rand(B, H, T, generator=g).to(device)
    decay = torch.rand(B, H, T, generator=g).to(device) * 0.1
    if memory == "mlp":  # a zero MLP memory never learns: random first-layer weights, small second layer
        E = MLP_EXPANSION * D
        state = [0.02 * rnd(B, H, D, E), rnd(B, H, E, D) / D**0.5, torch.zeros(B, H, D, E, device=device),
                 torch.zeros(B, H, E, D, device=device)]
        lr = lr * (2.0 / E)  # a stable step size for ||gelu(W2 k)||^2 ~ 0.4 E
    else:
        state = [torch.zeros(B, H, D, D, device=device), torch.zeros(B, H, D, D, device=device)]
    return [q, k, v, lr, momentum, decay], state


def compiled_reference():
    """The reference's chunk loop with each rule's chunk function compiled (static shapes, fullgraph)."""
    chunk_fns = {rule: torch.compile(fn, dynamic=False, fullgraph=True) for rule, fn in _reference.CHUNK_FNS.items()}
    return functools.partial(titan_memory_update_reference, chunk_fns=chunk_fns)


def _mlp_chunk(D: int, rule: str) -> int:
    """The mlp benchmark's chunk: the largest the Triton mlp kernels take with a backward at this head dim (their
    launches must fit an H100's shared memory, triton.MLP_MAX_CHUNK), at most CHUNK; every impl uses the same."""
    try:
        import triton

        from hope_kernels.titan_memory_update.triton import mlp as tk
    except ImportError:
        return CHUNK
    return min(CHUNK, tk.MLP_MAX_CHUNK.get((max(64, triton.next_power_of_2(D)), rule, True), CHUNK))


def _ours(fn, rule, memory="linear", chunk=CHUNK):
    def call(q, k, v, lr, mo, de, *state):
        st_cls = MLPMemoryState if memory == "mlp" else LinearMemoryState
        out, st = fn(q, k, v, lr, mo, de, chunk, memory, rule, st_cls(*state))
        return out, st[0]
    return call


def _fla_call():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None

    def call(q, k, v, lr, mo, de, W0, S0):
        # fla layout [B, T, H, D]; g = log(1 - decay); beta = lr; the state is [B, H, Dk, Dv]
        out, final = chunk_gated_delta_rule(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), g=torch.log1p(-de).transpose(1, 2),
            beta=lr.transpose(1, 2), initial_state=W0.transpose(-1, -2), output_final_state=True)
        return out, final
    return call


def _step(call, args, state, backward):
    leaves = [t.detach().clone().requires_grad_(backward) for t in args + state]

    def step():
        for t in leaves:
            t.grad = None
        if not backward:
            with torch.no_grad():
                call(*leaves)
            return
        out, final = call(*leaves)
        (out.float().square().sum() + final.float().sum()).backward()
    return step


def _kernel_stats() -> dict:
    """Registers and spills of the last compiled Triton kernels (read off Triton's compiled-kernel object)."""
    from hope_kernels.titan_memory_update.triton import launch as tk

    stats = {}
    for name, kern in tk.LAST_KERNELS.items():
        for attr in ("n_regs", "n_spills"):
            val = getattr(kern, attr, None)
            if val is not None:
                stats[f"{name}_{attr}"] = int(val)
    return stats


def run_mlp(device="cuda"):
    """``run`` for the mlp memory."""
    return run(device, memory="mlp")


def run(device="cuda", memory="linear"):
    """Yields one row per (shape, rule, pass, impl); speed-up columns are filled per group before yielding."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    dtype = torch.bfloat16 if on_gpu else torch.float32
    impls = {"eager": titan_memory_update_reference, "compile": compiled_reference()}
    if on_gpu:
        impls["triton"] = titan_backend("triton")
        if "cuda" in backends.available_backends("titan_memory_update", device):
            impls["cuda"] = titan_backend("cuda")
    elif "cpp" in backends.available_backends("titan_memory_update", device):
        impls["cpp"] = titan_backend("cpp")
    fla = _fla_call() if on_gpu and memory == "linear" else None
    wanted = os.environ.get("HOPE_BENCH_IMPLS")  # comma list: time only these (the suite splits runs this way)
    if wanted:
        keep = set(wanted.split(","))
        impls = {k: v for k, v in impls.items() if k in keep}
        fla = fla if "fla" in keep else None
    if os.environ.get("HOPE_BENCH_SHAPES"):  # comma list of indices into the shape list
        shapes = [shapes[int(i)] for i in os.environ["HOPE_BENCH_SHAPES"].split(",")]
    for B, H, T, D in shapes:
        for rule in ("titans", "dgd"):
            shared = rule == "titans"  # momentum 0: the case fla's gated delta rule also covers
            args, state = _inputs(B, H, T, D, device, dtype, momentum_zero=shared, memory=memory)
            hidden = f" E{MLP_EXPANSION * D}" if memory == "mlp" else ""
            chunk = _mlp_chunk(D, rule) if memory == "mlp" else CHUNK
            shape = f"B{B} H{H} T{T} D{D}{hidden} C{chunk} {str(dtype).replace('torch.', '')}"
            calls = {name: _ours(fn, rule, memory, chunk) for name, fn in impls.items()}
            if shared and fla is not None:
                calls["fla"] = fla
            for backward in (False, True):
                base, group = {}, []
                for impl, call in calls.items():
                    row = {"op": "titan_memory_update", "memory": memory, "impl": impl, "rule": rule, "shape": shape,
                           "pass": "fwd+bwd" if backward else "fwd"}
                    if impl == "eager" and rule == "dgd" and T > EAGER_MAX_TOKENS_DGD:
                        group.append(dict(row, skipped=f"per-token Python loop; T > {EAGER_MAX_TOKENS_DGD}"))
                        continue
                    if impl == "compile" and rule == "dgd" and not on_gpu:
                        group.append(dict(row, skipped="compiling the unrolled per-token loop takes minutes on 2 CPU cores"))
                        continue
                    try:
                        step = _step(call, args, state, backward)
                        step()  # compile / JIT outside the timing
                        ms = time_ms(step, device)
                        peak = peak_mb(step, device)
                    except Exception as exc:  # OOM or a peer that rejects the shape: report, go on
                        group.append(dict(row, error=repr(exc)[:300]))
                        if on_gpu:
                            torch.cuda.empty_cache()
                        continue
                    row.update(median_ms=round(ms, 3), peak_mb=None if peak is None else round(peak, 1))
                    if impl == "triton":
                        row.update(_kernel_stats())
                    base[impl] = ms
                    group.append(row)
                for row in group:
                    for ref in ("eager", "compile", "fla"):
                        if "median_ms" in row and ref in base and row["impl"] != ref:
                            row[f"speedup_vs_{ref}"] = round(base[ref] / row["median_ms"], 2)
                    yield row
            del args, state
            if on_gpu:
                torch.cuda.empty_cache()


#: tuning sweep on the GPU: (fwd_bv, bwd_bv, num_warps, num_stages)
TUNE_CONFIGS = [(64, 32, 4, None), (64, 32, 8, None), (64, 32, 8, 1), (32, 32, 4, 1), (32, 16, 4, None),
                (32, 16, 8, None), (16, 16, 4, None)]


def tune(device="cuda"):
    """Times the Triton kernels over TUNE_CONFIGS at the benchmark shapes (bf16, fwd and fwd+bwd)."""
    from hope_kernels.titan_memory_update.triton import launch as tk

    device = torch.device(device)
    saved = dict(tk.TUNING)
    try:
        for B, H, T, D in GPU_SHAPES:
            for rule in ("titans", "dgd"):
                args, state = _inputs(B, H, T, D, device, torch.bfloat16, momentum_zero=rule == "titans")
                for fwd_bv, bwd_bv, warps, stages in TUNE_CONFIGS:
                    tk.TUNING.update(fwd_bv=fwd_bv, bwd_bv=bwd_bv, num_warps=warps, num_stages=stages)
                    for backward in (False, True):
                        row = {"op": "titan_memory_update/tune", "impl": "triton", "rule": rule,
                               "shape": f"B{B} H{H} T{T} D{D} C{CHUNK} bf16", "pass": "fwd+bwd" if backward else "fwd",
                               "config": f"fwd_bv={fwd_bv} bwd_bv={bwd_bv} warps={warps} stages={stages}"}
                        try:
                            step = _step(_ours(titan_backend("triton"), rule), args, state, backward)
                            step()
                            row.update(median_ms=round(time_ms(step, device), 3), **_kernel_stats())
                        except Exception as exc:
                            row["error"] = repr(exc)[:300]
                        yield row
                del args, state
                torch.cuda.empty_cache()
    finally:
        tk.TUNING.update(saved)


if __name__ == "__main__":
    import sys

    for r in run(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")):
        print(r)
