"""lm-evaluation-harness adapter: score hope checkpoints with the harness itself.

    python -m hope.eval harness --model_args checkpoint=runs/x --tasks piqa,hellaswag    # the harness's CLI
    lm_eval.simple_evaluate(model=HarnessLM.from_checkpoint("runs/x"), tasks=["piqa"])    # in Python
    lm_eval.simple_evaluate(model="hope", model_args={"checkpoint": "runs/x"}, ...)   # after importing this module

Importing this module registers the model name ``hope``. With the harness installed the class is a
``TemplateLM``: the harness encodes each (context, continuation) pair itself (joint encoding) and this class
scores the tokens with the window, batching and progress of hope.eval.scoring, so its numbers equal
``python -m hope.eval zeroshot`` on the same items (tested). Without the harness the same methods exist,
encoding with hope.eval.scoring.encode_pair (the same convention).
"""
from __future__ import annotations

import warnings

import torch

from hope.eval.scoring import encode_pair, prefix_ids, rolling_windows, score_continuations

try:
    import lm_eval.models  # noqa: F401  (fills the harness's model registry before "hope" joins it)
    from lm_eval.api.model import TemplateLM as _Base
    from lm_eval.api.registry import register_model as _register
except ImportError:  # the harness is an optional extra (pip install hope[eval]); the adapter still works
    class _Base:
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            pairs = [encode_pair(self.tok, *_args(r)[:2]) for r in requests]
            return self._loglikelihood_tokens([(None, c, x) for c, x in pairs], disable_tqdm=disable_tqdm)

    def _register(*names):
        return lambda cls: cls


def _args(req):
    return req.args if hasattr(req, "args") else tuple(req)


def _batch_size(value) -> tuple[int, bool]:
    """``(batch size, auto)`` from an int, a digit string, or ``auto`` / ``auto:N`` (the harness's spellings)."""
    if isinstance(value, str) and value.startswith("auto"):
        return 0, True
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or isinstance(value, bool):
        raise ValueError(f"batch_size must be a positive int or 'auto', got {value!r}")
    return size, False


@_register("hope")
class HarnessLM(_Base):
    """A hope model for the harness. ``checkpoint=`` (run, checkpoints or step folder) or ``model=`` +
    ``tokenizer=``; ``device`` defaults to cuda when available, else cpu; ``batch_size`` (int or ``auto``:
    start at ``max_batch_size``, default 64, and halve on CUDA out-of-memory); ``max_length`` (the window;
    default the model's ``max_seq_len``)."""

    def __init__(self, model=None, tokenizer=None, checkpoint=None, batch_size=8, max_batch_size=None,
                 device=None, max_length=None, **kwargs):
        if _Base.__init__ is not object.__init__:
            super().__init__()
        from hope.eval.loading import load_for_eval, resolve_device

        if kwargs:
            raise ValueError(f"unknown model_args for model 'hope': {', '.join(sorted(kwargs))}; known: checkpoint, "
                             f"tokenizer, batch_size, max_batch_size, device, max_length")
        if model is None:
            if checkpoint is None:
                raise ValueError("model 'hope' needs model_args checkpoint=<run folder> (or model= and tokenizer=)")
            model, tokenizer, _, _ = load_for_eval(checkpoint, tokenizer, device)
        elif tokenizer is None or isinstance(tokenizer, str):
            raise ValueError("tokenizer must be a loaded hope.data.Tokenizer when model= is given")
        else:
            model = model.to(resolve_device(device) if device is not None else next(model.parameters()).device)
        self.model, self.tok, self.checkpoint = model.eval(), tokenizer, checkpoint
        self._device = next(model.parameters()).device
        self.batch_size_, self._auto = _batch_size(batch_size)
        if self._auto:
            self.batch_size_ = int(max_batch_size or 64)
        self.max_length = int(max_length or model.config.max_seq_len)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0

    @classmethod
    def from_checkpoint(cls, checkpoint, **kw) -> "HarnessLM":
        return cls(checkpoint=checkpoint, **kw)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "HarnessLM":
        kw = dict(x.split("=", 1) for x in arg_string.split(",") if x)
        return cls.create_from_arg_obj(kw, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "HarnessLM":
        kw = dict(arg_dict)
        kw.update({k: v for k, v in (additional_config or {}).items()
                   if v is not None and k in ("batch_size", "max_batch_size", "device")})
        return cls(**kw)

    # ---------------------------------------------------------------------------- the harness's TemplateLM
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return prefix_ids(self.tok)[0]

    @property
    def tokenizer_name(self) -> str:
        return f"hope-sentencepiece-{self.tok.sha256[:16]}"

    def get_model_info(self) -> dict:
        return {"model": "hope", "arch": self.model.config.arch, "checkpoint": str(self.checkpoint),
                "tokenizer_sha256": self.tok.sha256, "max_length": self.max_length}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text -> ids, preceded by the document-start token unless ``add_special_tokens`` is False."""
        return (prefix_ids(self.tok) if add_special_tokens is not False else []) + self.tok.encode(string)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    def _score(self, pairs, disable_tqdm: bool):
        while True:
            try:
                return score_continuations(self.model, pairs, batch_size=self.batch_size_, pad_id=self.pad_id,
                                           max_length=self.max_length, progress=False if disable_tqdm else "hope")
            except torch.cuda.OutOfMemoryError:
                if not self._auto or self.batch_size_ == 1:
                    raise
                self.batch_size_ //= 2  # longest batches come first: this shows at once
                torch.cuda.empty_cache()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        scores = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        n_cut = sum(s.truncated for s in scores)
        if n_cut:
            warnings.warn(f"{n_cut} of {len(scores)} requests exceeded the window of {self.max_length} tokens; "
                          f"their oldest context tokens were dropped", stacklevel=2)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        prefix = prefix_ids(self.tok)[0]
        windows, owner = [], []
        for i, r in enumerate(requests):
            for w in rolling_windows(self.tok.encode(_args(r)[0]), prefix, self.max_length):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, s in zip(owner, self._score(windows, disable_tqdm)):
            totals[i] += s.logprob
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False):
        from tqdm import tqdm

        from hope.eval.niah import greedy_generate

        out = []
        for r in tqdm(requests, desc="hope generate", leave=False, disable=disable_tqdm):
            context, gen_kwargs = _args(r)[:2]
            until = gen_kwargs.get("until", []) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 64))
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1):]
            text = self.tok.decode(greedy_generate(self.model, ids, max_new))
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


HopeLM = HarnessLM  # the name the adapter had first
