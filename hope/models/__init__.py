"""HOPE, TITAN (lmm, mag) and Transformer++ language models built from one :class:`ModelConfig`."""
from __future__ import annotations

from hope.models.base import LanguageModel, ModelOutput, ModelState
from hope.models.config import ModelConfig, preset, preset_names


def model_config_for(model: dict, vocab_size: int, *, seq_len: int | None = None) -> ModelConfig:
    """ModelConfig from a run config's ``model:`` mapping (``{preset: ..., <ModelConfig field>: ...}``).

    ``vocab_size`` (the tokenizer's) is the default vocabulary and a lower bound; ``max_seq_len`` is raised to
    ``seq_len`` when shorter. Bad keys or values raise ValueError prefixed with ``model:``.
    """
    fields = dict(model)
    name = fields.pop("preset", None)
    fields.setdefault("vocab_size", vocab_size)
    try:
        mcfg = preset(name, **fields) if name is not None else ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model: {e}") from None
    if mcfg.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size: {mcfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
    if seq_len is not None and mcfg.max_seq_len < seq_len:
        mcfg = mcfg.replace(max_seq_len=seq_len)
    return mcfg


def build_model(config: ModelConfig) -> LanguageModel:
    """The nn.Module for ``config.arch`` (``model.config is config``)."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    config.validate()
    if config.arch == "transformer":
        from hope.models.transformer import TransformerLM

        return TransformerLM(config)
    if config.arch == "titan":
        from hope.models.titan import TitanLM

        return TitanLM(config)
    from hope.models.hope import HopeLM

    return HopeLM(config)


__all__ = ["build_model", "model_config_for", "ModelConfig", "ModelOutput", "ModelState", "LanguageModel", "preset",
           "preset_names"]
