"""hope.train: ``python -m hope.train <config.yaml> [key=value ...]`` (see docs/reproduce_pilot.md).

    from hope.train import load_config, train
    summary = train(load_config("smoke", ["steps=50"]))      # a packaged config name, or a YAML path
    from hope.train.checkpoint import load_model   # (model, state_json) from a run / checkpoints / step folder
"""
from hope.train.config import TrainConfig, load_config
from hope.train.trainer import Trainer, train

__all__ = ["TrainConfig", "load_config", "Trainer", "train"]
