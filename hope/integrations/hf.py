"""HOPE memory on a frozen Hugging Face causal LM (``pip install 'hope[hf]'``).

:class:`HopeMemoryLM` wraps any ``transformers`` causal LM and inserts one :class:`MemoryBlock` after each
chosen decoder layer (a forward hook on that layer: the base model's modules and weight names stay as they
are). A block is a HOPE block on the layer's hidden states h (NL sec. 8; ``hope.layers``)::

    x = h + SelfModifyingTitans(RMSNorm(h))      # or TitanMemory (Titans LMM), or neither
    y = CMSChain(x)                              # optional Continuum Memory System levels
    out = h + gate * (y - h)                     # gate: one value per channel, initialised to 0

so before training the wrapped model computes exactly what the base computes. The base is frozen (no
gradients, kept in eval mode); only the memory blocks train, with our trainer (a run config's
``model: {hf: <name or path>, memory_layers: [...]}``, data tokenised with ``tokenizer.hf``) or with your
own loop (:meth:`HopeMemoryLM.memory_parameters`). ``state_dict()`` holds the memory blocks only, and
:meth:`HopeMemoryLM.save_memory` writes them with the base model's name and revision, so a checkpoint is
the trained memory plus the name of what it was trained on.

The memories learn in context as the Titans / self-modifying layers do (their in-forward updates); the CMS
levels' slow weights are trained by the outer optimizer (the periodic teach-signal updates of the parallel
mode run in ``hope.models`` only). Padding is seen by the memories like any token: pad on the right.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hope.layers.cms import CMSChain
from hope.layers.norms import RMSNorm
from hope.layers.self_modifying import MEM_READOUTS, SelfModifyingTitans
from hope.layers.titan_memory import TitanMemory
from hope.models.base import ModelOutput

MEMORY_KINDS = ("selfmod", "titans", "cms")  # self-modifying Titans, Titans LMM memory, CMS levels
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_FILE = "memory.safetensors"
MEMORY_META = "memory.json"


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError("hope.integrations.hf needs the `transformers` package: pip install 'hope[hf]'") from exc
    return transformers


@dataclass
class HFMemoryConfig:
    """Where the memory goes and what it is. As a run config's ``model:`` mapping (keys as below).

    ``hf``: base model (hub name or local folder); ``revision``: its revision (recorded as the resolved commit
    when the hub reports one); ``memory_layers``: decoder layer indices (0-based, negative from the end) after
    which a memory block is inserted; ``memory``: what a block holds, from ``selfmod`` (self-modifying Titans,
    NL sec. 8), ``titans`` (Titans LMM memory, Titans sec. 3) and ``cms`` (CMS levels, NL sec. 7), at most one
    of the first two; ``n_heads``: memory heads (default: the base's attention heads); ``memory_expansion``,
    ``mem_chunk_size``, ``gen_chunk_size``, ``chunk_size`` (titans), ``adaptive_q``, ``mem_readout``, ``gen_update_clip``,
    ``backend``: as in ``hope.models.ModelConfig``; ``rule``: the inner rule (default: the paper's, DGD for ``selfmod`` and the
    Titans rule for ``titans``); ``cms_hidden`` (default 2 x hidden size), ``cms_periods``; ``dtype``: the
    base model's weights (``float32``, ``bfloat16``, ``float16``; memory weights are float32).
    """

    hf: str
    memory_layers: tuple = ()
    revision: str | None = None
    memory: tuple = ("selfmod", "cms")
    n_heads: int | None = None
    memory_expansion: int = 2
    mem_chunk_size: int = 64
    gen_chunk_size: int = 8
    chunk_size: int = 64
    rule: str | None = None
    adaptive_q: bool = False
    mem_readout: str = "before_update"
    gen_update_clip: float = 0.0
    cms_hidden: int | None = None
    cms_periods: tuple = (16, 64, 256)
    dtype: str = "float32"
    backend: str = "auto"

    def __post_init__(self):
        for name in ("memory_layers", "memory", "cms_periods"):
            value = getattr(self, name)
            if isinstance(value, (list, str)):
                setattr(self, name, tuple([value] if isinstance(value, str) else value))
        self.validate()

    def validate(self) -> "HFMemoryConfig":
        def bad(key, expected):
            raise ValueError(f"model.{key}: expected {expected}, got {getattr(self, key)!r}")

        def pos_int(key, optional=False):
            v = getattr(self, key)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(key, "a positive int" + (" or null" if optional else ""))

        if not isinstance(self.hf, str):
            bad("hf", "a Hugging Face model name or folder")
        if self.revision is not None and not isinstance(self.revision, str):
            bad("revision", "a branch, tag or commit (str) or null")
        if not self.memory_layers or not all(isinstance(i, int) and not isinstance(i, bool)
                                             for i in self.memory_layers):
            bad("memory_layers", "a non-empty list of decoder layer indices")
        if len(set(self.memory_layers)) != len(self.memory_layers):
            bad("memory_layers", "distinct layer indices")
        if not self.memory or any(k not in MEMORY_KINDS for k in self.memory) or len(set(self.memory)) != len(self.memory):
            bad("memory", f"a list drawn from {MEMORY_KINDS}")
        if "selfmod" in self.memory and "titans" in self.memory:
            bad("memory", "at most one of 'selfmod' and 'titans'")
        for key in ("memory_expansion", "mem_chunk_size", "gen_chunk_size", "chunk_size"):
            pos_int(key)
        pos_int("n_heads", optional=True)
        pos_int("cms_hidden", optional=True)
        if not self.cms_periods or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0
                                           for p in self.cms_periods):
            bad("cms_periods", "a non-empty list of positive ints")
        if self.rule not in (None, "titans", "dgd"):
            bad("rule", "'titans', 'dgd' or null (the paper's rule of the memory)")
        if not isinstance(self.adaptive_q, bool):
            bad("adaptive_q", "true or false")
        if self.mem_readout not in MEM_READOUTS:
            bad("mem_readout", f"one of {MEM_READOUTS}")
        if isinstance(self.gen_update_clip, bool) or not isinstance(self.gen_update_clip, (int, float)) \
                or not 0 <= self.gen_update_clip < float("inf"):
            bad("gen_update_clip", "a finite float >= 0 (0: no bound)")
        if self.dtype not in DTYPES:
            bad("dtype", f"one of {tuple(DTYPES)}")
        return self

    @classmethod
    def from_dict(cls, data: dict) -> "HFMemoryConfig":
        """From a run config's ``model:`` mapping; unknown keys raise ValueError naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"model: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model: unknown keys {unknown} for a Hugging Face base model; expected some of "
                             f"{sorted(known)}")
        if "hf" not in data:
            raise ValueError("model.hf: required (a Hugging Face model name or folder)")
        return cls(**data)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("memory_layers", "memory", "cms_periods"):
            d[key] = list(d[key])
        return d

    def replace(self, **changes) -> "HFMemoryConfig":
        return dataclasses.replace(self, **changes)


class MemoryBlock(nn.Module):
    """One HOPE memory layer on hidden states [B, T, dim]: ``forward(h, state) -> (h_out, state, metrics)``;
    ``h_out == h`` exactly while ``gate`` is 0."""

    def __init__(self, dim: int, n_heads: int, config: HFMemoryConfig):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"model.n_heads: {n_heads} does not divide the hidden size {dim}")
        self.norm = RMSNorm(dim)
        self.titans: nn.Module | None = None
        if "selfmod" in config.memory:
            self.titans = SelfModifyingTitans(dim, n_heads, expansion=config.memory_expansion,
                                              mem_chunk_size=config.mem_chunk_size,
                                              gen_chunk_size=config.gen_chunk_size, rule=config.rule or "dgd",
                                              adaptive_q=config.adaptive_q, mem_readout=config.mem_readout,
                                              gen_update_clip=float(config.gen_update_clip), backend=config.backend)
        elif "titans" in config.memory:
            self.titans = TitanMemory(dim, n_heads, memory="mlp", expansion=config.memory_expansion,
                                      chunk_size=config.chunk_size, rule=config.rule or "titans", backend=config.backend)
        self.cms = (CMSChain(dim, config.cms_hidden or 2 * dim, config.cms_periods)
                    if "cms" in config.memory else None)
        self.gate = nn.Parameter(torch.zeros(dim))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self, std: float = 0.02) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):  # output projections smaller: they write into the residual stream
                nn.init.normal_(module.weight, 0.0, std / 2 if name.endswith("out") else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if isinstance(self.titans, TitanMemory):
            self.titans.reset_gate_bias()

    def forward(self, h: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict, dict]:
        x = h.float()
        y, new_state, metrics = x, {}, {}
        if self.titans is not None:
            out, new_state, metrics = self.titans(self.norm(x), state)
            y = x + out
        if self.cms is not None:
            y, _, _ = self.cms(y)
        return h + (self.gate * (y - x)).to(h.dtype), new_state, metrics


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The base model's decoder layers: the (first, shortest-named) ModuleList holding
    ``config.num_hidden_layers`` modules (``model.layers`` of Llama / Mistral / Qwen, ``transformer.h`` of GPT-2, ...)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not n_layers or not found:
        raise ValueError(f"model: cannot find the decoder layers of {type(model).__name__} (no ModuleList of "
                         f"config.num_hidden_layers={n_layers} modules)")
    return min(found, key=lambda item: len(item[0]))


@dataclass
class _Call:
    """What one forward passes to the layer hooks and gets back from them."""

    states: dict
    new_states: dict = field(default_factory=dict)
    metrics: list = field(default_factory=list)


class _AfterLayer:
    """The forward hook on a decoder layer: its output goes through memory block ``key`` of ``owner``. An object,
    not a closure, so ``copy.deepcopy`` of the wrapped model hooks the copy's layers to the copy's memory."""

    def __init__(self, owner: "HopeMemoryLM", key: str):
        self.owner, self.key = owner, key

    def __call__(self, module, args, output):
        owner = self.owner
        if not owner._memory_on:
            return None
        call = owner._call
        hidden = output if torch.is_tensor(output) else output[0]
        y, state, metrics = owner.memory[self.key](hidden, None if call is None else call.states.get(self.key))
        if call is not None:
            call.new_states[self.key] = state
            call.metrics.append(metrics)
        return y if torch.is_tensor(output) else (y, *output[1:])


class HopeMemoryLM(nn.Module):
    """A frozen Hugging Face causal LM with HOPE memory blocks after ``config.memory_layers``.

    ``forward(input_ids, labels=None, ...)`` follows ``hope.models``: ``labels[b, t]`` is the target of
    position t (already shifted; -100 ignored) and the result is a :class:`hope.models.ModelOutput`.
    """

    def __init__(self, base: nn.Module, config: HFMemoryConfig):
        super().__init__()
        if not isinstance(config, HFMemoryConfig):
            raise TypeError(f"config must be an HFMemoryConfig, got {type(config).__name__}")
        self.base = base
        self.base.requires_grad_(False)
        self.base.eval()
        self.layers_path, layers = find_decoder_layers(base)
        n = len(layers)
        indices = []
        for i in config.memory_layers:
            if not -n <= i < n:
                raise ValueError(f"model.memory_layers: {i} is out of range for a base with {n} decoder layers")
            indices.append(i % n)
        if len(set(indices)) != len(indices):
            raise ValueError(f"model.memory_layers: {list(config.memory_layers)} names a layer twice")
        hidden = base.config.hidden_size
        heads = config.n_heads or base.config.num_attention_heads
        self.config = config
        self.memory = nn.ModuleDict({str(i): MemoryBlock(hidden, heads, config) for i in sorted(indices)})
        self._call: _Call | None = None
        self._memory_on = True
        self._hooks = [layers[i].register_forward_hook(_AfterLayer(self, str(i))) for i in sorted(indices)]

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def from_pretrained(cls, config: HFMemoryConfig | str, memory_layers: Sequence[int] | None = None,
                        **memory: Any) -> "HopeMemoryLM":
        """Load the base with ``AutoModelForCausalLM.from_pretrained`` and insert the memory blocks.

        ``HopeMemoryLM.from_pretrained("HuggingFaceTB/SmolLM2-135M", memory_layers=[-1])`` or with an
        :class:`HFMemoryConfig`. The resolved commit is recorded as ``config.revision`` when the hub gives one.
        """
        _require_transformers()
        from transformers import AutoModelForCausalLM

        if not isinstance(config, HFMemoryConfig):
            config = HFMemoryConfig(hf=config, memory_layers=tuple(memory_layers or ()), **memory)
        elif memory_layers is not None or memory:
            raise TypeError("from_pretrained: give an HFMemoryConfig or a name with keyword arguments, not both")
        base = AutoModelForCausalLM.from_pretrained(config.hf, revision=config.revision, dtype=DTYPES[config.dtype])
        commit = getattr(base.config, "_commit_hash", None)
        if commit and config.revision != commit:
            config = config.replace(revision=commit)
        return cls(base, config)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, memory_state: dict | None = None,
                return_state: bool = False, return_logits: bool = True) -> ModelOutput:
        """Logits (and with ``labels`` the mean next-token loss) of the base with its memory blocks.

        ``memory_state`` (a previous call's ``out.state``) continues the memories where that call left them
        (a long stream read in segments); without it they start from their learned initial weights.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, T] tensor of token ids, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{getattr(labels, 'shape', type(labels).__name__)}")
        if memory_state is not None and not isinstance(memory_state, dict):
            raise TypeError(f"memory_state must be the state of a previous call (a dict) or None, got "
                            f"{type(memory_state).__name__}")
        call = _Call(states=memory_state or {})
        self._call = call
        try:
            logits = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            self._call = None
        out = ModelOutput(metrics=self._metrics(call.metrics))
        if labels is not None:
            out.loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                                       ignore_index=-100)
            out.metrics["loss"] = float(out.loss.detach())
        if return_logits:
            out.logits = logits
        if return_state:
            out.state = call.new_states
        return out

    @staticmethod
    def _metrics(per_block: list) -> dict:
        keys = sorted({k for m in per_block for k in m})
        return {k: float(torch.stack([m[k].detach().float().reshape(()) for m in per_block if k in m]).mean())
                for k in keys}

    @contextlib.contextmanager
    def memory_disabled(self) -> Iterator[None]:
        """Run the base alone (no memory block applied) inside the ``with`` block."""
        previous, self._memory_on = self._memory_on, False
        try:
            yield
        finally:
            self._memory_on = previous

    def train(self, mode: bool = True) -> "HopeMemoryLM":
        """Train mode for the memory blocks; the frozen base stays in eval mode (no dropout)."""
        super().train(mode)
        self.base.eval()
        return self

    # ------------------------------------------------------------------------------------------ weights
    def memory_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: the memory blocks' (give these to your optimizer)."""
        return list(self.memory.parameters())

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameters of base + memory (``trainable_only``: of the memory blocks)."""
        params = self.memory_parameters() if trainable_only else list(self.parameters())
        return sum(p.numel() for p in params)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False) -> dict:
        """The memory blocks' parameters and buffers only (``memory.<layer>.*``): the base is loaded from
        its name and revision, never copied into a checkpoint."""
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in out if k.startswith(prefix) and not k.startswith(f"{prefix}memory.")]:
            del out[key]
        return out

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Load memory weights (keys ``memory.<layer>.*``); with ``strict`` every memory key must be there and
        no other key may be."""
        own = set(self.state_dict())
        missing = sorted(own - set(state_dict))
        unexpected = sorted(set(state_dict) - own)
        if strict and (missing or unexpected):
            raise ValueError(f"memory state dict: missing {missing}, unexpected {unexpected}")
        result = super().load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False,
                                         assign=assign)
        return type(result)(missing, unexpected)

    def save_memory(self, folder: str | os.PathLike) -> Path:
        """Write ``memory.safetensors`` (memory weights only) and ``memory.json`` (base name, revision, memory
        config) into ``folder``, each written beside its final name then renamed into place."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{MEMORY_FILE}.tmp-{os.getpid()}"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / MEMORY_FILE)
        tmp = folder / f".{MEMORY_META}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({"model_config": self.config.to_dict()}, indent=1))
        os.replace(tmp, folder / MEMORY_META)
        return folder

    @classmethod
    def load_memory(cls, folder: str | os.PathLike, base: nn.Module | None = None,
                    device: str | torch.device = "cpu") -> "HopeMemoryLM":
        """A model from :meth:`save_memory`'s folder: the base from its recorded name and revision (or the
        given ``base``), then the memory weights."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = HFMemoryConfig.from_dict(json.loads((folder / MEMORY_META).read_text())["model_config"])
        model = cls(base, config) if base is not None else cls.from_pretrained(config)
        model.load_state_dict(load_file(str(folder / MEMORY_FILE)))
        return model.to(device)


# ---------------------------------------------------------------------------------------------- trainer
def build_for_run(model: dict, tokenizer_info: dict, *, fsdp: bool = False,
                  mode: str = "parallel") -> tuple[HFMemoryConfig, HopeMemoryLM]:
    """``(config, model)`` for a run config's ``model: {hf: ...}`` mapping; ``tokenizer_info`` is the prepared
    data's ``index["tokenizer"]``, which must come from the base model's tokenizer (``tokenizer.hf``)."""
    config = HFMemoryConfig.from_dict(model)
    if mode != "parallel":
        raise ValueError(f"mode: a Hugging Face base model trains with mode=parallel, got {mode!r}")
    if fsdp:
        raise ValueError("dist.fsdp: not supported with a Hugging Face base model (its frozen weights are "
                         "replicated; use dist.fsdp=false)")
    if "hf" not in tokenizer_info:
        raise ValueError(f"model.hf: the data must be tokenised with the base model's own tokenizer; add "
                         f"tokenizer.hf={config.hf} (and an out_dir of its own) to data.overrides")
    wrapped = HopeMemoryLM.from_pretrained(config)
    rows = wrapped.base.get_input_embeddings().num_embeddings
    if int(tokenizer_info["vocab_size"]) > rows:
        raise ValueError(f"model.hf: the data's tokenizer ({tokenizer_info['hf']}) has {tokenizer_info['vocab_size']} "
                         f"tokens, more than the base model's {rows} embedding rows")
    return wrapped.config, wrapped


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[HopeMemoryLM, dict]:
    """``(model, state_json)`` from a run folder, checkpoints folder or step folder of a run trained with a
    Hugging Face base: the base from the recorded name and revision, the memory from the checkpoint."""
    from hope.train.checkpoint import load_weights, resolve_step_dir

    step_dir = resolve_step_dir(path)
    state = json.loads((step_dir / "state.json").read_text())
    model = HopeMemoryLM.from_pretrained(HFMemoryConfig.from_dict(state["model_config"]))
    load_weights(model, step_dir, device=device)
    return model.to(device), state


def plan_memory_model(model: dict) -> tuple[dict, int | None, int | None, int | None]:
    """For ``--dry-run``: ``(config dict, vocab, parameters, trainable)`` from the base's config in the local
    Hugging Face cache or folder (no download; Nones when it is not there), the model built on ``meta``."""
    config = HFMemoryConfig.from_dict(model)
    _require_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        base_config = AutoConfig.from_pretrained(config.hf, revision=config.revision, local_files_only=True)
    except (OSError, ValueError):
        return config.to_dict(), None, None, None
    with torch.device("meta"):
        wrapped = HopeMemoryLM(AutoModelForCausalLM.from_config(base_config), config)
    return (config.to_dict(), int(base_config.vocab_size), wrapped.num_parameters(),
            wrapped.num_parameters(trainable_only=True))


__all__ = ["HFMemoryConfig", "HopeMemoryLM", "MemoryBlock", "MEMORY_KINDS", "build_for_run", "find_decoder_layers",
           "load_checkpoint", "plan_memory_model"]
