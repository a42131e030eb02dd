"""Zero-shot multiple-choice evaluation (E1), base and test-time-memorised (F4) variants side by side."""
from __future__ import annotations

from tqdm import tqdm

from hope.eval.scoring import choice_metrics, score_choices_memorized, score_continuations
from hope.eval.tasks import MCItem


def _encode_item(tok, item: MCItem):
    """(list of (context_ids, continuation_ids), choice texts used for acc_norm)."""
    bos = [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []
    if item.continuation is not None:  # alternative contexts, one shared continuation
        cont = tok.encode(item.continuation)
        return [(bos + tok.encode(c), cont) for c in item.choices], [item.continuation] * len(item.choices)
    ctx = bos + tok.encode(item.context)
    return [(ctx, tok.encode(c)) for c in item.choices], item.choices


def evaluate_items(model, tok, items: list[MCItem], *, batch_size: int = 8, memorize: bool = False,
                   memorize_paths=("titan", "cms"), memorize_steps: int = 1, desc: str = "zeroshot") -> dict:
    """Mean acc / acc_norm over ``items`` (and ``acc_memorize`` / ``acc_norm_memorize`` when ``memorize``)."""
    if not items:
        raise ValueError("items must be non-empty")
    pad = tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else 0
    encoded = [_encode_item(tok, it) for it in items]
    flat = [r for reqs, _ in encoded for r in reqs]
    for ctx, cont in flat:
        if not cont:
            raise ValueError("a choice encodes to zero tokens; choices must be non-empty text")
    scores, i = [], 0
    bar = tqdm(total=len(flat), desc=desc, leave=False)
    while i < len(flat):
        scores += score_continuations(model, flat[i:i + batch_size], batch_size=batch_size, pad_id=pad)
        bar.update(min(batch_size, len(flat) - i))
        i += batch_size
    bar.close()
    totals = {"acc": 0.0, "acc_norm": 0.0}
    if memorize:
        totals.update({"acc_memorize": 0.0, "acc_norm_memorize": 0.0})
    pos = 0
    for item, (reqs, texts) in tqdm(list(zip(items, encoded)), desc=desc + " metrics", leave=False):
        lls = [s.logprob for s in scores[pos:pos + len(reqs)]]
        pos += len(reqs)
        m = choice_metrics(lls, texts, item.label)
        totals["acc"] += m["acc"]
        totals["acc_norm"] += m["acc_norm"]
        if memorize:
            if item.continuation is not None:  # per-choice contexts: memorise each one
                mem = [score_choices_memorized(model, c, [x], paths=memorize_paths, steps=memorize_steps,
                                               pad_id=pad)[0].logprob for c, x in reqs]
            else:
                mem = [s.logprob for s in score_choices_memorized(model, reqs[0][0], [x for _, x in reqs],
                                                                  paths=memorize_paths, steps=memorize_steps,
                                                                  pad_id=pad)]
            mm = choice_metrics(mem, texts, item.label)
            totals["acc_memorize"] += mm["acc"]
            totals["acc_norm_memorize"] += mm["acc_norm"]
    result = {k: v / len(items) for k, v in totals.items()}
    result["n"] = len(items)
    return result
