"""A deterministic language model whose answers are known: an induction (copy) rule over token ids.

At each position it finds the longest suffix of the tokens so far (at least ``min_match`` tokens, at most
``max_match``) that occurred earlier, inside the last ``window`` positions, and predicts the token that followed
its most recent occurrence; with no such match it predicts ``fallback``. Logits are ``confidence`` on the
predicted token and 0 elsewhere, so every log-probability is one of two known numbers (:func:`oracle_logprobs`).
It answers a needle question right when the needle is inside its window and wrong when it is not.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch


def oracle_logprobs(confidence: float, vocab_size: int) -> tuple[float, float]:
    """(log p of the predicted token, log p of any other token), in float64."""
    log_z = math.log(math.exp(confidence) + vocab_size - 1)
    return confidence - log_z, -log_z


class InductionOracle(torch.nn.Module):
    def __init__(self, vocab_size: int, *, window: int | None = None, min_match: int = 3, max_match: int = 8,
                 confidence: float = 20.0, fallback: int = 1, max_seq_len: int = 4096):
        super().__init__()
        self.config = SimpleNamespace(arch="transformer", vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.window, self.min_match, self.max_match = window, min_match, max_match
        self.confidence, self.fallback = confidence, fallback
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def predict(self, ids: list[int]) -> list[int]:
        """The predicted next token after each prefix ``ids[:t + 1]``."""
        out = []
        for t in range(len(ids)):
            lo = 0 if self.window is None else max(0, t - self.window + 1)
            best_k, best_next = 0, self.fallback
            for j in range(t - 1, lo - 1, -1):  # most recent first: ties keep the most recent
                k = 0
                while k < self.max_match and j - k >= lo and ids[j - k] == ids[t - k]:
                    k += 1
                if k > best_k and k >= self.min_match:
                    best_k, best_next = k, ids[j + 1]
            out.append(best_next)
        return out

    def forward(self, input_ids: torch.Tensor, return_logits: bool = True, **kwargs):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.config.vocab_size, device=input_ids.device)
        for b in range(B):
            pred = torch.tensor(self.predict(input_ids[b].tolist()), device=input_ids.device)
            logits[b, torch.arange(T), pred] = self.confidence
        return SimpleNamespace(logits=logits)
