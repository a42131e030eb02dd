"""hope.train: ``python -m hope.train <config.yaml> [key=value ...]`` (see docs/reproduce_pilot.md, docs/runs.md).

    from hope.train import load_config, train
    summary = train(load_config("smoke", ["steps=50"]))      # a packaged config name, or a YAML path
    from hope.train.checkpoint import load_model   # (model, state_json) from a run / checkpoints / step folder
"""
from hope.train.config import TrainConfig, load_config
from hope.train.errors import DivergenceError, RunError


def __getattr__(name):  # the trainer imports torch and the models: only when asked for
    if name in ("Trainer", "train"):
        from hope.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hope.train' has no attribute {name!r}")


__all__ = ["TrainConfig", "load_config", "Trainer", "train", "RunError", "DivergenceError"]
