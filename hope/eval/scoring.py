"""Log-likelihood scoring with lm-evaluation-harness's conventions, shared by ``hope.eval zeroshot`` and the
harness adapter (``hope.eval.lm_eval_adapter``), so both give the same numbers.

- A request is ``(context, target_delimiter + choice)``. Trailing whitespace of the context moves onto the
  continuation; context + continuation is encoded jointly and the continuation's tokens are the tokens after
  the context's own encoding (a choice starts a word exactly as it does in running text).
- Every context is preceded by the document-start token (:func:`prefix_ids`); an empty context is that
  token alone.
- Sequences longer than the model's window lose their oldest tokens: the model reads at most ``max_length``
  tokens (the last continuation token is only a target), as the harness does. Truncation is counted.
- acc: argmax of the summed log-likelihoods; acc_norm: of the sums divided by the choice's length in
  characters without the delimiter; acc_bytes: divided by its UTF-8 bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class ContinuationScore:
    logprob: float       # sum of log p(continuation token | prefix) over the continuation
    is_greedy: bool      # every continuation token is the argmax of its prediction
    num_tokens: int
    truncated: bool = False  # the oldest context tokens were dropped to fit the model's window


def prefix_ids(tok) -> list[int]:
    """The document-start token put before every context: EOS, which separates documents in the training
    stream (hope.data appends it to every record; BOS never occurs in training data)."""
    if tok.eos_id is not None and tok.eos_id >= 0:
        return [int(tok.eos_id)]
    if tok.bos_id is not None and tok.bos_id >= 0:
        return [int(tok.bos_id)]
    raise ValueError("the tokenizer has neither an EOS nor a BOS id to start a document with")


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` by joint encoding (lm-evaluation-harness's ``_encode_pair`` for a
    tokenizer that starts every text with :func:`prefix_ids`)."""
    prefix = prefix_ids(tok)
    if context == "":
        cont = tok.encode(continuation)
        return (prefix, cont) if not cont or cont[0] != prefix[0] else (cont[:1], cont[1:])
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    return prefix + ctx, whole[len(ctx):]


def rolling_windows(ids: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, predicted)`` windows that predict every token of ``ids`` once, each with as much
    preceding context as the window holds (the harness's rolling windows with context_len=1)."""
    out, start = [], 0
    while start < len(ids):
        end = min(start + max_length, len(ids))
        history = [prefix] + ids[:start]
        out.append((history[-(max_length + 1 - (end - start)):], ids[start:end]))
        start = end
    return out


def _stderr(values: list[float]) -> float | None:
    """Standard error of the mean (sample standard deviation / sqrt(n)), as the harness reports it."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    return sum(values) / len(values), _stderr(values)


def choice_metrics(choice_logprobs, choice_texts, label: int) -> dict:
    """``{"acc", "acc_norm", "acc_bytes"}`` (0.0 or 1.0) for one item from the per-choice summed
    log-likelihoods; ``choice_texts`` are the choices without the target delimiter."""
    if len(choice_logprobs) != len(choice_texts) or not choice_texts:
        raise ValueError(f"choice_logprobs and choice_texts must be non-empty and equally long, got "
                         f"{len(choice_logprobs)} and {len(choice_texts)}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choice_texts):
        raise ValueError(f"label must be an int in [0, {len(choice_texts)}), got {label!r}")
    lls = torch.tensor([float(x) for x in choice_logprobs], dtype=torch.float64)
    if not torch.isfinite(lls).all():
        raise ValueError(f"choice_logprobs must be finite, got {choice_logprobs}")
    chars = torch.tensor([float(len(t)) for t in choice_texts], dtype=torch.float64)
    nbytes = torch.tensor([float(len(t.encode("utf-8"))) for t in choice_texts], dtype=torch.float64)
    if not (chars > 0).all():
        raise ValueError(f"choice_texts must be non-empty strings (acc_norm divides by their length), got "
                         f"{choice_texts!r}")
    return {"acc": float(int(lls.argmax()) == label), "acc_norm": float(int((lls / chars).argmax()) == label),
            "acc_bytes": float(int((lls / nbytes).argmax()) == label)}


def _continuation_scores(logits: torch.Tensor, rows) -> list[ContinuationScore]:
    """``rows[i] = (first, targets, truncated)``: logits[i, first + k] predicts targets[k]."""
    scores = []
    for row, (first, targets, truncated) in enumerate(rows):
        pos = torch.arange(first, first + len(targets), device=logits.device)
        logp = F.log_softmax(logits[row, pos].float(), dim=-1)  # only the scored positions
        tgt = torch.tensor(targets, dtype=torch.long, device=logits.device)
        lp = logp.gather(-1, tgt[:, None]).squeeze(-1)
        greedy = bool((logp.argmax(-1) == tgt).all())
        scores.append(ContinuationScore(float(lp.sum()), greedy, len(targets), truncated))
    return scores


def _pad(seqs, pad_id: int, device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_continuations(model, requests, *, batch_size: int = 8, pad_id: int = 0, max_length: int | None = None,
                        progress: bool | str = False) -> list[ContinuationScore]:
    """Score ``(context_ids, continuation_ids)`` pairs, one causal pass per batch, results in request order.

    Each sequence keeps its last ``max_length + 1`` tokens (None: all) and the model reads all but the
    last. Batches are formed longest first with ties broken by the tokens, so the same set of requests
    always forms the same batches (identical numbers whatever order the requests come in); right padding,
    so padding never precedes a scored token. ``progress``: a tqdm bar (a string names it)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    seqs, rows = [], []
    for ctx, cont in requests:
        if len(ctx) < 1 or len(cont) < 1:
            raise ValueError("context_ids and continuation_ids must each hold at least one token")
        if max_length is not None and len(cont) > max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length={max_length}")
        seq = list(ctx) + list(cont)
        keep = len(seq) if max_length is None else min(len(seq), max_length + 1)
        seqs.append(seq[len(seq) - keep:])
        rows.append((keep - 1 - len(cont), list(cont), keep < len(seq)))
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), seqs[i]))
    out: list[ContinuationScore | None] = [None] * len(seqs)
    dev = _device(model)
    bar = tqdm(total=len(seqs), desc=progress if isinstance(progress, str) else "scoring", leave=False,
               disable=not progress)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids = _pad([seqs[i][:-1] for i in idx], pad_id, dev)
        logits = model(ids, return_logits=True).logits
        for i, s in zip(idx, _continuation_scores(logits, [rows[i] for i in idx])):
            out[i] = s
        bar.update(len(idx))
    bar.close()
    return out


@torch.no_grad()
def score_choices_memorized(model, context_ids, choices_ids, *, paths=("titan", "cms"), steps: int = 1,
                            pad_id: int = 0) -> list[ContinuationScore]:
    """Test-time memorisation (F4): memorise the context (all but its last token) once, then score every
    choice from that state without updating on the choice. Linear in the context: the context is read
    ``steps`` times, never re-read per choice, and never truncated (reading it all is the point)."""
    from hope.models.online import memorize

    if len(context_ids) < 2:
        raise ValueError("context_ids must hold at least two tokens to memorise")
    if model.config.arch == "transformer":  # no fast state to memorise into: identical to base scoring
        return score_continuations(model, [(list(context_ids), list(c)) for c in choices_ids],
                                   batch_size=max(len(choices_ids), 1), pad_id=pad_id)
    dev = _device(model)
    ctx = torch.tensor([list(context_ids)], dtype=torch.long, device=dev)
    state = memorize(model, ctx[:, :-1], paths=tuple(paths), steps=steps)
    last = int(context_ids[-1])
    # each row: last context token + choice (the last choice token is only a target, never an input)
    ids = _pad([[last] + list(c)[:-1] for c in choices_ids], pad_id, dev)
    if state is not None:
        state = state.expand_batch(len(choices_ids))
    logits = model(ids, state=state, return_logits=True).logits
    return _continuation_scores(logits, [(0, list(c), False) for c in choices_ids])
