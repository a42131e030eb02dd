"""Causal depthwise 1-D convolution with a carried cache (the last window-1 inputs of a segment)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalDepthwiseConv(nn.Module):
    """y_t = sum_{j<w} a_j * x_{t-j} per channel; causal, so y_t never sees x_{>t}.

    ``forward(x, cache)`` with x [B, T, C] and cache [B, w-1, C] (previous inputs, or None = zeros)
    returns ``(y, new_cache)``; chaining segments with the cache equals one call on the whole sequence.
    """

    def __init__(self, channels: int, window: int = 4):
        super().__init__()
        self.window = window
        self.weight = nn.Parameter(torch.zeros(channels, 1, window))
        with torch.no_grad():  # start near identity (last tap = 1) so early training sees x_t
            self.weight[:, 0, -1] = 1.0
            self.weight[:, 0, :-1].normal_(0.0, 0.02)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        B, T, C = x.shape
        w = self.window
        if cache is None:
            cache = x.new_zeros(B, w - 1, C)
        xx = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, T + w - 1, C]
        y = F.conv1d(xx.transpose(1, 2), self.weight.to(x.dtype), groups=C).transpose(1, 2)
        return y, xx[:, xx.shape[1] - (w - 1):]
