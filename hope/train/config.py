"""Run configuration: a dataclass tree loaded from YAML with ``key=value`` overrides.

Unknown keys and bad values raise ValueError naming the dotted key (``optim.outer.lr``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from hope.yamlio import load_yaml

MODES = ("online", "parallel")
OUTER_OPTIMIZERS = ("adamw", "muon_mix")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "nccl", "gloo")
WANDB_MODES = ("auto", "offline", "online", "disabled")


@dataclass
class DataConfig:
    manifest: str = "embedded"  # a packaged manifest name or a YAML file; prepared (idempotently) before training
    overrides: list = field(default_factory=list)  # key=value overrides for the manifest
    weights: Any = None                             # per-source weights (None: manifest weights)


@dataclass
class OuterOptimConfig:
    type: str = "adamw"
    lr: float = 3e-3
    muon_lr: float = 0.02          # muon_mix: learning rate of the 2-D hidden matrices
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1      # cosine decay to lr * min_lr_ratio at train.steps
    fused: str = "auto"            # auto | true | false (fused AdamW where the device has it)


@dataclass
class TeachConfig:
    scale: float = 1.0             # peak teach-signal scale of the inner (CMS) updates
    warmup_steps: int = 0          # linear ramp 0 -> scale
    decay_to: float = 1.0          # fraction of scale reached at the last step (linear decay after warmup)


@dataclass
class OptimConfig:
    outer: OuterOptimConfig = field(default_factory=OuterOptimConfig)
    teach: TeachConfig = field(default_factory=TeachConfig)
    clip_outer: float = 1.0        # grad-norm clip of the outer (slow) parameters; 0 = off
    clip_memory: float = 1.0       # grad-norm clip of the memory / CMS level parameters; 0 = off


@dataclass
class GuardConfig:
    max_bad_steps: int = 3         # consecutive bad steps before rolling back to the last checkpoint
    max_rollbacks: int = 3         # rollbacks without a newer checkpoint in between before the run stops (rc != 0)
    loss_spike: float = 3.0        # a loss above loss_spike x the running loss is a bad step (0: off)
    max_teach_norm: float = 1e6    # a teach-signal norm above this counts as divergence


@dataclass
class DistConfig:
    backend: str = "auto"          # auto: nccl on GPU, gloo on CPU
    fsdp: bool = False             # FSDP2 (torch.distributed.fsdp.fully_shard) instead of replicated weights


def check_fsdp(cfg: "TrainConfig", teach_signal: str) -> None:
    """Refuse what FSDP2 cannot run (``teach_signal``: the model's, ``"shared"`` or ``"exact"``)."""
    if not cfg.dist.fsdp:
        return
    if cfg.mode == "online" and teach_signal == "exact":
        raise ValueError(
            "dist.fsdp: mode=online with model.teach_signal=exact does not work under FSDP2: its teach signal is a "
            "torch.autograd.grad inside the forward, which runs FSDP's backward hooks (resharding the blocks) "
            "before the CMS levels read their slow weights; use mode=parallel, model.teach_signal=shared or "
            "dist.fsdp=false")


@dataclass
class LogConfig:
    every: int = 1
    progress: bool = True
    wandb: str = "auto"            # auto: offline unless WANDB_API_KEY is set
    wandb_project: str = "hope-stage2"
    plot: bool = True


@dataclass
class TrainConfig:
    """A training run: every key of a run config with its default (sections as nested dataclasses);
    :func:`load_config` builds and validates one from a file or a packaged name plus ``key=value`` overrides."""

    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    run_dir: Any = None            # explicit run folder (default: <out_dir>/<name>-<timestamp>)
    resume: str = "none"           # none | auto (latest checkpoint of run_dir) | a checkpoint path
    mode: str = "parallel"
    segment_len: int = 64          # online mode: tokens per segment
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 50
    keep_checkpoints: int = 2
    device: str = "auto"
    bf16: bool = False             # bf16 autocast (GPU)
    compile: bool = False          # torch.compile, falls back to eager with one warning
    threads: int = 0               # torch CPU threads (0: leave torch's default)
    model: dict = field(default_factory=lambda: {"preset": "smoke-hope"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "TrainConfig":
        def choice(key, value, options):
            if value not in options:
                raise ValueError(f"{key}: expected one of {options}, got {value!r}")

        def pos_int(key, value, zero=False):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not zero):
                raise ValueError(f"{key}: expected a {'non-negative' if zero else 'positive'} int, got {value!r}")

        def nonneg(key, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{key}: expected a non-negative number, got {value!r}")

        choice("mode", self.mode, MODES)
        choice("device", self.device, DEVICES)
        choice("optim.outer.type", self.optim.outer.type, OUTER_OPTIMIZERS)
        choice("optim.outer.fused", str(self.optim.outer.fused).lower(), ("auto", "true", "false"))
        choice("dist.backend", self.dist.backend, BACKENDS)
        choice("log.wandb", self.log.wandb, WANDB_MODES)
        for key in ("steps", "batch_size", "seq_len", "segment_len", "eval_batches", "keep_checkpoints", "log.every"):
            pos_int(key, self._get(key))
        for key in ("eval_every", "ckpt_every", "threads", "optim.outer.warmup_steps", "optim.teach.warmup_steps",
                    "guard.max_rollbacks"):
            pos_int(key, self._get(key), zero=True)
        pos_int("guard.max_bad_steps", self.guard.max_bad_steps)
        _check_finite(self.to_dict(), "")
        for key in ("optim.outer.lr", "optim.outer.muon_lr", "optim.outer.weight_decay", "optim.outer.eps",
                    "optim.outer.min_lr_ratio", "optim.teach.scale", "optim.teach.decay_to", "optim.clip_outer",
                    "optim.clip_memory", "guard.max_teach_norm", "guard.loss_spike"):
            nonneg(key, self._get(key))
        if 0 < self.guard.loss_spike <= 1:
            raise ValueError(f"guard.loss_spike: expected 0 (off) or a factor > 1, got {self.guard.loss_spike!r}")
        for key in ("optim.outer.beta1", "optim.outer.beta2"):
            v = self._get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"{key}: expected a number in [0, 1), got {v!r}")
        for key in ("bf16", "compile", "dist.fsdp", "log.progress", "log.plot"):
            if not isinstance(self._get(key), bool):
                raise ValueError(f"{key}: expected true/false, got {self._get(key)!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model: expected a mapping, got {type(self.model).__name__}")
        if not isinstance(self.resume, str):
            raise ValueError(f"resume: expected 'none', 'auto' or a checkpoint path, got {self.resume!r}")
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"name: expected a non-empty name without '/', got {self.name!r}")
        pos_int("seed", self.seed, zero=True)
        check_fsdp(self, self.model.get("teach_signal", "shared"))  # again in the trainer with the resolved model
        return self

    def _get(self, key: str):
        obj = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_finite(tree, key: str) -> None:
    """Every float of the config (its sections, the model mapping, data weights) must be finite."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise ValueError(f"{key}: expected a finite number, got {tree!r}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ValueError(f"{prefix}{key}: unknown key (expected one of {sorted(known)})")
        sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value, f"{prefix}{key}.")
        else:
            default = known[key].default if sub is None else sub()
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # YAML "1" for a float field
            elif isinstance(default, float) and isinstance(value, str):
                try:
                    value = float(value)  # YAML 1.1 reads "1e-4" as a string
                except ValueError:
                    raise ValueError(f"{prefix}{key}: expected a number, got {value!r}") from None
            kwargs[key] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides) -> dict:
    """``["optim.outer.lr=1e-3", "mode=online"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides or []:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ValueError(f"{key.strip()}: the value {raw!r} is not valid YAML ({str(e).splitlines()[0]})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "weights":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML file or packaged config name (or defaults) plus ``key=value``
    overrides."""
    data: dict = {}
    if path is not None:
        from hope.configs import resolve_config

        path = resolve_config(path, "run")  # a file, or a packaged config's name (``pilot``)
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config: {path} is not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict):
            raise ValueError(f"config: {path} must hold a mapping")
    data = _merge(data, parse_overrides(overrides))
    try:
        cfg = _build(TrainConfig, data, "")
    except TypeError as e:  # a section given a scalar
        raise ValueError(f"config: {e}") from None
    return cfg.validate()


def config_from_dict(data: dict) -> TrainConfig:
    return _build(TrainConfig, data, "").validate()


__all__ = ["TrainConfig", "DataConfig", "OptimConfig", "OuterOptimConfig", "TeachConfig", "GuardConfig",
           "DistConfig", "LogConfig", "load_config", "config_from_dict", "parse_overrides", "check_fsdp"]
