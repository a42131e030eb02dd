"""Dispatched ops and CPU throughput of HOPE vs TITAN vs Transformer++ (the fused self-modifying layer's measure).

Three measurements, ``python bench/bench_layer_ops.py [ops] [speed] [layer] [--threads N] [--json FILE]``:

- ``ops``: the number of ops dispatched (``TorchDispatchMode``: every aten op and every ``hope::`` custom op that
  reaches the dispatcher, counted once however many kernels it launches inside) for one pilot-size block (d 768,
  12 heads; HOPE: HopeBlock, TITAN: TitanBlock (MAG), Transformer++: TransformerBlock) at B 1, T 2048, forward
  and backward. Dispatch overhead, not FLOPs, is what this counts: a step whose blocks dispatch hundreds of
  thousands of ops is bound by launches on any GPU.
- ``speed``: tokens/s of the smoke presets (B 8, T 128, forward + backward of the LM loss), the three models in one
  process, interleaved step by step, median over repeats; the ratios to Transformer++ are the result.
- ``layer``: the self-modifying Titans layer alone, forward + backward, on the fused op and on its loop
  (``fused=False``), interleaved, median over repeats, at the smoke and pilot sizes.
- ``profile``: where one smoke HOPE step goes (``torch.profiler``): the fused op's forward and backward (self time,
  calls) against everything else the step runs.
- ``flops``: model FLOPs of one smoke step (forward + backward of the LM loss, B 8, T 128) per model, counted by
  ``torch.utils.flop_counter`` (matrix products and convolutions); HOPE on its reference path (the layer's loop and
  the reference kernels, every product visible to the counter; the fused op computes the same recurrences), and with
  the ``speed`` rows of the same run, each model's GFLOP/s.

``--json FILE`` also writes FILE with a ``.png`` suffix: tokens/s of the smoke presets, the step's split and the
layer's fused-vs-loop times.

HOPE's ops row is measured on the fused op and on the loop (``hope_fused`` true / false).

Value checks (a GPU sync each) are off in both, as in training. Every row also says which backend the HOPE layer
ran (``hope_layer_path``). Machine and torch version go in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ARCHS = ("hope", "titan", "transformer")
PILOT_PRESETS = {"hope": "pilot-hope", "titan": "pilot-titan", "transformer": "pilot-transformer"}
SMOKE_PRESETS = {"hope": "smoke-hope", "titan": "smoke-titan", "transformer": "smoke-transformer"}
ARCH_COLORS = {"hope": "C3", "titan": "C1", "transformer": "C0"}  # one color per model in every plot


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched while active (by name in ``counts``)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _block(arch: str, fused: bool = True, **overrides):
    from hope.models import build_model, preset

    cfg = preset(PILOT_PRESETS[arch], **overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    if arch == "hope":
        model.blocks[0].titans.fused = fused
    return model.blocks[0], cfg


def _block_step(arch: str, block, x):
    """Forward + backward of one block with the model's own calling convention."""
    if arch == "hope":
        y = block(x, None, False)[0]
    elif arch == "titan":
        y = block(x, None, 0)[0]
    else:
        y = block(x)
    y.float().square().mean().backward()


def hope_layer_path(layer) -> str:
    """Which path the self-modifying layer's last forward took: the fused op's backend, or ``reference`` (its loop)."""
    return getattr(layer, "fused_path", None) or "reference"


def _profiler_aten_ops(fn) -> int:
    """aten ops ``torch.profiler`` records during ``fn()``: also the composite ops (aten::linear and the aten::mm it
    calls count twice), so larger than the dispatch count."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def _count_once(arch: str, block, x, profiler: bool) -> tuple[OpCounter, int | None]:
    from hope_kernels._checks import value_checks_off

    with value_checks_off():
        block.zero_grad(set_to_none=True)
        counter = OpCounter()
        with counter:
            _block_step(arch, block, x)
        prof = None
        if profiler:
            block.zero_grad(set_to_none=True)
            prof = _profiler_aten_ops(lambda: _block_step(arch, block, x))
    return counter, prof


#: where the reference HOPE layer's count is fitted (its autograd graph at T 2048 needs over 6 GiB)
REFERENCE_FIT_T = (128, 256, 384)


def count_block_ops(arch: str, T: int = 2048, B: int = 1, profiler: bool = False, fit_T: tuple[int, ...] | None = None,
                    fused: bool = True, **overrides) -> dict:
    """Ops dispatched by one pilot-size block, forward + backward (after a warm-up call that is not counted).

    ``fit_T`` (three sequence lengths): count there and extrapolate to ``T`` instead of running it. For a layer
    that loops over chunks in Python the count is affine in T when T is a multiple of every chunk size; the three
    points must be collinear (checked), so the extrapolation is exact. None: ``REFERENCE_FIT_T`` for the HOPE layer
    on its reference path, else measured at T.
    """
    from hope_kernels._checks import value_checks_off

    block, cfg = _block(arch, fused, **overrides)
    g = torch.Generator().manual_seed(0)
    x_all = torch.randn(B, max((T, *REFERENCE_FIT_T)), cfg.d_model, generator=g) * 0.5
    with value_checks_off():  # warm-up: lazy imports, caches; tells which path the HOPE layer takes
        _block_step(arch, block, x_all[:, :64].clone().requires_grad_())
    if fit_T is None:
        fit_T = REFERENCE_FIT_T if arch == "hope" and hope_layer_path(block.titans) == "reference" else ()
    row = {"measure": "ops", "arch": arch, "preset": PILOT_PRESETS[arch], "B": B, "T": T, **overrides}
    if fit_T:
        if len(fit_T) != 3:
            raise ValueError(f"fit_T must hold three sequence lengths, got {fit_T!r}")
        counts = [_count_once(arch, block, x_all[:, :t].clone().requires_grad_(), False)[0].total for t in fit_T]
        slope = (counts[1] - counts[0]) / (fit_T[1] - fit_T[0])
        if counts[0] + slope * (fit_T[2] - fit_T[0]) != counts[2]:
            raise RuntimeError(f"op counts {counts} at T={fit_T} are not affine in T: cannot extrapolate")
        row.update(ops=round(counts[0] + slope * (T - fit_T[0])), ops_method=f"affine fit at T={list(fit_T)}",
                   fit_counts=counts)
    else:
        counter, prof = _count_once(arch, block, x_all[:, :T].clone().requires_grad_(), profiler)
        row.update(ops=counter.total, ops_method="measured", top_ops=dict(counter.counts.most_common(8)))
        if prof is not None:
            row["profiler_aten_ops"] = prof
    if arch == "hope":
        row.update(hope_fused=fused, hope_layer_path=hope_layer_path(block.titans))
    return row


def _smoke_step(model, tokens):
    out = model(tokens[:, :-1], labels=tokens[:, 1:])
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def smoke_speed(reps: int = 9, B: int = 8, T: int = 128, threads: int | None = None, **hope_overrides) -> list[dict]:
    """Tokens/s of the three smoke presets, forward + backward, interleaved in one process; ratios to Transformer++."""
    from hope.models import build_model, preset
    from hope_kernels._checks import value_checks_off

    if threads:
        torch.set_num_threads(threads)
    models, steps = {}, {}
    g = torch.Generator().manual_seed(0)
    for arch in ARCHS:
        cfg = preset(SMOKE_PRESETS[arch], **(hope_overrides if arch == "hope" else {}))
        torch.manual_seed(0)
        models[arch] = build_model(cfg)
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
        steps[arch] = (lambda m=models[arch], t=tokens: _smoke_step(m, t))
    times = {arch: [] for arch in ARCHS}
    with value_checks_off():
        for step in steps.values():
            step()  # warm-up
        for _ in range(reps):
            for arch, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[arch].append(time.perf_counter() - t0)
    rows = []
    base = B * T / statistics.median(times["transformer"])
    for arch in ARCHS:
        med = statistics.median(times[arch])
        row = {"measure": "speed", "arch": arch, "preset": SMOKE_PRESETS[arch], "B": B, "T": T, "reps": reps,
               "median_step_ms": round(med * 1e3, 1), "min_step_ms": round(min(times[arch]) * 1e3, 1),
               "tokens_per_s": round(B * T / med), "vs_transformer": round(B * T / med / base, 3)}
        if arch == "hope":
            row["hope_layer_path"] = hope_layer_path(models["hope"].blocks[0].titans)
            row.update({k: v for k, v in hope_overrides.items()})
        rows.append(row)
    return rows


#: (name, B, T, d_model, heads) of the layer timing: the smoke and pilot presets' layer
LAYER_SIZES = (("smoke", 8, 128, 128, 4), ("pilot", 1, 512, 768, 12))


def layer_speed(reps: int = 5, sizes=LAYER_SIZES, **layer_kwargs) -> list[dict]:
    """The self-modifying Titans layer forward + backward on the fused op vs its loop: interleaved, median ms."""
    from hope.layers.self_modifying import SelfModifyingTitans
    from hope_kernels._checks import value_checks_off

    rows = []
    for name, B, T, dim, heads in sizes:
        torch.manual_seed(0)
        layers = {"fused": SelfModifyingTitans(dim, heads, **layer_kwargs)}
        layers["loop"] = SelfModifyingTitans(dim, heads, fused=False, **layer_kwargs)
        layers["loop"].load_state_dict(layers["fused"].state_dict())
        x = torch.randn(B, T, dim, generator=torch.Generator().manual_seed(0)) * 0.5
        times = {k: [] for k in layers}

        def step(layer):
            layer.zero_grad(set_to_none=True)
            y, _, _ = layer(x)
            y.square().mean().backward()

        with value_checks_off():
            for layer in layers.values():
                step(layer)  # warm-up
            for _ in range(reps):
                for k, layer in layers.items():
                    t0 = time.perf_counter()
                    step(layer)
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"measure": "layer", "size": name, "B": B, "T": T, "d_model": dim, "heads": heads, "reps": reps,
                     **layer_kwargs, "hope_layer_path": hope_layer_path(layers["fused"]),
                     "fused_ms": round(med["fused"] * 1e3, 1), "loop_ms": round(med["loop"] * 1e3, 1),
                     "loop_over_fused": round(med["loop"] / med["fused"], 2)})
    return rows


def step_profile(reps: int = 3, **hope_overrides) -> dict:
    """One smoke HOPE step (after ``reps`` warm-ups) under ``torch.profiler``: seconds in the fused op's kernels
    (self time of its forward and backward operators) and in the rest of the step."""
    from hope.models import build_model, preset
    from hope_kernels._checks import value_checks_off

    cfg = preset(SMOKE_PRESETS["hope"], **hope_overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (8, 129), generator=torch.Generator().manual_seed(0))
    with value_checks_off():
        for _ in range(reps):
            _smoke_step(model, tokens)
        with torch.profiler.profile() as prof:
            t0 = time.perf_counter()
            _smoke_step(model, tokens)
            step_s = time.perf_counter() - t0
    ops = {e.key: e for e in prof.key_averages() if "self_modifying_titans" in e.key and "::" in e.key
           and not e.key.startswith(("autograd", "Generated"))}
    row = {"measure": "profile", "preset": SMOKE_PRESETS["hope"], "B": 8, "T": 128, **hope_overrides,
           "step_s": round(step_s, 3), "hope_layer_path": hope_layer_path(model.blocks[0].titans)}
    kernel_s = 0.0
    for key, e in sorted(ops.items()):
        if key.startswith("hope::"):  # the custom op around the kernel operator: its time is the kernel's
            continue
        row[key] = {"s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count}
        kernel_s += e.self_cpu_time_total / 1e6
    row["kernels_s"], row["rest_s"] = round(kernel_s, 3), round(step_s - kernel_s, 3)
    return row


def _count_cpu_attention() -> None:
    """torch's FLOP counter has formulas for the CUDA attention kernels only: counts the CPU flash kernel, forward and
    backward, with the same formulas (the full T x T, as torch counts the CUDA ones)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd, bwd = aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd in fc.flop_registry or fwd.default in fc.flop_registry:
        return

    @fc.register_flop_formula(fwd)
    def _fwd(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    @fc.register_flop_formula(bwd)
    def _bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)


def smoke_flops(B: int = 8, T: int = 128) -> list[dict]:
    """Model FLOPs of one smoke step per model (see the module docstring). The depthwise causal conv's backward is
    counted as twice its forward: the counter's convolution_backward formula does not divide by the groups (it
    reports a 384-channel depthwise conv's backward 384x too large)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hope.models import build_model, preset
    from hope_kernels._checks import value_checks_off

    _count_cpu_attention()
    rows = []
    for arch in ARCHS:
        cfg = preset(SMOKE_PRESETS[arch], **({"backend": "reference"} if arch == "hope" else {}))
        torch.manual_seed(0)
        model = build_model(cfg)
        if arch == "hope":
            for block in model.blocks:
                block.titans.fused = False
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
        with value_checks_off(), FlopCounterMode(display=False) as counter:
            model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
        by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        conv = 2 * by_op.get("aten.convolution", 0) if by_op.pop("aten.convolution_backward", 0) else 0
        total = sum(by_op.values()) + conv
        rows.append({"measure": "flops", "arch": arch, "preset": SMOKE_PRESETS[arch], "B": B, "T": T,
                     "gflop_per_step": round(total / 1e9, 3),
                     "by_op_gflop": {k: round(v / 1e9, 3) for k, v in sorted(by_op.items())}
                     | ({"aten.convolution_backward (2x forward)": round(conv / 1e9, 3)} if conv else {})})
    base = next(r["gflop_per_step"] for r in rows if r["arch"] == "transformer")
    for r in rows:
        r["vs_transformer"] = round(r["gflop_per_step"] / base, 2)
    return rows


def with_flop_rates(rows: list[dict]) -> None:
    """Adds GFLOP/s to the flops rows from the first speed row of each model in ``rows``."""
    step_ms = {}
    for r in rows:
        if r["measure"] == "speed" and "gen_chunk_size" not in r:
            step_ms.setdefault(r["arch"], r["median_step_ms"])
    for r in rows:
        if r["measure"] == "flops" and r["arch"] in step_ms:
            r["gflop_per_s"] = round(r["gflop_per_step"] / (step_ms[r["arch"]] / 1e3), 1)


def plot(rows: list[dict], path: str) -> None:
    """Smoke tokens/s per model, the HOPE step's split (kernels vs rest), the layer's fused vs loop times and, with
    flops rows, each model's FLOPs per step and FLOP rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in rows if r["measure"] == "speed"]
    prof = [r for r in rows if r["measure"] == "profile"]
    layer = [r for r in rows if r["measure"] == "layer"]
    flops = [r for r in rows if r["measure"] == "flops"]
    # the first group's three models, then HOPE at each further generator chunk
    speed = speed[:3] + [r for r in speed[3:] if r["arch"] == "hope"]
    panels = [name for name, rs in (("speed", speed), ("profile", prof), ("layer", layer), ("flops", flops)) if rs]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    ax_of = dict(zip(panels, axes[0]))
    if speed:
        ax = ax_of["speed"]
        labels = [r["arch"] + (f' (gen chunk {r["gen_chunk_size"]})' if "gen_chunk_size" in r else "") for r in speed]
        ax.bar(labels, [r["tokens_per_s"] for r in speed], color=[ARCH_COLORS[r["arch"]] for r in speed])
        ax.tick_params(axis="x", labelrotation=20)
        for i, r in enumerate(speed):
            ax.text(i, r["tokens_per_s"], f'{r["vs_transformer"]:.3f}x', ha="center", va="bottom")
        ax.set_yscale("log")
        ax.set_title("smoke presets, fwd+bwd tokens/s (vs Transformer++)")
    if prof:
        ax, r = ax_of["profile"], prof[-1]
        ax.bar(["self_modifying_titans kernels", "rest of the step"], [r["kernels_s"], r["rest_s"]], color=["C3", "C7"])
        ax.set_ylabel("s per step")
        ax.set_title(f'one smoke HOPE step: {r["step_s"]:.2f} s')
    if layer:
        ax = ax_of["layer"]
        xs = range(len(layer))
        ax.bar([x - 0.2 for x in xs], [r["fused_ms"] for r in layer], 0.4, label="fused op")
        ax.bar([x + 0.2 for x in xs], [r["loop_ms"] for r in layer], 0.4, label="layer loop")
        ax.set_xticks(list(xs), [r["size"] for r in layer])
        ax.set_ylabel("ms, fwd+bwd")
        ax.set_title("self-modifying Titans layer")
        ax.legend()
    if flops:
        ax = ax_of["flops"]
        ax.bar([r["arch"] for r in flops], [r["gflop_per_step"] for r in flops],
               color=[ARCH_COLORS[r["arch"]] for r in flops])
        for i, r in enumerate(flops):
            rate = f'\n{r["gflop_per_s"]:.0f} GFLOP/s' if "gflop_per_s" in r else ""
            ax.text(i, r["gflop_per_step"], f'{r["vs_transformer"]:.2f}x{rate}', ha="center", va="bottom")
        ax.set_ylim(0, 1.25 * max(r["gflop_per_step"] for r in flops))
        ax.set_ylabel("GFLOP per step (model FLOPs)")
        ax.set_title("smoke step FLOPs (vs Transformer++)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}


def _ops_kwargs(arch: str, rule: str | None, profiler: bool = False) -> dict:
    """Arguments of count_block_ops for ``arch``: the rule for the memory archs."""
    kw = {"rule": rule} if rule and arch != "transformer" else {}
    return dict(kw, profiler=profiler)


def run(device="cpu"):
    """Rows for bench/gpu_suite-style callers (CPU only: the op count does not depend on the device)."""
    if str(device) != "cpu":
        return
    for rule in ("titans", "dgd"):
        for arch in ARCHS:
            yield count_block_ops(arch, **_ops_kwargs(arch, rule))
    yield from smoke_speed()
    yield from layer_speed()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="*", default=["all"], choices=("ops", "speed", "layer", "profile", "flops", "all"))
    ap.add_argument("--json", help="write the rows and the machine to this file")
    ap.add_argument("--machine-note", default="", help="what the machine is (shared, cores), stored with the rows")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--T", type=int, default=2048, help="tokens of the op-count block (default 2048)")
    ap.add_argument("--profiler", action="store_true", help="ops: also count aten ops with torch.profiler")
    ap.add_argument("--rule", choices=("titans", "dgd"), help="override the HOPE / TITAN memory rule")
    ap.add_argument("--gen-chunk-size", type=int, nargs="+",
                    help="HOPE generator chunks: speed rows for the preset's, then for each of these (layer and "
                         "profile: the preset's)")
    ap.add_argument("--threads", type=int, help="torch threads (1 on a shared machine: a busy core stalls the others)")
    ap.add_argument("--no-loop", action="store_true", help="ops: skip the HOPE layer's loop (its count is slow)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    over = {"rule": args.rule} if args.rule else {}
    rows = []
    if {"ops", "all"} & set(args.what):
        for arch, fused in (("hope", True), ("hope", False), ("titan", True), ("transformer", True)):
            if not fused and args.no_loop:
                continue
            row = count_block_ops(arch, T=args.T, fused=fused, **_ops_kwargs(arch, args.rule, args.profiler))
            print(json.dumps(row), flush=True)
            rows.append(row)
    chunks = args.gen_chunk_size or []
    if {"speed", "all"} & set(args.what):
        for extra in [{}] + [{"gen_chunk_size": c} for c in chunks]:  # the HOPE rows of each generator chunk
            for row in smoke_speed(reps=args.reps, **over, **extra):
                print(json.dumps(row), flush=True)
                rows.append(row)
    if {"layer", "all"} & set(args.what):
        for row in layer_speed(reps=max(3, args.reps // 2), **over):
            print(json.dumps(row), flush=True)
            rows.append(row)
    if {"profile", "all"} & set(args.what):
        row = step_profile(**over)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if {"flops", "all"} & set(args.what):
        flops = smoke_flops()
        rows.extend(flops)
        with_flop_rates(rows)
        for row in flops:
            print(json.dumps(row), flush=True)
    if args.json:
        plot(rows, os.path.splitext(args.json)[0] + ".png")
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"machine": {**machine(), "note": args.machine_note}, "rows": rows}, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    sys.exit(main())
