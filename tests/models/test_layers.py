"""Layers against plain references: sliding-window RoPE attention, causal conv with a cache, checks."""
import math

import pytest
import torch

from hope.layers import CausalDepthwiseConv, CMSLevel, SelfModifyingTitans, TitanMemory
from hope.layers.attention import Attention, apply_rope, rope_cos_sin


def test_sliding_window_attention_matches_naive_softmax():
    torch.manual_seed(0)
    attn = Attention(16, 2, window=3)
    x = torch.randn(2, 7, 16)
    y = attn(x, pos_offset=5)
    q, k, v = attn.qkv(x).view(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    cos, sin = rope_cos_sin(torch.arange(5, 12), 8, 10000.0, x.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    t = torch.arange(7)
    allowed = (t[:, None] >= t[None, :]) & (t[:, None] - t[None, :] < 3)
    ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
    torch.testing.assert_close(y, attn.out(ref.transpose(1, 2).reshape(2, 7, 16)), rtol=1e-5, atol=1e-6)


def test_rope_is_relative():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(i, j):
        ci, si = rope_cos_sin(torch.tensor([i]), 8, 10000.0, q.dtype)
        cj, sj = rope_cos_sin(torch.tensor([j]), 8, 10000.0, q.dtype)
        return float((apply_rope(q, ci, si) * apply_rope(k, cj, sj)).sum())
    assert abs(score(3, 1) - score(10, 8)) < 1e-5


def test_conv_cache_chains_segments():
    torch.manual_seed(0)
    conv = CausalDepthwiseConv(6, 4)
    x = torch.randn(2, 10, 6)
    full, _ = conv(x)
    a, cache = conv(x[:, :3])
    b, _ = conv(x[:, 3:], cache)
    torch.testing.assert_close(torch.cat([a, b], 1), full)


@pytest.mark.parametrize("layer", [lambda: TitanMemory(16, 2, chunk_size=4), lambda: SelfModifyingTitans(16, 2),
                                   lambda: CMSLevel(16, 8, 2)])
def test_layer_input_checks(layer):
    mod = layer()
    with pytest.raises(ValueError, match="x"):
        mod(torch.randn(2, 5, 15))
    with pytest.raises(TypeError, match="x"):
        mod(torch.zeros(2, 5, 16, dtype=torch.long))


def test_cms_level_slow_path_matches_cms_forward():
    from hope_kernels.cms_update import cms_forward

    torch.manual_seed(0)
    level = CMSLevel(16, 8, 2)
    x = torch.randn(3, 5, 16)
    w1, w2 = level.weights(3, None)
    torch.testing.assert_close(level(x), cms_forward(w1, w2, x), rtol=1e-5, atol=1e-6)
    st = level.fresh_state(3, "cpu")
    torch.testing.assert_close(level(x, st), level(x), rtol=1e-5, atol=1e-6)
