"""Shared pieces of the three language models: tied embedding / head (F1), loss through
``hope_kernels.teach_signal``, input checks, ModelOutput and the carried fast state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hope.layers.norms import RMSNorm
from hope.models.config import ModelConfig


@dataclass
class ModelOutput:
    """What every model returns (docs/architecture.md).

    ``hidden`` is the final normed hidden state (the head's input); ``teach_delta`` = d loss / d hidden
    (detached; the teach signal, NL F1). ``aux`` holds internals the online / inner-update paths use
    (CMS level inputs and outputs); it is empty unless they asked for it.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    state: Any = None
    teach_delta: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)
    aux: dict = field(default_factory=dict)


@dataclass
class TeachContext:
    """What an architecture that learns in context needs besides the embedded tokens: the next-token labels it is
    taught with (-100: no signal) and the teach-signal scale."""

    labels: torch.Tensor
    scale: float = 1.0


def teach_labels(input_ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The labels in-context learning reads: each token's successor in ``input_ids`` (causal: the label of token t
    is token t + 1, an input of the same call); for the last token, ``labels[:, -1]`` when labels are given (the
    stream's next token, -100 when unknown)."""
    out = torch.full_like(input_ids, -100)
    out[:, :-1] = input_ids[:, 1:]
    if labels is not None:
        out[:, -1] = labels[:, -1]
    return out


@dataclass
class ModelState:
    """Fast state carried between segments of one stream.

    ``pos``: tokens already seen (RoPE offset); ``layers``: one dict per layer, keys among
    ``conv`` (causal conv cache), ``mem`` (Titans memory state), ``gen`` (HOPE generator memories),
    ``cms`` (list of :class:`hope.layers.cms.CMSLevelState`). A value of None means "initial".
    """

    pos: int = 0
    layers: list = field(default_factory=list)
    batch_size: int = 0

    def detach(self) -> "ModelState":
        """A copy whose tensors are cut from the autograd graph (truncated BPTT between steps)."""
        def det(v):
            if isinstance(v, torch.Tensor):
                return v.detach()
            if isinstance(v, tuple) and hasattr(v, "_fields"):
                return type(v)(*(det(t) for t in v))
            if isinstance(v, list):
                return [det(t) for t in v]
            if hasattr(v, "detach_copy"):
                return v.detach_copy()
            return v
        return ModelState(self.pos, [{k: det(v) for k, v in layer.items()} for layer in self.layers], self.batch_size)


    def expand_batch(self, batch_size: int) -> "ModelState":
        """A batch-1 state repeated to ``batch_size`` streams (e.g. one memorised context, several
        answer choices scored from it). Tensors are detached copies."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if self.batch_size != 1:
            raise ValueError(f"expand_batch needs a state of batch size 1, this one has {self.batch_size}")

        def rep(v):
            if isinstance(v, torch.Tensor):
                return v.detach().expand(batch_size, *v.shape[1:]).clone()
            if isinstance(v, tuple) and hasattr(v, "_fields"):
                return type(v)(*(rep(t) for t in v))
            if isinstance(v, list):
                return [rep(t) for t in v]
            if hasattr(v, "detach_copy"):
                c = v.detach_copy()
                for name, t in vars(c).items():
                    if isinstance(t, torch.Tensor):
                        setattr(c, name, rep(t))
                return c
            return v
        return ModelState(self.pos, [{k: rep(v) for k, v in layer.items()} for layer in self.layers], batch_size)


def _to_floats(metrics: dict) -> dict:
    """Tensor metrics -> floats with one device sync."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    if keys:
        device = metrics[keys[0]].device
        values = torch.stack([metrics[k].detach().float().reshape(()).to(device) for k in keys]).tolist()
        metrics = {**metrics, **dict(zip(keys, values))}
    return metrics


def check_ids(name: str, ids, vocab_size: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must have dtype int64 (or int32), got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got {tuple(ids.shape)}")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"{name} must have B >= 1 and T >= 1, got {tuple(ids.shape)}")
    return ids


class LanguageModel(nn.Module):
    """Embedding -> backbone (arch specific) -> RMSNorm -> head tied to the embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)

    # ------------------------------------------------------------------ to override
    def backbone(self, x: torch.Tensor, state: ModelState | None, collect: bool, teach: TeachContext):
        """x [B, T, D] -> (h [B, T, D], new layer states or None, metrics, aux)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ common
    def num_parameters(self) -> int:
        """Unique parameters (the tied head counted once)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight

    def _init_weights(self):
        std = self.config.init_std
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, 0.0, std)
        # scale residual output projections by depth (GPT-2 style) so the residual stream stays O(1)
        for name, p in self.named_parameters():
            if name.endswith("out.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, 0.0, std / (2 * self.config.n_layers) ** 0.5)

    def _check_state(self, state, batch_size: int):
        if state is None:
            return
        if not isinstance(state, ModelState):
            raise TypeError(f"state must be a ModelState returned by a previous call (or None), got {type(state).__name__}")
        if len(state.layers) != self.config.n_layers:
            raise ValueError(f"state must have {self.config.n_layers} layer entries, got {len(state.layers)}")
        if state.batch_size and state.batch_size != batch_size:
            raise ValueError(f"state was made for batch size {state.batch_size}, but input_ids has batch size {batch_size}")

    def forward(self, input_ids, labels=None, state=None, return_logits: bool = False,
                return_state: bool = False, *, collect: bool = False, teach_scale: float = 1.0) -> ModelOutput:
        """See docs/architecture.md. ``collect=True`` keeps CMS level inputs/outputs in ``out.aux``;
        ``teach_scale`` scales the teach signal of HOPE's in-context CMS updates (0: none)."""
        cfg = self.config
        check_ids("input_ids", input_ids, cfg.vocab_size)
        B, T = input_ids.shape
        if input_ids.device != self.embed.weight.device:
            raise ValueError(f"input_ids must be on the model's device {self.embed.weight.device}, got {input_ids.device}")
        if labels is not None:
            check_ids("labels", labels, cfg.vocab_size)
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            if labels.device != input_ids.device:
                raise ValueError(f"labels must be on input_ids' device {input_ids.device}, got {labels.device}")
        for name, v in (("return_logits", return_logits), ("return_state", return_state)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
        if isinstance(teach_scale, bool) or not isinstance(teach_scale, (int, float)) or not teach_scale >= 0:
            raise ValueError(f"teach_scale must be a float >= 0, got {teach_scale!r}")
        self._check_state(state, B)
        if torch.jit.is_tracing() is False and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {cfg.vocab_size}), got values in [{lo}, {hi}]")

        x = self.embed(input_ids)
        teach = TeachContext(teach_labels(input_ids, labels), float(teach_scale))
        h, layer_states, metrics, aux = self.backbone(x, state, collect, teach)
        h = self.final_norm(h)
        out = ModelOutput(hidden=h, metrics=_to_floats(metrics), aux=aux)
        if return_state and layer_states is not None:
            out.state = ModelState(pos=(state.pos if state is not None else 0) + T, layers=layer_states, batch_size=B)
        if labels is not None:
            from hope_kernels import teach_signal

            loss, delta = teach_signal(h.reshape(B * T, -1), self.head_weight.to(h.dtype), labels.reshape(-1).long(),
                                       backend=cfg.backend)
            out.loss = loss
            out.teach_delta = delta.view(B, T, -1)
            out.aux["n_valid"] = int((labels != -100).sum())
            out.metrics["teach_signal_norm"] = float(delta.float().norm())
            out.metrics["loss"] = float(loss.detach())
        if return_logits:
            out.logits = h.float() @ self.head_weight.float().t()
        return out
