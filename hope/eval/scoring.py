"""Multiple-choice scoring by log-likelihood, with acc / acc_norm as lm-evaluation-harness defines them.

acc: argmax of the summed log-likelihood of each choice's tokens given the context.
acc_norm: argmax of that sum divided by the choice's length in characters (the harness's definition).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ContinuationScore:
    logprob: float       # sum of log p(continuation token | prefix) over the continuation
    is_greedy: bool      # every continuation token is the argmax of its prediction
    num_tokens: int


def choice_metrics(choice_logprobs, choice_texts, label: int) -> dict:
    """``{"acc", "acc_norm"}`` (0.0 or 1.0) for one item from the per-choice summed log-likelihoods."""
    if len(choice_logprobs) != len(choice_texts) or not choice_texts:
        raise ValueError(f"choice_logprobs and choice_texts must be non-empty and equally long, got "
                         f"{len(choice_logprobs)} and {len(choice_texts)}")
    if not isinstance(label, int) or not 0 <= label < len(choice_texts):
        raise ValueError(f"label must be an int in [0, {len(choice_texts)}), got {label!r}")
    lls = torch.tensor([float(x) for x in choice_logprobs], dtype=torch.float64)
    if not torch.isfinite(lls).all():
        raise ValueError(f"choice_logprobs must be finite, got {choice_logprobs}")
    lengths = torch.tensor([float(max(len(t), 1)) for t in choice_texts], dtype=torch.float64)
    return {"acc": float(int(lls.argmax()) == label), "acc_norm": float(int((lls / lengths).argmax()) == label)}


def _gather_continuation(logits: torch.Tensor, targets: torch.Tensor, starts, lengths):
    """Per row: sum of log-probs of targets[start:start+len] under logits[start-1 : ...]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    scores = []
    for row, (start, n) in enumerate(zip(starts, lengths)):
        pos = torch.arange(start - 1, start - 1 + n, device=logits.device)
        tgt = targets[row, start:start + n]
        lp = logp[row, pos].gather(-1, tgt[:, None]).squeeze(-1)
        greedy = bool((logp[row, pos].argmax(-1) == tgt).all())
        scores.append(ContinuationScore(float(lp.sum()), greedy, n))
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
def score_continuations(model, requests, *, batch_size: int = 8, pad_id: int = 0) -> list[ContinuationScore]:
    """Score ``(context_ids, continuation_ids)`` pairs in one causal pass per batch (right padding, so
    padding never precedes a scored token)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[ContinuationScore] = []
    dev = _device(model)
    for i in range(0, len(requests), batch_size):
        chunk = requests[i:i + batch_size]
        for ctx, cont in chunk:
            if len(ctx) < 1 or len(cont) < 1:
                raise ValueError("context_ids and continuation_ids must each hold at least one token")
        seqs = [list(ctx) + list(cont) for ctx, cont in chunk]
        ids = _pad(seqs, pad_id, dev)
        logits = model(ids, return_logits=True).logits
        out += _gather_continuation(logits, ids, [len(c) for c, _ in chunk], [len(x) for _, x in chunk])
    return out


@torch.no_grad()
def score_choices_memorized(model, context_ids, choices_ids, *, paths=("titan", "cms"), steps: int = 1,
                            pad_id: int = 0) -> list[ContinuationScore]:
    """Test-time memorisation (F4): memorise the context (all but its last token) once, then score every
    choice from that state without updating on the choice. Linear in the context: the context is read
    ``steps`` times, never re-read per choice."""
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
    seqs = [[last] + list(c) for c in choices_ids]
    ids = _pad(seqs, pad_id, dev)
    if state is not None:
        state = state.expand_batch(len(seqs))
    logits = model(ids, state=state, return_logits=True).logits
    return _gather_continuation(logits, ids, [1] * len(seqs), [len(c) for c in choices_ids])
