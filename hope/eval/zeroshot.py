"""Zero-shot multiple-choice evaluation (E1), base and test-time-memorised (F4) variants side by side, scored
with lm-evaluation-harness's conventions (hope.eval.scoring)."""
from __future__ import annotations

from tqdm import tqdm

from hope.eval.scoring import (choice_metrics, encode_pair, mean_and_stderr, score_choices_memorized,
                               score_continuations)
from hope.eval.tasks import MCItem

_METRICS = ("acc", "acc_norm", "acc_bytes")


def _encode_item(tok, item: MCItem, where: str, max_length: int) -> list[tuple[list[int], list[int]]]:
    pairs = [encode_pair(tok, ctx, cont) for ctx, cont in item.requests()]
    for (ctx, cont), choice in zip(pairs, item.choices):
        if not cont:
            raise ValueError(f"{where}: choice {choice!r} encodes to zero continuation tokens after its context")
        if len(cont) > max_length:
            raise ValueError(f"{where}: its continuation of {len(cont)} tokens does not fit the window of "
                             f"{max_length} tokens (--max-length)")
    return pairs


def evaluate_items(model, tok, items: list[MCItem], *, batch_size: int = 8, max_length: int | None = None,
                   memorize: bool = False, memorize_paths=("titan", "cms"), memorize_steps: int = 1,
                   desc: str = "zeroshot", samples: bool = False) -> dict:
    """Mean acc / acc_norm / acc_bytes over ``items`` with their standard errors (and the ``_memorize``
    variants when ``memorize``), ``n`` and ``truncated`` (items with a choice that lost its oldest context
    tokens to the window of ``max_length`` tokens; default the model's ``max_seq_len``). With ``samples``
    the result also holds ``samples``: per item its choices' log-likelihoods, token counts and metrics."""
    if not items:
        raise ValueError("items must be non-empty")
    max_length = int(max_length or model.config.max_seq_len)
    pad = tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else 0
    encoded = [_encode_item(tok, it, f"{desc} item {it.id or i}", max_length) for i, it in enumerate(items)]
    flat = [p for pairs in encoded for p in pairs]
    scores = score_continuations(model, flat, batch_size=batch_size, pad_id=pad, max_length=max_length,
                                 progress=desc)
    per_item = {m: [] for m in _METRICS}
    if memorize:
        per_item.update({f"{m}_memorize": [] for m in _METRICS})
    records, truncated, pos = [], 0, 0
    for item, pairs in tqdm(list(zip(items, encoded)), desc=desc + " metrics", leave=False, disable=not memorize):
        item_scores = scores[pos:pos + len(pairs)]
        pos += len(pairs)
        lls = [s.logprob for s in item_scores]
        truncated += any(s.truncated for s in item_scores)
        m = choice_metrics(lls, item.choices, item.label)
        for k in _METRICS:
            per_item[k].append(m[k])
        record = {"id": item.id, "label": item.label, "loglikelihoods": lls,
                  "num_tokens": [s.num_tokens for s in item_scores], "is_greedy": [s.is_greedy for s in item_scores],
                  "truncated": any(s.truncated for s in item_scores), **m}
        if memorize:
            if item.continuation is not None:  # per-choice contexts: memorise each one
                mem = [score_choices_memorized(model, c, [x], paths=memorize_paths, steps=memorize_steps,
                                               pad_id=pad)[0].logprob for c, x in pairs]
            else:
                mem = [s.logprob for s in score_choices_memorized(model, pairs[0][0], [x for _, x in pairs],
                                                                  paths=memorize_paths, steps=memorize_steps,
                                                                  pad_id=pad)]
            mm = choice_metrics(mem, item.choices, item.label)
            for k in _METRICS:
                per_item[f"{k}_memorize"].append(mm[k])
            record.update({"loglikelihoods_memorize": mem, **{f"{k}_memorize": mm[k] for k in _METRICS}})
        records.append(record)
    result = {}
    for k, values in per_item.items():
        result[k], result[f"{k}_stderr"] = mean_and_stderr(values)
    result.update(n=len(items), truncated=truncated, max_length=max_length)
    if samples:
        result["samples"] = records
    return result
