"""``python -m hope.eval zeroshot|niah|continual ...``: one JSON per suite in <run>/eval/ (or --out), W&B log."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch


def _common(p):
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/eval)")
    p.add_argument("--memorize", action="store_true", help="also report _memorize variants (test-time memorisation)")
    p.add_argument("--memorize-paths", default="titan,cms", help="comma list from titan,cms")
    p.add_argument("--memorize-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-wandb", action="store_true")


def _parser():
    ap = argparse.ArgumentParser(prog="python -m hope.eval")
    sub = ap.add_subparsers(dest="suite", required=True)
    z = sub.add_parser("zeroshot", help="multiple choice by log-likelihood (acc, acc_norm)")
    z.add_argument("--checkpoint", required=True)
    z.add_argument("--tokenizer", default=None, help="default: the checkpoint's tokenizer (sha256 checked)")
    z.add_argument("--tasks", default="all", help="comma list of embedded task names, or FORMAT=PATH for "
                   "standard released files (piqa, hellaswag, winogrande, arc_easy, arc_challenge, boolq, siqa, "
                   "obqa, jsonl); 'all' = every embedded task")
    z.add_argument("--limit", type=int, default=None, help="first N items per task")
    _common(z)
    n = sub.add_parser("niah", help="needle in a haystack")
    n.add_argument("--checkpoint", required=True)
    n.add_argument("--tokenizer", default=None)
    n.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536", help="true token lengths")
    n.add_argument("--depths", default="0,0.25,0.5,0.75,1.0")
    n.add_argument("--kinds", default="passkey,number,uuid")
    n.add_argument("--seeds", type=int, default=3, help="haystacks per (kind, length, depth)")
    n.add_argument("--filler", default=None, help="filler text file (default: the shared KJV corpus)")
    _common(n)
    c = sub.add_parser("continual", help="sequential training on segments; loss matrix, forgetting, BWT")
    c.add_argument("--configs", nargs="+", default=["configs/smoke.yaml", "configs/titan_smoke.yaml",
                                                    "configs/transformer_smoke.yaml"])
    c.add_argument("--data", default="configs/data/continual_embedded.yaml")
    c.add_argument("--segments", default=None, help="comma list of segment (source) names; default all")
    c.add_argument("--steps-per-segment", type=int, default=100)
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--val-sequences", type=int, default=32)
    c.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="train-config overrides applied to every --configs entry (e.g. mode=online)")
    _common(c)
    return ap


def _paths(s):
    paths = tuple(x for x in s.split(",") if x)
    bad = [x for x in paths if x not in ("titan", "cms")]
    if bad or not paths:
        raise ValueError(f"--memorize-paths must be a comma list from titan,cms, got {s!r}")
    return paths


def _write(out_dir: Path, suite: str, result: dict, run_dir, no_wandb: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite}.json"
    if not no_wandb:
        from hope.eval.wandb_log import log_results
        flat = {}
        for k, v in result.get("metrics", {}).items():
            if isinstance(v, dict):
                flat.update({f"{k}/{m}": x for m, x in v.items() if isinstance(x, (int, float))})
        result["wandb"] = log_results(run_dir or out_dir, suite, flat)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)  # atomic: a killed eval never leaves a half-written JSON
    print(f"wrote {path}")
    return path


def run_zeroshot(a) -> dict:
    from hope.eval.loading import load_for_eval
    from hope.eval.tasks import embedded_task_names, load_task
    from hope.eval.zeroshot import evaluate_items

    model, tok, state, run_dir = load_for_eval(a.checkpoint, a.tokenizer, a.device)
    names = embedded_task_names() if a.tasks == "all" else [t for t in a.tasks.split(",") if t]
    metrics = {}
    for spec in names:
        name, _, path = spec.partition("=")
        items = load_task(name, path or None)
        if a.limit:
            items = items[:a.limit]
        t0 = time.time()
        metrics[name] = evaluate_items(model, tok, items, batch_size=a.batch_size, memorize=a.memorize,
                                       memorize_paths=_paths(a.memorize_paths), memorize_steps=a.memorize_steps,
                                       desc=name)
        metrics[name]["seconds"] = round(time.time() - t0, 2)
        print(name, {k: round(v, 4) for k, v in metrics[name].items()}, flush=True)
    keys = [k for k in ("acc", "acc_norm", "acc_memorize", "acc_norm_memorize") if k in next(iter(metrics.values()))]
    metrics["average"] = {k: sum(m[k] for m in metrics.values()) / len(metrics) for k in keys}
    return {"suite": "zeroshot", "arch": model.config.arch, "step": state.get("step"), "checkpoint": str(a.checkpoint),
            "memorize": {"enabled": a.memorize, "paths": a.memorize_paths, "steps": a.memorize_steps},
            "metrics": metrics, "_run_dir": run_dir}


def run_niah(a) -> dict:
    from hope.eval.loading import load_for_eval
    from hope.eval.niah import default_filler_path, run_niah as run, summarize, write_csv_and_plot

    model, tok, state, run_dir = load_for_eval(a.checkpoint, a.tokenizer, a.device)
    filler = Path(a.filler) if a.filler else default_filler_path()
    rows = run(model, tok, filler.read_text(encoding="utf-8"), lengths=[int(x) for x in a.lengths.split(",")],
               depths=[float(x) for x in a.depths.split(",")], kinds=a.kinds.split(","),
               seeds=[a.seed + i for i in range(a.seeds)], memorize=a.memorize,
               memorize_paths=_paths(a.memorize_paths), memorize_steps=a.memorize_steps)
    plots = Path(a.out) / "plots" if a.out else Path("reports") / "plots"
    csv_path, png = write_csv_and_plot(rows, plots, f"niah_{model.config.arch}")
    return {"suite": "niah", "arch": model.config.arch, "step": state.get("step"), "checkpoint": str(a.checkpoint),
            "metrics": {"niah": summarize(rows)}, "rows": rows, "csv": str(csv_path), "plot": str(png),
            "_run_dir": run_dir}


def run_continual(a) -> dict:
    from hope.data.prepare import PreparedData, load_manifest, prepare
    from hope.eval.continual import train_sequentially
    from hope.models import build_model, model_config_for
    from hope.train.config import load_config
    from hope.train.trainer import seed_everything

    manifest = load_manifest(a.data)
    prepare(manifest)
    data = PreparedData.open(manifest.out_dir)
    names = a.segments.split(",") if a.segments else [s.name for s in manifest.sources]
    train = [data.sequences(n, "train", a.seq_len) for n in names]
    val = [data.sequences(n, "val", a.seq_len)[:a.val_sequences] for n in names]
    vocab = int(data.index["tokenizer"]["vocab_size"])
    results = {}
    for cfg_path in a.configs:
        cfg = load_config(cfg_path, a.set or None)
        seed_everything(a.seed)
        model = build_model(model_config_for(cfg.model, vocab, seq_len=cfg.seq_len)).to(a.device)
        t0 = time.time()
        r = train_sequentially(model, train, val, steps_per_segment=a.steps_per_segment, batch_size=a.batch_size,
                               train_cfg=cfg, seed=a.seed)
        r["seconds"] = round(time.time() - t0, 1)
        r["parameters"] = model.num_parameters()
        results[model.config.arch] = r
    metrics = {arch: {k: v for k, v in r.items() if not isinstance(v, list)} for arch, r in results.items()}
    return {"suite": "continual", "segments": names, "steps_per_segment": a.steps_per_segment,
            "batch_size": a.batch_size, "seq_len": a.seq_len, "overrides": a.set, "results": results, "metrics": metrics,
            "_run_dir": None}


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    try:
        result = {"zeroshot": run_zeroshot, "niah": run_niah, "continual": run_continual}[a.suite](a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = result.pop("_run_dir")
    out = Path(a.out) if a.out else (Path(run_dir) / "eval" if run_dir else Path("reports") / "eval")
    _write(out, a.suite, result, run_dir, a.no_wandb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
