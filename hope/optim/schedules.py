"""Learning-rate and teach-scale schedules (pure functions of the step, so resume is exact)."""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def teach_scale_at(step: int, total_steps: int, scale: float, warmup_steps: int, decay_to: float) -> float:
    """Teach-signal scale of the inner updates: linear ramp to ``scale``, then linear decay to ``scale*decay_to``."""
    if warmup_steps > 0 and step < warmup_steps:
        return scale * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return scale * (1.0 + (decay_to - 1.0) * progress)
