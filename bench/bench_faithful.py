"""Faithful HOPE on the embedded corpus, side by side at equal tokens and the same seed (one script, one JSON, one
PNG): smoke HOPE before (a checkout of the code before the continual CMS: parallel mode, slow-weight inner updates)
and after (the continual CMS, the paper defaults), the CMS ablation (``cms_mode=static``), HOPE vs TITAN (MAG,
persistent tokens) vs Transformer++; then the trained HOPE's validation loss with its CMS read in each mode (the
chunk-parallel approximation against the exact sequential form), and the step cost of each CMS mode measured in
one process (interleaved repeats, median).

    flock /tmp/hope-bench.lock python bench/bench_faithful.py --before /tmp/hope-before
    flock /tmp/hope-bench.lock python bench/bench_faithful.py --before /tmp/hope-before --steps 40 --skip-extras \
        --arms hope_after,flag_rule_titans,flag_adaptive_q,...   (the named deviations)
    flock /tmp/hope-bench.lock python bench/bench_faithful.py --before /tmp/hope-before --steps 100 --skip-extras \
        --arms hope_after,hope_gen_chunk_16,hope_gen_chunk_32   (the generator chunk)

Every arm is ``python -m hope.train configs/smoke.yaml`` in a subprocess (the before arm with its checkout on
PYTHONPATH and its own configs/smoke.yaml), with the same overrides: steps, batch, sequence length, evaluation
batches, seed, one shared prepared corpus. Tokens/s is the tokens of a step over the median step time.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# name -> (checkout: "before" or "after", model overrides as a YAML flow mapping, extra trainer overrides)
ARMS = {
    "hope_before": ("before", "{preset: smoke-hope, teach_signal: exact}", {}),
    "hope_after": ("after", "{preset: smoke-hope}", {}),
    "hope_after_static_cms": ("after", "{preset: smoke-hope, cms_mode: static}", {}),
    "titan_mag": ("after", "{preset: smoke-titan}", {}),
    "transformer": ("after", "{preset: smoke-transformer}", {}),
    # one named deviation each (docs/equations.md, "HOPE: paper vs flags"), against hope_after
    "flag_rule_titans": ("after", "{preset: smoke-hope, rule: titans}", {}),
    "flag_adaptive_q": ("after", "{preset: smoke-hope, adaptive_q: true}", {}),
    "flag_paper_v": ("after", "{preset: smoke-hope, normalize_v: false}", {}),
    "flag_after_update": ("after", "{preset: smoke-hope, mem_readout: after_update}", {}),
    "flag_selfmod_momentum": ("after", "{preset: smoke-hope, selfmod_momentum: true}", {}),
    "flag_update_clip": ("after", "{preset: smoke-hope, gen_update_clip: 0.1, mem_update_clip: 0.5}", {}),
    "flag_teach_shared": ("after", "{preset: smoke-hope, teach_signal: shared}", {}),
    # every former self-modifying default at once, with the continual CMS
    "flag_all_former_selfmod": ("after", "{preset: smoke-hope, rule: titans, adaptive_q: true, "
                                "mem_readout: after_update, selfmod_momentum: true, gen_update_clip: 0.1, "
                                "mem_update_clip: 0.5}", {}),
    # the generator chunk (the self-modifying layer's update granularity; default 8): quality against hope_after
    "hope_gen_chunk_16": ("after", "{preset: smoke-hope, gen_chunk_size: 16}", {}),
    "hope_gen_chunk_32": ("after", "{preset: smoke-hope, gen_chunk_size: 32}", {}),
}
MAIN_ARMS = ("hope_before", "hope_after", "hope_after_static_cms", "titan_mag", "transformer")
GEN_CHUNK_ARMS = ("hope_after", "hope_gen_chunk_16", "hope_gen_chunk_32")


def run_arm(name, checkout: Path, model: str, args, out_dir: Path, env) -> dict:
    """Train one arm in a subprocess; returns its val losses, losses, skipped steps and step times."""
    run_dir = out_dir / name
    overrides = [f"name={name}", f"run_dir={run_dir}", f"steps={args.steps}", f"batch_size={args.batch}",
                 f"seq_len={args.seq}", f"eval_every={max(1, args.steps // 4)}", f"eval_batches={args.eval_batches}",
                 f"ckpt_every={args.steps}", f"seed={args.seed}", f"threads={args.threads}", "log.wandb=disabled",
                 "log.progress=false", "log.plot=false", f"data.overrides=[out_dir={args.data_dir}]",
                 f"model={model}"]
    config = checkout / "configs" / "smoke.yaml"  # the before checkout's file; the package's named config since
    cmd = [sys.executable, "-m", "hope.train", str(config) if config.exists() else "smoke", *overrides]
    t0 = time.perf_counter()
    try:  # a diverging run can roll back to its step-0 checkpoint over and over: bounded
        proc = subprocess.run(cmd, cwd=checkout, env={**env, "PYTHONPATH": str(checkout)}, capture_output=True,
                              text=True, timeout=args.arm_timeout_s)
        finished, stderr = proc.returncode == 0, proc.stderr
    except subprocess.TimeoutExpired as e:
        finished, stderr = False, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else ""
    wall = time.perf_counter() - t0
    log = run_dir / "log.jsonl"
    if not log.exists():
        raise RuntimeError(f"{name} failed before training:\n{stderr[-4000:]}")
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    train = [r for r in lines if r.get("event") == "train"]
    evals = [r for r in lines if r.get("event") == "eval"]
    skipped = [r for r in lines if r.get("event") == "skipped"]
    step_times = [r["step_time_s"] for r in train]
    tokens_per_step = args.batch * args.seq
    return {"checkout": str(checkout), "model": model, "wall_s": wall, "finished": finished,
            "skipped_steps": len(skipped), "rollbacks": sum(r.get("event") == "rollback" for r in lines),
            "first_skip": skipped[0] if skipped else None,
            "train_loss": [(r["step"], r["loss"]) for r in train],
            "val_loss": [(r["step"], r["val_loss"]) for r in evals],
            "final_val_loss": evals[-1]["val_loss"] if finished and evals else float("nan"),
            "median_step_s": statistics.median(step_times), "tokens_per_s": tokens_per_step / statistics.median(step_times),
            "max_generator_update_norm": max((r.get("generator_update_norm", 0.0) for r in train), default=0.0),
            "max_memory_clip_fraction": max((r.get("memory_clip_fraction", 0.0) for r in train), default=0.0),
            "run_dir": str(run_dir)}


def cms_mode_losses(run_dir: Path, args) -> dict:
    """The trained HOPE's validation loss with its CMS read chunk-parallel, sequentially (exact) and statically, on
    the trainer's validation batches (same weights)."""
    from safetensors.torch import load_file

    from hope.data import prepare
    from hope.models import ModelConfig, build_model

    step_dir = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    cfg = ModelConfig.from_dict(json.loads((step_dir / "state.json").read_text())["model_config"])
    weights = load_file(str(step_dir / "model.safetensors"))
    prepared = prepare(REPO / "configs" / "data" / "embedded.yaml", [f"out_dir={args.data_dir}"], progress=False)
    val = prepared.build_loader("val", args.batch, args.seq, seed=args.seed)
    batches = [b for _, b in zip(range(args.eval_batches), val)]
    out = {}
    for mode in ("chunk_parallel", "sequential", "static"):
        model = build_model(cfg.replace(cms_mode=mode)).eval()
        model.load_state_dict(weights)
        with torch.no_grad():
            losses = [float(model(b["input_ids"], labels=b["labels"]).loss) for b in batches]
        out[mode] = sum(losses) / len(losses)
    return out


def cms_mode_step_cost(args) -> dict:
    """Median fwd+bwd seconds of the smoke HOPE per CMS mode, interleaved repeats in this process."""
    from hope.models import build_model, preset

    torch.manual_seed(args.seed)
    ids = torch.randint(0, 4096, (args.batch, args.seq))
    labels = torch.roll(ids, -1, 1)
    models = {m: build_model(preset("smoke-hope", vocab_size=4096, cms_mode=m)).train()
              for m in ("static", "chunk_parallel", "sequential")}
    for m in models.values():
        m.load_state_dict(models["static"].state_dict())
    times = {m: [] for m in models}
    for _ in range(args.cost_repeats):
        for name, model in models.items():
            t = time.perf_counter()
            model(ids, labels=labels).loss.backward()
            times[name].append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"median_s": med, "chunk_parallel_over_static": med["chunk_parallel"] / med["static"],
            "sequential_over_static": med["sequential"] / med["static"], "repeats": args.cost_repeats}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = results["arms"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, r in arms.items():
        axes[0].plot(*zip(*r["val_loss"]), marker="o", label=name)
    axes[0].set(xlabel="step", ylabel="val loss", title=f"validation loss ({results['tokens_per_arm']:,} tokens)")
    axes[0].legend(fontsize=8)
    names = list(arms)
    done = [n for n in names if arms[n]["finished"]]
    axes[1].bar(done, [arms[n]["final_val_loss"] for n in done])
    axes[1].set(title="final val loss (runs that finished)",
                ylim=(min((arms[n]["final_val_loss"] for n in done), default=0.3) - 0.3, None))
    axes[2].bar(names, [arms[n]["tokens_per_s"] for n in names])
    axes[2].set(title="train tokens/s (median step)")
    for ax in axes[1:]:
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.suptitle(results["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="checkout of the code before the continual CMS")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (1: on a loaded shared machine 2 threads spin-wait)")
    ap.add_argument("--cost-repeats", type=int, default=5)
    ap.add_argument("--arm-timeout-s", type=float, default=5400.0, help="a run still going after this is stopped")
    ap.add_argument("--arms", default=",".join(MAIN_ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    ap.add_argument("--skip-extras", action="store_true",
                    help="only the arms: no CMS-mode losses of the trained HOPE, no in-process step cost")
    ap.add_argument("--data-dir", default="/tmp/hope-bench-data/embedded")
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/hope-bench-runs"))
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--merge-into", type=Path, default=None,
                    help="an earlier results JSON: this run's arms replace or join its arms (same settings required)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = dict(os.environ)
    env.setdefault("HOPE_SHARED_DATA", str((REPO / ".." / "shared" / "data").resolve()))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = args.out_dir / stamp
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
               f"{args.threads} threads")
    results = {"date": stamp, "machine": machine, "steps": args.steps, "batch": args.batch, "seq_len": args.seq,
               "seed": args.seed, "tokens_per_arm": args.steps * args.batch * args.seq, "arms": {}}
    checkouts = {"before": args.before.resolve(), "after": REPO}
    for name in args.arms.split(","):
        where, model, _ = ARMS[name]
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        results["arms"][name] = run_arm(name, checkouts[where], model, args, out_dir, env)
        r = results["arms"][name]
        print(f"    val {r['final_val_loss']:.4f}  {r['tokens_per_s']:.1f} tok/s  skipped {r['skipped_steps']}  "
              f"finished {r['finished']}", flush=True)
    if "hope_after" in results["arms"] and results["arms"]["hope_after"]["finished"] and not args.skip_extras:
        print(f"[{time.strftime('%H:%M:%S')}] CMS modes on the trained HOPE ...", flush=True)
        results["hope_after_val_loss_by_cms_mode"] = cms_mode_losses(Path(results["arms"]["hope_after"]["run_dir"]), args)
        print("    ", results["hope_after_val_loss_by_cms_mode"], flush=True)
    if not args.skip_extras:
        print(f"[{time.strftime('%H:%M:%S')}] step cost per CMS mode ...", flush=True)
        results["cms_mode_step_cost"] = cms_mode_step_cost(args)
        print("    ", results["cms_mode_step_cost"], flush=True)
    if args.merge_into is not None:
        earlier = json.loads(args.merge_into.read_text())
        for key in ("steps", "batch", "seq_len", "seed"):
            if earlier[key] != results[key]:
                raise ValueError(f"--merge-into: {key} {earlier[key]} differs from this run's {results[key]}")
        earlier["arms"].update(results["arms"])
        earlier.setdefault("merged", []).append({"date": stamp, "arms": list(results["arms"])})
        results = earlier
    arms = results["arms"]
    if {"hope_before", "hope_after"} <= set(arms):
        results["after_over_before_step_time"] = arms["hope_after"]["median_step_s"] / arms["hope_before"]["median_step_s"]
    args.results.mkdir(parents=True, exist_ok=True)
    tag = ("main" if set(results["arms"]) <= set(MAIN_ARMS) else
           "gen-chunk" if set(results["arms"]) <= set(GEN_CHUNK_ARMS) else "flags")
    path = args.merge_into if args.merge_into is not None else args.results / f"faithful-{tag}-cpu-{stamp}.json"
    path.write_text(json.dumps(results, indent=1))
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
