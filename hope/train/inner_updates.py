"""The parallel mode's inner updates: after the outer step, each CMS level's slow weights take their own update
from the step's teach signal (``hope.models.online.apply_parallel_inner_updates``), then the CMS tensors are
averaged over ranks so every replica keeps the same weights."""
from __future__ import annotations

import contextlib

from hope.train import distributed as D


class ParallelInnerUpdates:
    def __init__(self, model, info: D.DistInfo, fsdp: bool):
        self.model, self.info, self.fsdp = model, info, fsdp

    def _cms_tensors(self) -> list:
        named = list(self.model.named_parameters()) + list(self.model.named_buffers())
        return [t.data for n, t in named if "cms." in n]

    def __call__(self, out, teach_scale: float) -> dict:
        """Apply the inner updates of a parallel-mode forward's output ``out``; returns their telemetry."""
        from hope.models.online import apply_parallel_inner_updates

        # under FSDP the CMS slow weights are gathered whole for the in-place inner updates, then resharded
        cms_names = sorted(n for n, _ in self.model.named_parameters() if "cms." in n)
        gathered = D.gathered_parameters(self.model, cms_names) if self.fsdp else contextlib.nullcontext()
        with gathered:
            metrics = apply_parallel_inner_updates(self.model, out, teach_scale)
            D.average_tensors(self._cms_tensors(), self.info)
        return metrics


__all__ = ["ParallelInnerUpdates"]
