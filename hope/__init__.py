"""hope: HOPE (self-modifying Titans + Continuum Memory System) and TITAN models, trainer, evaluation.

The stable public API (docs/library.md) is importable from here; each name loads its module on first use, so
``import hope`` stays cheap::

    from hope import SelfModifyingTitans, CMSChain, TitanMemory           # layers (nn.Modules)
    from hope import build_model, preset, ModelConfig, memorize           # models
    from hope import titan_memory_update, teach_signal, cms_update        # fused ops (hope_kernels)
    from hope import self_modifying_titans                                # the self-modifying layer as one op
    from hope import load_config, prepare, TrainConfig                    # configs and data
    from hope.train import train                                          # the trainer (hope.train is its package)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "titan_memory_update": "hope_kernels",
    "teach_signal": "hope_kernels",
    "cms_update": "hope_kernels",
    "self_modifying_titans": "hope_kernels",
    "TitanMemory": "hope.layers",
    "SelfModifyingTitans": "hope.layers",
    "CMSChain": "hope.layers",
    "ModelConfig": "hope.models",
    "ModelOutput": "hope.models",
    "ModelState": "hope.models",
    "LanguageModel": "hope.models",
    "build_model": "hope.models",
    "preset": "hope.models",
    "preset_names": "hope.models",
    "memorize": "hope.models.online",
    "TrainConfig": "hope.train",
    "load_config": "hope.train",
    "prepare": "hope.data",
    "Tokenizer": "hope.data",
    "config_names": "hope.configs",
    "resolve_config": "hope.configs",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # static analysers and IDEs see the real definitions
    from hope.configs import config_names, resolve_config
    from hope.data import Tokenizer, prepare
    from hope.layers import CMSChain, SelfModifyingTitans, TitanMemory
    from hope.models import LanguageModel, ModelConfig, ModelOutput, ModelState, build_model, preset, preset_names
    from hope.models.online import memorize
    from hope.train import TrainConfig, load_config
    from hope_kernels import cms_update, self_modifying_titans, teach_signal, titan_memory_update


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
