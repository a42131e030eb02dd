"""lm-evaluation-harness adapter: score hope checkpoints with the harness itself.

    from hope.eval.lm_eval_adapter import HopeLM
    lm_eval.simple_evaluate(model=HopeLM.from_checkpoint("runs/x"), tasks=["piqa"])
or ``lm_eval --model hope --model_args checkpoint=runs/x`` after ``import hope.eval.lm_eval_adapter``.
Implements the harness's LM interface: loglikelihood, loglikelihood_rolling, generate_until.
"""
from __future__ import annotations

import torch

from hope.eval.scoring import score_continuations

try:
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register
except ImportError:  # the harness is an optional extra (pip install hope[eval]); the adapter still works
    _LMBase = object

    def _register(*names):
        return lambda cls: cls


def _args(req):
    return req.args if hasattr(req, "args") else tuple(req)


@_register("hope")
class HopeLM(_LMBase):
    def __init__(self, model=None, tokenizer=None, checkpoint=None, batch_size: int = 8, device: str = "cpu",
                 max_length: int | None = None, **kwargs):
        if _LMBase is not object:
            super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("HopeLM needs model= and tokenizer=, or checkpoint=")
            from hope.eval.loading import load_for_eval
            model, tokenizer, _, _ = load_for_eval(checkpoint, None, device)
        if tokenizer is None:
            raise ValueError("tokenizer must be given with model")
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size_ = int(batch_size)
        self.max_length = int(max_length or model.config.max_seq_len)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0

    @classmethod
    def from_checkpoint(cls, checkpoint, **kw) -> "HopeLM":
        return cls(checkpoint=checkpoint, **kw)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "HopeLM":
        kw = dict(x.split("=", 1) for x in arg_string.split(",") if x)
        kw.update({k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "device")})
        return cls(**kw)

    def _bos(self):
        return [self.tok.bos_id] if self.tok.bos_id is not None and self.tok.bos_id >= 0 else []

    def _encode_pair(self, context: str, continuation: str):
        # the harness moves trailing context spaces onto the continuation before encoding
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation, context = context[-n_space:] + continuation, context[:-n_space]
        ctx = self._bos() + self.tok.encode(context)
        cont = self.tok.encode(continuation)
        keep = self.max_length - len(cont)  # left-truncate the context to the model's length
        if keep < 1:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
        return ctx[-keep:], cont

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [self._encode_pair(*_args(r)[:2]) for r in requests]
        scores = score_continuations(self.model, pairs, batch_size=self.batch_size_, pad_id=self.pad_id)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for r in requests:
            ids = self._bos() + self.tok.encode(_args(r)[0])
            if len(self._bos()) == 0:
                raise ValueError("loglikelihood_rolling needs a tokenizer with a BOS id to predict the first token")
            total, start = 0.0, 1
            while start < len(ids):  # disjoint windows, each with as much preceding context as fits
                end = min(start + self.max_length - 1, len(ids))
                ctx = ids[max(0, end - self.max_length):start]
                total += score_continuations(self.model, [(ctx, ids[start:end])], batch_size=1,
                                             pad_id=self.pad_id)[0].logprob
                start = end
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False):
        from hope.eval.niah import greedy_generate

        out = []
        for r in requests:
            context, gen_kwargs = _args(r)[:2]
            until = gen_kwargs.get("until", []) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 64))
            ids = (self._bos() + self.tok.encode(context))[-(self.max_length - max_new):]
            text = self.tok.decode(greedy_generate(self.model, ids, max_new))
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out
