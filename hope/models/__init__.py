"""HOPE, TITAN (lmm, mag) and Transformer++ language models built from one :class:`ModelConfig`."""
from __future__ import annotations

from hope.models.base import LanguageModel, ModelOutput, ModelState
from hope.models.config import ModelConfig, preset, preset_names


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


__all__ = ["build_model", "ModelConfig", "ModelOutput", "ModelState", "LanguageModel", "preset", "preset_names"]
