"""Markdown tables (all suites, HOPE vs baselines with deltas) and plots from ``<run>/eval/<suite>.json``."""
from __future__ import annotations

import json
from pathlib import Path

SUITES = ("zeroshot", "niah", "continual")
_ZS_METRICS = ("acc", "acc_norm", "acc_memorize", "acc_norm_memorize")


def collect(paths) -> dict:
    """``{suite: [(label, json), ...]}`` from run folders (their eval/*.json) or JSON files."""
    found = {s: [] for s in SUITES}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted((p / "eval").glob("*.json")) + sorted(p.glob("*.json"))
        if not p.exists():
            raise ValueError(f"run_dirs: {p} does not exist")
        for f in files:
            data = json.loads(f.read_text())
            suite = data.get("suite")
            if suite not in SUITES:
                continue
            run = p.name if p.is_dir() else f.parent.parent.name
            label = f"{data.get('arch', '')}:{run}" if data.get("arch") else run
            found[suite].append((label, data))
    if not any(found.values()):
        raise ValueError(f"run_dirs: no eval JSONs (suite in {SUITES}) under {[str(p) for p in paths]}")
    return found


def _fmt(x, pct=True):
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _baseline(entries):
    """The Transformer++ run is the baseline when present, else the first run."""
    for i, (label, d) in enumerate(entries):
        if d.get("arch") == "transformer":
            return i
    return 0


def _zeroshot_md(entries) -> list[str]:
    tasks = []
    for _, d in entries:
        tasks += [t for t in d["metrics"] if t not in tasks and t != "average"]
    tasks.append("average")
    metrics = [m for m in _ZS_METRICS if any(m in d["metrics"].get("average", {}) for _, d in entries)]
    b = _baseline(entries)
    lines = ["## Zero-shot multiple choice (accuracy, %)", "",
             f"Baseline for deltas: `{entries[b][0]}`. `_memorize`: test-time memorisation of the context.", ""]
    head = ["task"] + [f"{label} {m}" for label, _ in entries for m in metrics]
    head += [f"Δ {label} {m}" for i, (label, _) in enumerate(entries) if i != b for m in metrics]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        row = [t]
        for _, d in entries:
            row += [_fmt(d["metrics"].get(t, {}).get(m)) for m in metrics]
        base = entries[b][1]["metrics"].get(t, {})
        for i, (_, d) in enumerate(entries):
            if i == b:
                continue
            for m in metrics:
                x, y = d["metrics"].get(t, {}).get(m), base.get(m)
                row.append("-" if x is None or y is None else f"{100 * (x - y):+.1f}")
        lines.append("| " + " | ".join(row) + " |")
    n = entries[0][1]["metrics"].get(tasks[0], {}).get("n")
    lines += ["", f"Items per task: {n} (first task shown); acc_norm divides the choice log-likelihood by its "
                  "length in characters (lm-evaluation-harness).", ""]
    return lines


def _niah_md(entries) -> list[str]:
    lines = ["## Needle in a haystack (exact match, %)", ""]
    metrics = [m for m in ("exact_match", "exact_match_memorize", "logprob_acc", "logprob_acc_memorize")
               if any(m in d["metrics"]["niah"] for _, d in entries)]
    lengths = []
    for _, d in entries:
        lengths += [L for L in d["metrics"]["niah"]["by_length"] if L not in lengths]
    lengths.sort(key=int)
    head = ["run", "metric"] + [f"{L} tok" for L in lengths] + ["all"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, d in entries:
        s = d["metrics"]["niah"]
        for m in metrics:
            lines.append("| " + " | ".join([label, m] + [_fmt(s["by_length"].get(L, {}).get(m)) for L in lengths]
                                           + [_fmt(s.get(m))]) + " |")
    return lines + [""]


def _continual_md(entries) -> list[str]:
    lines = ["## Continual learning (validation loss; lower is better)", ""]
    for label, d in entries:
        lines += [f"Segments in order: {', '.join(d['segments'])}; {d['steps_per_segment']} steps x batch "
                  f"{d['batch_size']} x {d['seq_len']} tokens per segment, same for every arch.", "",
                  "| arch | avg final loss | mean forgetting | backward transfer | params |", "|---|---|---|---|---|"]
        for arch, r in d["results"].items():
            lines.append(f"| {arch} | {r['avg_final_loss']:.3f} | {r['mean_forgetting']:.3f} | "
                         f"{r['backward_transfer']:+.3f} | {r.get('parameters', '-')} |")
        lines.append("")
    return lines


def render_markdown(found: dict) -> str:
    out = ["# Evaluation results", ""]
    if found.get("zeroshot"):
        out += _zeroshot_md(found["zeroshot"])
    if found.get("niah"):
        out += _niah_md(found["niah"])
    if found.get("continual"):
        out += _continual_md(found["continual"])
    return "\n".join(out)


def render_plots(found: dict, plot_dir) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if found.get("zeroshot"):
        entries = found["zeroshot"]
        metrics = [m for m in _ZS_METRICS if m in entries[0][1]["metrics"]["average"]]
        fig, ax = plt.subplots(figsize=(2 + 1.5 * len(entries), 3.5))
        w = 0.8 / max(len(metrics), 1)
        for k, m in enumerate(metrics):
            ax.bar([i + k * w for i in range(len(entries))],
                   [100 * d["metrics"]["average"].get(m, 0.0) for _, d in entries], w, label=m)
        ax.set_xticks([i + w * (len(metrics) - 1) / 2 for i in range(len(entries))], [l for l, _ in entries],
                      rotation=20, ha="right")
        ax.set_ylabel("average accuracy (%)")
        ax.legend(fontsize=7)
        written.append(plot_dir / "zeroshot_average.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    for label, d in found.get("continual", []):
        archs = list(d["results"])
        fig, axes = plt.subplots(1, len(archs), figsize=(4 * len(archs), 3.5), squeeze=False)
        for ax, arch in zip(axes[0], archs):
            im = ax.imshow(d["results"][arch]["loss_matrix"], cmap="viridis")
            ax.set_title(arch)
            ax.set_xlabel("segment evaluated")
            ax.set_ylabel("after stage")
            fig.colorbar(im, ax=ax)
        written.append(plot_dir / f"continual_{label.replace(':', '_')}.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return written
