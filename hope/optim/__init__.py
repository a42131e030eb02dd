"""Outer optimizers (AdamW, Muon mix), parameter groups and schedules for hope.train."""
from hope.optim.schedules import lr_at, teach_scale_at
from hope.optim.groups import build_optimizers, memory_parameter_names, split_parameters

__all__ = ["lr_at", "teach_scale_at", "build_optimizers", "memory_parameter_names", "split_parameters"]
