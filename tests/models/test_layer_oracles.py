"""The memory layers against float64 per-token oracles written from the papers' equations
(tests/models/layer_oracles.py): loss and every parameter gradient, at chunk 1 (the per-token recurrence) and at
chunk C (gradients at the chunk-start state), with odd T not a multiple of the chunk."""
import pytest
import torch

from hope.layers import TitanMemory
from hope.models.hope import HopeBlock
from tests.models._util import tiny
from tests.models.layer_oracles import F64, hope_block_oracle, titan_layer_oracle

TOL = 2e-4  # the layers compute in fp32


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def _compare(layer, y, oracle_y, P, seed=3):
    """loss = <y, R> for a fixed random R; compare the loss and every parameter's gradient."""
    R = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    loss = (y.double() * R).sum()
    loss_o = (oracle_y * R).sum()
    a, b = loss.item(), loss_o.item()
    assert abs(a - b) <= TOL * max(1.0, abs(b)), (a, b)
    layer.zero_grad()
    loss.backward()
    loss_o.backward()
    names = [n for n, _ in layer.named_parameters()]
    assert names and set(names) == set(P)
    for n, p in layer.named_parameters():
        assert p.grad is not None and P[n].grad is not None, n
        err = _rel(p.grad, P[n].grad)
        assert err < TOL, f"grad of {n}: rel err {err:.2e}"


def _perturb(module, scale=0.3, seed=0):
    """Move every parameter off its init (gates, biases, memories) so that no term vanishes by symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * p.abs().mean().clamp_min(0.05) * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("memory,rule", [("mlp", "titans"), ("mlp", "dgd"), ("linear", "titans"), ("linear", "dgd")])
@pytest.mark.parametrize("chunk", [1, 3])
def test_titan_memory_layer_matches_per_token_oracle(memory, rule, chunk):
    torch.manual_seed(0)
    layer = TitanMemory(8, 2, memory=memory, chunk_size=chunk, rule=rule, backend="reference")
    layer.reset_gate_bias()
    _perturb(layer)
    with torch.no_grad():  # gates in a range where lr, momentum and decay all matter
        layer.gates.bias.copy_(torch.tensor([-1.0, -1.0, 0.5, 0.5, -2.0, -2.0]))
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(1))
    y, _, _ = layer(x)
    y_o, P = titan_layer_oracle(layer, x, chunk)
    _compare(layer, y, y_o, P)


HOPE_VARIANTS = {
    "default": dict(),
    "paper_v": dict(normalize_v=False),
    "adaptive_q": dict(adaptive_q=True),
    "legacy": dict(adaptive_q=True, mem_readout="after_update", selfmod_momentum=True,
                   rule="titans"),
    "static_generators": dict(selfmod=False),
}


@pytest.mark.parametrize("variant", list(HOPE_VARIANTS))
@pytest.mark.parametrize("gen_chunk,mem_chunk", [(1, 1), (3, 4)])
def test_hope_block_matches_per_token_oracle(variant, gen_chunk, mem_chunk):
    """Self-modifying Titans + CMS block (static CMS weights) vs the oracle; T = 7 is a multiple of neither chunk."""
    torch.manual_seed(0)
    cfg = tiny("hope", d_model=8, n_heads=2, cms_hidden=6, cms_periods=(2, 4), cms_levels=2, gen_chunk_size=gen_chunk,
               mem_chunk_size=mem_chunk, backend="reference", **HOPE_VARIANTS[variant])
    block = HopeBlock(cfg)
    _perturb(block)
    with torch.no_grad():  # rates where lr and decay matter
        block.titans.gate_bias.copy_(torch.tensor([[-0.5, -1.0], [-2.0, -1.5]]))
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(1))
    y, _, _, _, _ = block(x, None, False)
    y_o, P = hope_block_oracle(block, x, gen_chunk=gen_chunk, mem_chunk=mem_chunk)
    _compare(block, y, y_o, P)
