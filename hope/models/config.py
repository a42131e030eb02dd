"""Model configuration: one dataclass for the three architectures, with validation and presets.

Titans = arXiv 2501.00663, Nested Learning (NL) = arXiv 2512.24695.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

ARCHS = ("hope", "titan", "transformer")
TITAN_VARIANTS = ("lmm", "mag")
RULES = ("titans", "dgd")
TEACH_SIGNALS = ("shared", "exact")
MEM_READOUTS = ("before_update", "after_update")
CMS_MODES = ("chunk_parallel", "sequential", "static")
#: persistent tokens of TITAN MAG when ``persistent_tokens`` is unset (Titans sec. 3.3 leaves N_p a hyper-parameter)
PAPER_PERSISTENT_TOKENS = 4
#: the inner rule each architecture's paper uses when ``rule`` is left unset: HOPE DGD (NL sec. 8.1, eq. 88),
#: TITAN Titans' momentum rule (Titans eq. 13-14)
PAPER_RULES = {"hope": "dgd", "titan": "titans", "transformer": "titans"}
#: per-architecture values of the fields left unset (None); each a measured deviation (docs/equations.md, "HOPE: paper
#: vs flags" and TITAN): HOPE's paper-like unnormalised v ran its generators to NaN, TITAN's did not matter; TITAN's
#: memory without a per-chunk bound ran away (NaN gates at step 16 of its smoke run), HOPE's does not
ARCH_DEFAULTS = {"normalize_v": {"hope": True, "titan": False, "transformer": False},
                 "mem_update_clip": {"hope": 0.0, "titan": 0.5, "transformer": 0.0}}
MEMORIES = ("linear", "mlp")
BACKENDS = ("auto", "cuda", "triton", "cpp", "reference")


@dataclass
class ModelConfig:
    """All architecture hyper-parameters. Fields that an arch does not use are ignored by it.

    Shared: ``vocab_size``, ``d_model``, ``n_layers``, ``n_heads`` (head dim = d_model / n_heads),
    ``max_seq_len``, ``ffn_hidden`` (SwiGLU width of transformer and titan blocks), ``rope_theta``,
    ``norm_eps``, ``backend`` (passed to every hope_kernels op). The LM head is always tied to the
    embedding (F1).

    TITAN: ``titan_variant`` ``"lmm"`` (memory is the mixer) or ``"mag"`` (sliding-window attention
    gated by the memory), ``memory`` (``"linear"``/``"mlp"``), ``memory_expansion`` (hidden width
    of the mlp memory per head, as a multiple of the head dim), ``chunk_size`` (memory update
    chunk), ``window`` (mag attention window), ``persistent_tokens`` (learnable tokens prepended and
    attended by every query; None: ``PAPER_PERSISTENT_TOKENS`` for mag, 0 for lmm).

    HOPE: ``selfmod`` (self-modifying Titans on; off = generators k/v/eta/alpha are static),
    ``mem_chunk_size`` (M_mem, default 64), ``gen_chunk_size`` (the generator memories, default 8),
    ``conv_window`` (causal depthwise conv on the q/k/v inputs), ``cms_periods`` (update period of each CMS
    level, fastest first), ``cms_levels`` (how many of them are used: the CMS depth ablation; 0 = no CMS),
    ``cms_hidden`` (hidden width of each level), ``cms_lr``, ``cms_beta``, ``cms_precond``
    (nl_l2_precond, NL eq. 27-29; sequential mode only), ``teach_signal`` (``"exact"``: the error at each level's
    own output; ``"shared"``: the head's delta for every level), ``cms_mode`` (how the levels learn within the
    sequence: ``"chunk_parallel"`` teach signals at the segment-start weights, the default; ``"sequential"``
    the exact form, a boundary at a time; ``"static"`` no in-context update, an ablation; hope/models/hope.py).
    Named deviations from the paper, docs/equations.md "HOPE: paper vs flags", each off (paper behaviour) by
    default except where measured unstable (``ARCH_DEFAULTS``, taken when the field is left None):
    ``adaptive_q`` (q from a self-modified M_q; NL eq. 83 keeps q non-adaptive), ``normalize_v`` (v_t
    l2-normalised; on for HOPE, off for TITAN), ``mem_readout`` (``"before_update"``: o_t = M_{t-1}(q_t) as NL eq. 83 / 94;
    ``"after_update"``: M_t), ``selfmod_momentum`` (Titans-style momentum in the self-modifying memories;
    NL eq. 88 has none), ``gen_update_clip`` / ``mem_update_clip`` (bound on one chunk's update of the
    generators / M_mem (TITAN: its memory), ||dW|| <= clip * ||W|| per sample and head; 0 = off; unset
    ``mem_update_clip``: 0 for HOPE, 0.5 for TITAN).

    Both memory archs: ``rule`` (``"titans"`` Titans eq. 13-14 or ``"dgd"`` NL eq. 56-57); None (default)
    takes the architecture's paper rule (``PAPER_RULES``: dgd for HOPE, titans for TITAN).
    """

    arch: str = "hope"
    vocab_size: int = 32000
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    max_seq_len: int = 2048
    ffn_hidden: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    backend: str = "auto"
    rule: str | None = None
    # TITAN
    titan_variant: str = "lmm"
    memory: str = "mlp"
    memory_expansion: int = 2
    chunk_size: int = 64
    window: int = 512
    persistent_tokens: int | None = None
    # HOPE
    selfmod: bool = True
    adaptive_q: bool = False
    normalize_v: bool | None = None
    mem_readout: str = "before_update"
    selfmod_momentum: bool = False
    mem_chunk_size: int = 64
    gen_chunk_size: int = 8
    gen_update_clip: float = 0.0
    mem_update_clip: float | None = None
    conv_window: int = 4
    cms_periods: tuple = (16, 64, 256)
    cms_levels: int = 3
    cms_hidden: int = 1024
    cms_lr: float = 1e-3
    cms_beta: float = 0.9
    cms_precond: bool = False
    teach_signal: str = "exact"
    cms_mode: str = "chunk_parallel"

    def __post_init__(self):
        if isinstance(self.cms_periods, list):
            self.cms_periods = tuple(self.cms_periods)
        if self.rule is None and self.arch in PAPER_RULES:
            self.rule = PAPER_RULES[self.arch]
        for name, per_arch in ARCH_DEFAULTS.items():
            if getattr(self, name) is None and self.arch in per_arch:
                setattr(self, name, per_arch[self.arch])
        if self.persistent_tokens is None:  # Titans MAG prepends persistent memory (sec. 3.3, 4.2)
            self.persistent_tokens = PAPER_PERSISTENT_TOKENS if (self.arch, self.titan_variant) == ("titan", "mag") else 0
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> "ModelConfig":
        def choice(name, choices):
            v = getattr(self, name)
            if v not in choices:
                raise ValueError(f"ModelConfig.{name} must be one of {choices}, got {v!r}")

        def pos_int(name, allow_zero=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"ModelConfig.{name} must be an int, got {type(v).__name__}")
            if v < 0 or (v == 0 and not allow_zero):
                raise ValueError(f"ModelConfig.{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")

        def pos_float(name, allow_zero=False, high=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"ModelConfig.{name} must be a float, got {type(v).__name__}")
            if not (v > 0 or (allow_zero and v == 0)) or (high is not None and v > high):
                rng = f"in [0, {high}]" if high is not None else ("> 0" if not allow_zero else ">= 0")
                raise ValueError(f"ModelConfig.{name} must be {rng}, got {v}")

        def boolean(name):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ModelConfig.{name} must be a bool, got {type(getattr(self, name)).__name__}")

        choice("arch", ARCHS)
        choice("titan_variant", TITAN_VARIANTS)
        choice("rule", RULES)
        choice("teach_signal", TEACH_SIGNALS)
        choice("mem_readout", MEM_READOUTS)
        choice("cms_mode", CMS_MODES)
        choice("memory", MEMORIES)
        choice("backend", BACKENDS)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ffn_hidden",
                     "memory_expansion", "chunk_size", "window", "mem_chunk_size", "gen_chunk_size",
                     "conv_window", "cms_hidden"):
            pos_int(name)
        pos_int("persistent_tokens", allow_zero=True)
        pos_int("cms_levels", allow_zero=True)
        pos_float("rope_theta")
        pos_float("norm_eps")
        pos_float("init_std")
        pos_float("cms_lr", allow_zero=True)
        pos_float("gen_update_clip", allow_zero=True)
        pos_float("mem_update_clip", allow_zero=True)
        pos_float("cms_beta", allow_zero=True, high=1.0)
        for name in ("selfmod", "adaptive_q", "normalize_v", "selfmod_momentum", "cms_precond"):
            boolean(name)
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by ModelConfig.n_heads ({self.n_heads})"
            )
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(f"ModelConfig.n_heads must give an even head dim for RoPE, got "
                             f"d_model/n_heads = {self.d_model // self.n_heads}")
        if not isinstance(self.cms_periods, tuple) or not all(
            isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in self.cms_periods
        ):
            raise ValueError(f"ModelConfig.cms_periods must be a tuple of positive ints, got {self.cms_periods!r}")
        if self.cms_precond and self.cms_mode == "chunk_parallel":
            raise ValueError("ModelConfig.cms_precond needs cms_mode='sequential': the preconditioned update is "
                             "multiplicative, which the chunk-parallel form does not sum")
        if self.cms_levels > len(self.cms_periods):
            raise ValueError(
                f"ModelConfig.cms_levels ({self.cms_levels}) must be <= len(cms_periods) ({len(self.cms_periods)})"
            )
        return self

    # ---------------------------------------------------------------- helpers
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def active_cms_periods(self) -> tuple:
        return tuple(self.cms_periods[: self.cms_levels])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cms_periods"] = list(self.cms_periods)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise TypeError(f"ModelConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------- presets
_SMOKE = dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, max_seq_len=256, ffn_hidden=384,
              chunk_size=32, window=64, mem_chunk_size=32, gen_chunk_size=8, cms_periods=(4, 16, 64),
              cms_levels=3, cms_hidden=256, memory_expansion=2)
# Pilot: 12 x 768, vocab 32000, seq 2048; widths tuned so each arch has 160M +-5% parameters.
_PILOT = dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, max_seq_len=2048, window=512,
              chunk_size=64, mem_chunk_size=64, gen_chunk_size=8, cms_periods=(16, 64, 256), cms_levels=3)
_MID = dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, max_seq_len=4096, window=1024,
            chunk_size=64, mem_chunk_size=64, gen_chunk_size=8, cms_periods=(16, 64, 256), cms_levels=3)

_PRESETS: dict[str, dict] = {
    "smoke-transformer": dict(_SMOKE, arch="transformer"),
    "smoke-titan": dict(_SMOKE, arch="titan", titan_variant="mag", ffn_hidden=320),
    "smoke-titan-lmm": dict(_SMOKE, arch="titan", titan_variant="lmm", ffn_hidden=320),
    "smoke-hope": dict(_SMOKE, arch="hope", cms_hidden=192),
    "pilot-transformer": dict(_PILOT, arch="transformer", ffn_hidden=3840),
    "pilot-titan": dict(_PILOT, arch="titan", titan_variant="mag", ffn_hidden=2496, memory_expansion=2),
    "pilot-titan-lmm": dict(_PILOT, arch="titan", titan_variant="lmm", ffn_hidden=3520, memory_expansion=2),
    "pilot-hope": dict(_PILOT, arch="hope", cms_hidden=1536, memory_expansion=2),
    "mid-transformer": dict(_MID, arch="transformer", ffn_hidden=4096),
    "mid-titan": dict(_MID, arch="titan", titan_variant="mag", ffn_hidden=2304),
    "mid-hope": dict(_MID, arch="hope", cms_hidden=1600),
}


def preset_names() -> list[str]:
    """The names :func:`preset` accepts, sorted."""
    return sorted(_PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named config (``smoke-*``: CPU minutes; ``pilot-*``: 160M; ``mid-*``), with field overrides."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in _PRESETS:
        raise ValueError(f"name must be one of {preset_names()}, got {name!r}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ModelConfig keys {unknown} in overrides")
    return ModelConfig(**{**_PRESETS[name], **overrides})


__all__ = ["ModelConfig", "preset", "preset_names", "ARCHS", "TITAN_VARIANTS", "RULES", "TEACH_SIGNALS", "MEM_READOUTS",
           "CMS_MODES", "PAPER_RULES", "ARCH_DEFAULTS"]
