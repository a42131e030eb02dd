"""Needle in a haystack (E2): passkey / number / uuid needles hidden in real filler text at true token
lengths (counted with the model's tokenizer) and depths 0..100%; exact match of the greedy-generated needle
and a 2-way log-prob variant (true needle vs a distractor of the same kind)."""
from __future__ import annotations

import csv
import random
import uuid as uuid_mod
from pathlib import Path

import torch

from hope.eval.scoring import encode_pair, prefix_ids, score_choices_memorized, score_continuations

NEEDLE_KINDS = ("passkey", "number", "uuid")
_TEMPLATES = {
    "passkey": ("The pass key is {v}. Remember it. {v} is the pass key.", "What is the pass key? The pass key is"),
    "number": ("The special magic number is {v}.", "What is the special magic number? The special magic number is"),
    "uuid": ("The special magic uuid is {v}.", "What is the special magic uuid? The special magic uuid is"),
}


def needle_value(kind: str, rng: random.Random) -> str:
    if kind == "passkey":
        return str(rng.randint(10000, 99999))
    if kind == "number":
        return str(rng.randint(1000000, 9999999))
    if kind == "uuid":
        return str(uuid_mod.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"needle kind must be one of {NEEDLE_KINDS}, got {kind!r}")


def default_filler_path() -> Path:
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "corpus" / "kjv.txt"


def build_example(tok, filler_ids: list[int], *, length: int, depth: float, kind: str, seed: int) -> dict:
    """One haystack of exactly ``length`` tokens (document start + filler + needle + question) with the needle
    starting at ``depth`` (0..1) of the filler; the answer (" " + value) is not part of the prompt."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if kind not in NEEDLE_KINDS:
        raise ValueError(f"needle kind must be one of {NEEDLE_KINDS}, got {kind!r}")
    rng = random.Random(seed)
    value = needle_value(kind, rng)
    distractor = needle_value(kind, rng)
    while distractor == value:
        distractor = needle_value(kind, rng)
    needle_t, question_t = _TEMPLATES[kind]
    # each piece starts a word as in running text (SentencePiece marks a word start without a leading space)
    needle = tok.encode(needle_t.format(v=value))
    question = tok.encode(question_t)
    doc_start = prefix_ids(tok)
    n_filler = length - len(doc_start) - len(needle) - len(question)
    if n_filler < 1:
        raise ValueError(f"length {length} is too short for the {kind} needle and question "
                         f"({len(doc_start) + len(needle) + len(question)} tokens)")
    if len(filler_ids) < n_filler:
        raise ValueError(f"filler text holds {len(filler_ids)} tokens, need {n_filler} for length {length}")
    start = rng.randint(0, len(filler_ids) - n_filler)
    hay = filler_ids[start:start + n_filler]
    at = round(depth * n_filler)
    ids = doc_start + hay[:at] + needle + hay[at:] + question
    assert len(ids) == length
    # the answer's tokens as they follow the question in running text (joint encoding, hope.eval.scoring)
    return {"input_ids": ids, "answer": encode_pair(tok, question_t, " " + value)[1],
            "distractor": encode_pair(tok, question_t, " " + distractor)[1],
            "value": value, "needle_pos": len(doc_start) + at, "depth": depth, "length": length, "kind": kind}


@torch.no_grad()
def greedy_generate(model, ids: list[int], n_new: int, state=None) -> list[int]:
    """Greedy decoding carrying the fast state (linear time per token for HOPE/TITAN; the Transformer
    re-reads the prefix because it has no KV cache here)."""
    dev = next(model.parameters()).device
    if model.config.arch == "transformer":
        seq = list(ids)
        for _ in range(n_new):
            logits = model(torch.tensor([seq], device=dev), return_logits=True).logits
            seq.append(int(logits[0, -1].argmax()))
        return seq[len(ids):]
    out = model(torch.tensor([ids], device=dev), state=state, return_logits=True, return_state=True)
    new = [int(out.logits[0, -1].argmax())]
    for _ in range(n_new - 1):
        out = model(torch.tensor([[new[-1]]], device=dev), state=out.state, return_logits=True, return_state=True)
        new.append(int(out.logits[0, -1].argmax()))
    return new


def score_example(model, tok, ex: dict, *, memorize: bool = False, memorize_paths=("titan", "cms"),
                  memorize_steps: int = 1) -> dict:
    """exact match (generated tokens == answer tokens) and 2-way log-prob accuracy, base (+ _memorize)."""
    pad = tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else 0
    ids, ans, dis = ex["input_ids"], ex["answer"], ex["distractor"]
    res = {}
    gen = greedy_generate(model, ids, len(ans))
    res["exact_match"] = float(gen == ans)
    s = score_continuations(model, [(ids, ans), (ids, dis)], batch_size=2, pad_id=pad)
    res["logprob_acc"] = float(s[0].logprob > s[1].logprob)
    if memorize:
        from hope.models.online import memorize as mem_fn
        m = score_choices_memorized(model, ids, [ans, dis], paths=memorize_paths, steps=memorize_steps, pad_id=pad)
        res["logprob_acc_memorize"] = float(m[0].logprob > m[1].logprob)
        dev = next(model.parameters()).device
        state = mem_fn(model, torch.tensor([ids[:-1]], device=dev), paths=tuple(memorize_paths), steps=memorize_steps)
        gen_m = greedy_generate(model, ids[-1:], len(ans), state=state) if state is not None else gen
        res["exact_match_memorize"] = float(gen_m == ans)
    return res


def run_niah(model, tok, filler_text: str, *, lengths, depths, kinds=("passkey",), seeds=(0,), memorize=False,
             memorize_paths=("titan", "cms"), memorize_steps: int = 1) -> list[dict]:
    filler_ids = tok.encode(filler_text)
    rows = []
    for kind in kinds:
        for length in lengths:
            for depth in depths:
                for seed in seeds:
                    ex = build_example(tok, filler_ids, length=length, depth=depth, kind=kind, seed=seed)
                    r = score_example(model, tok, ex, memorize=memorize, memorize_paths=memorize_paths,
                                      memorize_steps=memorize_steps)
                    rows.append({"kind": kind, "length": length, "depth": depth, "seed": seed, **r})
    return rows


def summarize(rows: list[dict]) -> dict:
    metrics = [k for k in rows[0] if k not in ("kind", "length", "depth", "seed")]
    out = {m: sum(r[m] for r in rows) / len(rows) for m in metrics}
    by_len = {}
    for r in rows:
        by_len.setdefault(str(r["length"]), []).append(r)
    out["by_length"] = {L: {m: sum(r[m] for r in rs) / len(rs) for m in metrics} for L, rs in by_len.items()}
    out["n"] = len(rows)
    return out


def write_csv_and_plot(rows: list[dict], out_dir, name: str = "niah") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{name}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = torch.zeros(len(depths), len(lengths))
    for i, d in enumerate(depths):
        for j, L in enumerate(lengths):
            sel = [r["exact_match"] for r in rows if r["depth"] == d and r["length"] == L]
            grid[i, j] = sum(sel) / len(sel)
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 2))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{name}: exact match")
    fig.colorbar(im, ax=ax)
    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return csv_path, png
