"""clip_memory_update: bounds one in-context memory update per (sample, head), leaves small ones alone."""
import torch

from hope.layers.titan_memory import clip_memory_update
from hope_kernels.titan_memory_update import MLPMemoryState


def _state(scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MLPMemoryState(*(scale * torch.randn(2, 3, *s, generator=g, dtype=torch.float64)
                            for s in [(4, 6), (6, 4), (4, 6), (6, 4)]))


def _ratio(old, new):
    d = sum((n - o).pow(2).sum((-2, -1)) for n, o in zip(new[:2], old[:2])).sqrt()
    w = sum(o.pow(2).sum((-2, -1)) for o in old[:2]).sqrt()
    return d / w


def test_small_update_is_untouched_and_large_one_is_bounded():
    old = _state()
    small = MLPMemoryState(*(o + 1e-3 * d for o, d in zip(old, _state(seed=1))))
    out = clip_memory_update(old, small, 0.1)
    for a, b in zip(out, small):
        assert torch.equal(a, b)
    big = MLPMemoryState(*(o + 10.0 * d for o, d in zip(old, _state(seed=2))))
    out = clip_memory_update(old, big, 0.1)
    torch.testing.assert_close(_ratio(old, out), torch.full((2, 3), 0.1, dtype=torch.float64))
    # the direction is kept: the clipped change is a positive multiple of the original one
    cos = torch.nn.functional.cosine_similarity((out.W1 - old.W1).flatten(2), (big.W1 - old.W1).flatten(2), dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_gradients_flow_and_stay_finite():
    old = MLPMemoryState(*(t.requires_grad_() for t in _state()))
    new = MLPMemoryState(*(o * 5.0 for o in old))
    out = clip_memory_update(old, new, 0.1)
    sum(t.sum() for t in out).backward()
    assert all(torch.isfinite(t.grad).all() for t in old)


def test_chunked_mem_path_equals_one_call_when_nothing_is_clipped():
    """mem_update_clip > 0 runs M_mem chunk by chunk; with a bound never reached it equals the single call."""
    from hope.layers.self_modifying import SelfModifyingTitans

    torch.manual_seed(0)
    x = torch.randn(2, 21, 32)
    outs = []
    for clip in (0.0, 1e9):
        torch.manual_seed(1)
        layer = SelfModifyingTitans(32, 2, mem_chunk_size=8, gen_chunk_size=4, mem_update_clip=clip)
        y, state, _ = layer(x)
        outs.append((y, state["mem"]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_titan_memory_bound_chunks_equal_one_call_and_bound_a_large_update():
    """TitanMemory with update_clip > 0 runs its memory chunk by chunk: with a bound never reached it equals the
    single call; with a tight one every chunk's update is rescaled, and the fraction is reported."""
    from hope.layers import TitanMemory

    x = torch.randn(2, 21, 16, generator=torch.Generator().manual_seed(0))
    outs = []
    for clip in (0.0, 1e9, 1e-3):
        torch.manual_seed(1)
        layer = TitanMemory(16, 2, chunk_size=8, update_clip=clip)
        y, state, metrics = layer(x)
        outs.append((y, state["mem"], metrics["memory_clip_fraction"]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(outs[1][2]) == 0.0 and float(outs[2][2]) == 1.0
    assert not torch.allclose(outs[2][0], outs[0][0])
