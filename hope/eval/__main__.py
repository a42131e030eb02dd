"""``python -m hope.eval zeroshot|niah|continual ...``: one JSON per suite in <run>/eval/ (or --out), W&B log;
``python -m hope.eval harness ...``: lm-evaluation-harness's own CLI with the model ``hope``."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from hope.eval.loading import resolve_device


def _common(p):
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/eval)")
    p.add_argument("--memorize", action="store_true", help="also report _memorize variants (test-time memorisation)")
    p.add_argument("--memorize-paths", default="titan,cms", help="comma list from titan,cms")
    p.add_argument("--memorize-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available, else cpu)")
    p.add_argument("--no-wandb", action="store_true")


_TASKS_HELP = """what to score: 'all' (default) = every task of the task folder; or a comma list of task-folder
names and FORMAT=PATH entries for released files with lm-evaluation-harness's prompts: piqa, hellaswag,
winogrande, arc_easy, arc_challenge, obqa, boolq, siqa, or jsonl (generic {"context", "choices", "label"} lines).
Results are keyed by the task name, the format, or for jsonl=PATH the file's stem (so jsonl=a.jsonl,jsonl=b.jsonl
gives tasks a and b)"""


def _parser():
    ap = argparse.ArgumentParser(
        prog="python -m hope.eval",
        epilog="python -m hope.eval harness <lm-eval arguments> runs lm-evaluation-harness's own CLI with the model "
               "'hope' registered (e.g. --model_args checkpoint=runs/<run> --tasks piqa; --device defaults to cuda "
               "when available, else cpu).")
    sub = ap.add_subparsers(dest="suite", required=True)
    z = sub.add_parser("zeroshot", help="multiple choice by log-likelihood (acc, acc_norm), lm-eval's scoring",
                       description="Multiple choice by log-likelihood with lm-evaluation-harness's conventions "
                                   "(docs/evaluation.md). A task folder holds <name>.jsonl files ({'context', "
                                   "'choices', 'label'} lines) and an optional prompts.json (BIG-bench prefixes per "
                                   "task); the default folder is $HOPE_ZEROSHOT_DIR, else the embedded "
                                   "../shared/data/zeroshot.")
    z.add_argument("--checkpoint", required=True,
                   help="a run folder (latest checkpoint), checkpoints folder or step folder")
    z.add_argument("--tokenizer", default=None, help="default: the run folder's tokenizer.model, else the path the "
                   "checkpoint records (sha256 checked either way)")
    z.add_argument("--tasks", default="all", help=_TASKS_HELP)
    z.add_argument("--task-dir", default=None,
                   help="task folder for all and names (default: $HOPE_ZEROSHOT_DIR, else ../shared/data/zeroshot)")
    z.add_argument("--limit", type=int, default=None, help="first N items per task")
    z.add_argument("--max-length", type=int, default=None, help="the model's window: longer requests lose their "
                   "oldest context tokens (counted as 'truncated'); default the model's max_seq_len")
    z.add_argument("--log-samples", action="store_true", help="also write per-item log-likelihoods to "
                   "<out>/zeroshot_samples/<task>.jsonl")
    _common(z)
    sub.add_parser("harness", add_help=False, help="lm-evaluation-harness's CLI with model 'hope' (arguments go "
                   "to lm-eval)")
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
    c.add_argument("--configs", nargs="+", default=["smoke", "titan_smoke", "transformer_smoke"])
    c.add_argument("--data", default="continual_embedded")
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
    _write_atomic(path, json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path


def _write_atomic(path: Path, text: str) -> None:
    """A killed eval never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_zeroshot(a) -> dict:
    from hope.eval.loading import load_for_eval
    from hope.eval.tasks import load_spec, parse_tasks, prompt_format
    from hope.eval.zeroshot import evaluate_items

    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {a.limit}")
    specs = parse_tasks(a.tasks, a.task_dir)
    model, tok, state, run_dir = load_for_eval(a.checkpoint, a.tokenizer, a.device)
    metrics, samples_dir = {}, None
    for spec in specs:
        items = load_spec(spec, a.task_dir)
        if a.limit:
            items = items[:a.limit]
        t0 = time.time()
        m = evaluate_items(model, tok, items, batch_size=a.batch_size, max_length=a.max_length, memorize=a.memorize,
                           memorize_paths=_paths(a.memorize_paths), memorize_steps=a.memorize_steps, desc=spec.name,
                           samples=a.log_samples)
        if a.log_samples:
            samples_dir = Path(a.out or Path(run_dir) / "eval") / "zeroshot_samples"
            lines = "".join(json.dumps(r) + "\n" for r in m.pop("samples"))
            _write_atomic(samples_dir / f"{spec.name}.jsonl", lines)
        m.update(limit=a.limit, seconds=round(time.time() - t0, 2), prompt_format=prompt_format(spec, a.task_dir))
        metrics[spec.name] = m
        shown = {k: round(v, 4) for k, v in m.items() if k in ("acc", "acc_norm", "acc_memorize", "acc_norm_memorize")}
        note = f" ({m['truncated']} of {m['n']} items truncated to {m['max_length']} tokens)" if m["truncated"] else ""
        print(spec.name, shown, note, flush=True)
    first = next(iter(metrics.values()))
    keys = [k for k in ("acc", "acc_norm", "acc_bytes", "acc_memorize", "acc_norm_memorize", "acc_bytes_memorize")
            if k in first]
    metrics["average"] = {k: sum(m[k] for m in metrics.values()) / len(metrics) for k in keys}
    return {"suite": "zeroshot", "arch": model.config.arch, "step": state.get("step"), "checkpoint": str(a.checkpoint),
            "tokenizer_sha256": tok.sha256, "scoring": "lm-evaluation-harness conventions (docs/evaluation.md)",
            "memorize": {"enabled": a.memorize, "paths": a.memorize_paths, "steps": a.memorize_steps},
            "samples": str(samples_dir) if samples_dir else None, "metrics": metrics, "_run_dir": run_dir}


def run_harness(argv: list[str]) -> int:
    """lm-evaluation-harness's CLI with the model ``hope`` registered (the default model here) and
    ``--device`` defaulting to cuda when available, else cpu."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("error: python -m hope.eval harness needs lm-evaluation-harness: pip install 'hope[eval]'",
              file=sys.stderr)
        return 2
    import hope.eval.lm_eval_adapter  # noqa: F401  (registers the model name "hope")

    args = list(argv)
    commands = ("run", "ls", "validate")
    runs = not args or args[0] == "run" or args[0] not in commands
    given = {x.split("=", 1)[0] for x in args}
    if runs and args and "--model" not in given:
        args += ["--model", "hope"]
    if runs and args and "--device" not in given:
        args += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    finally:
        sys.argv = saved
    return 0


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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["harness"]:
        return run_harness(argv[1:])
    a = _parser().parse_args(argv)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    try:
        a.device = resolve_device(a.device)
        result = {"zeroshot": run_zeroshot, "niah": run_niah, "continual": run_continual}[a.suite](a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = result.pop("_run_dir")
    out = Path(a.out) if a.out else (Path(run_dir) / "eval" if run_dir else Path("reports") / "eval")
    _write(out, a.suite, result, run_dir, a.no_wandb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
