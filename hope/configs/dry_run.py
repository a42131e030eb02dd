"""What a run will do, without doing it: ``python -m hope.train <config> --dry-run``.

Resolves the config (overrides applied) and its data manifest, builds the model on the ``meta`` device to
count parameters (no memory, no data, no network), and works out tokens per step, steps and total tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hope.configs import format_count

if TYPE_CHECKING:
    from hope.train.config import TrainConfig


@dataclass
class RunPlan:
    """The resolved run: config, model, parameter count and token budget."""

    config: dict                 # the resolved TrainConfig (overrides applied)
    model: dict                  # the resolved model config
    parameters: int | None       # unique parameters (tied head counted once); None: unknown offline
    trainable_parameters: int | None  # those the optimizer updates
    vocab_size: int | None
    vocab_note: str              # where vocab_size comes from
    manifest: str                # the data manifest file the run prepares
    world_size: int
    tokens_per_step: int         # batch_size x seq_len x world_size
    steps: int
    notes: list = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.steps

    def to_dict(self) -> dict:
        return {"config": self.config, "model": self.model, "parameters": self.parameters,
                "trainable_parameters": self.trainable_parameters, "vocab_size": self.vocab_size,
                "vocab_note": self.vocab_note, "manifest": self.manifest, "world_size": self.world_size,
                "tokens_per_step": self.tokens_per_step, "steps": self.steps, "total_tokens": self.total_tokens,
                "notes": list(self.notes)}


def default_world_size() -> int:
    """``$WORLD_SIZE`` (set by torchrun), else 1."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected a positive int, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"WORLD_SIZE: expected a positive int, got {value}")
    return value


def plan_run(cfg: "TrainConfig", world_size: int | None = None) -> RunPlan:
    """The :class:`RunPlan` of a validated ``hope.train.TrainConfig``; reads only config files."""
    from hope.data.prepare import load_manifest
    from hope.models import build_model, model_config_for

    world_size = default_world_size() if world_size is None else world_size
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    manifest = load_manifest(cfg.data.manifest, list(cfg.data.overrides))
    tok = manifest.tokenizer
    notes: list[str] = []
    if "hf" in cfg.model:
        from hope.integrations.hf import plan_memory_model

        model_dict, vocab, total, trainable = plan_memory_model(cfg.model)
        vocab_note = "the base model's vocabulary"
        if total is None:
            notes.append(f"the base model {cfg.model['hf']!r} is not in the local Hugging Face cache: parameter "
                         f"count unknown (the dry run downloads nothing)")
    else:
        vocab = int(tok["vocab_size"])
        if tok.get("hf"):
            notes.append(f"tokenizer.hf={tok['hf']}: a hope model's vocabulary follows that tokenizer, not "
                         f"tokenizer.vocab_size")
        if tok.get("path"):
            vocab_note = f"manifest tokenizer.vocab_size; the run uses the given tokenizer {tok['path']}"
        elif not tok.get("hard_vocab_limit", True):
            vocab_note = ("manifest tokenizer.vocab_size; hard_vocab_limit is off, so the trained tokenizer may "
                          "end smaller on a small corpus")
        else:
            vocab_note = "manifest tokenizer.vocab_size"
        mcfg = model_config_for(cfg.model, vocab, seq_len=cfg.seq_len)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = build_model(mcfg)
        total = int(model.num_parameters())
        trainable = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
        model_dict = mcfg.to_dict()
    if cfg.mode == "online":
        notes.append(f"mode=online: each sequence runs in segments of {cfg.segment_len} tokens")
    return RunPlan(config=cfg.to_dict(), model=model_dict, parameters=total, trainable_parameters=trainable,
                   vocab_size=vocab, vocab_note=vocab_note, manifest=str(manifest.path),
                   world_size=world_size, tokens_per_step=cfg.batch_size * cfg.seq_len * world_size,
                   steps=cfg.steps, notes=notes)


def _count(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,} ({format_count(n)})"


def format_plan(plan: RunPlan) -> str:
    """The human-readable dry-run report: resolved config (YAML), then the numbers."""
    import yaml

    cfg = plan.config
    lines = ["# resolved config", yaml.safe_dump({**cfg, "model_resolved": plan.model}, sort_keys=False).rstrip(),
             "", "# plan",
             f"data manifest:    {plan.manifest}",
             f"parameters:       {_count(plan.parameters)}"
             + (f", trainable {_count(plan.trainable_parameters)}"
                if plan.trainable_parameters != plan.parameters else ""),
             f"vocab size:       {plan.vocab_size} ({plan.vocab_note})",
             f"tokens per step:  {plan.tokens_per_step:,} ({cfg['batch_size']} sequences x {cfg['seq_len']} tokens"
             f" x {plan.world_size} rank{'s' if plan.world_size > 1 else ''})",
             f"steps:            {plan.steps:,}",
             f"total tokens:     {plan.total_tokens:,} ({format_count(plan.total_tokens)})"]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


__all__ = ["RunPlan", "plan_run", "format_plan", "default_world_size"]
