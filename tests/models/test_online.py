"""Online (segment-by-segment) mode vs the parallel forward, test-time memorisation, DGD toy regression."""
import pytest
import torch

from hope.models import build_model
from hope.models.online import memorize, online_forward
from hope_kernels import titan_memory_update
from hope_kernels.titan_memory_update import LinearMemoryState
from tests.models._util import batch, tiny


@pytest.mark.parametrize("name", ["transformer", "titan-mag", "hope"])
def test_online_one_segment_equals_parallel(name):
    torch.manual_seed(0)
    model = build_model(tiny(name))
    ids, labels = batch(model.config, T=16)
    res = online_forward(model, ids, labels, segment_len=16)
    out = model(ids, labels=labels)
    torch.testing.assert_close(res.loss, out.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["titan-lmm", "titan-mag", "hope"])
def test_chained_segments_equal_one_pass(name):
    """Segments aligned with the memory chunks, CMS without in-context updates (the sequential form's chaining:
    tests/models/test_continual_cms.py): carrying the state (memories, conv cache, RoPE offset, persistent tokens
    once) reproduces the single forward exactly."""
    torch.manual_seed(0)
    model = build_model(tiny(name, window=64, **({"cms_mode": "static"} if name == "hope" else {})))  # mag: window >= T
    ids, labels = batch(model.config, T=16)
    full = model(ids, return_logits=True)
    st, parts = None, []
    for s in (slice(0, 8), slice(8, 16)):
        o = model(ids[:, s], state=st, return_state=True, return_logits=True)
        st, parts = o.state, parts + [o.logits]
    if name == "titan-mag":  # attention sees only its own segment: only the first segment must match
        torch.testing.assert_close(parts[0], full.logits[:, :8], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(torch.cat(parts, 1), full.logits, rtol=1e-4, atol=1e-5)
    res = online_forward(model, ids, labels, segment_len=8)
    if name != "titan-mag":
        torch.testing.assert_close(res.loss, model(ids, labels=labels).loss, rtol=1e-5, atol=1e-6)


def test_memorize_changes_state_deterministically_and_never_sees_the_answer():
    torch.manual_seed(0)
    model = build_model(tiny("hope"))
    ids, _ = batch(model.config, T=16)
    s1, s2 = memorize(model, ids), memorize(model, ids)
    for a, b in zip(s1.layers, s2.layers):
        torch.testing.assert_close(a["mem"].W1, b["mem"].W1, rtol=0, atol=0)
        assert [c.update_count for c in a["cms"]] == [c.update_count for c in b["cms"]]
    init = model.blocks[0].titans.mem_w1
    assert not torch.allclose(s1.layers[0]["mem"].W1[0], init)
    assert all(c.update_count > 0 for c in s1.layers[0]["cms"])
    only_cms = memorize(model, ids, paths=("cms",))
    assert only_cms.layers[0]["mem"] is None and only_cms.layers[0]["cms"] is not None
    only_titan = memorize(model, ids, paths=("titan",))
    assert only_titan.layers[0]["cms"] is None
    # scoring a continuation with the memorised state runs and differs from a fresh start
    cont, cont_labels = batch(model.config, T=8, seed=1)
    a = model(cont, labels=cont_labels, state=s1).loss
    b = model(cont, labels=cont_labels).loss
    assert torch.isfinite(a) and not torch.allclose(a, b)
    assert memorize(build_model(tiny("transformer")), ids) is None
    with pytest.raises(ValueError, match="paths"):
        memorize(model, ids, paths=("attention",))
    with pytest.raises(ValueError, match="steps"):
        memorize(model, ids, steps=0)


def test_memorize_cms_improves_loss_on_repeated_fact():
    """The CMS path taught on a context lowers the loss of that same 'fact' when it repeats."""
    torch.manual_seed(0)
    model = build_model(tiny("hope", cms_lr=0.05, cms_beta=0.0, cms_periods=(4, 8, 16)))
    fact, labels = batch(model.config, B=1, T=16, seed=3)
    base = model(fact, labels=labels).loss.item()
    st = memorize(model, fact, paths=("cms",), steps=3)
    after = model(fact, labels=labels, state=st).loss.item()
    assert after < base - 0.05, (base, after)


def test_dgd_toy_regression_objective_decreases():
    """DGD rule (NL eq. 56-57) on a fixed linear regression y = A x: the objective 0.5 ||W x - y||^2
    over the data set decreases pass after pass."""
    torch.manual_seed(0)
    D, N = 8, 8
    A = torch.randn(D, D) / D ** 0.5
    X = torch.nn.functional.normalize(torch.randn(N, D), dim=-1)
    Y = X @ A.T
    k = X[None, None]
    v = Y[None, None]
    gates = lambda x: torch.full((1, 1, N), x)  # noqa: E731
    state = LinearMemoryState(torch.zeros(1, 1, D, D), torch.zeros(1, 1, D, D))
    losses = [0.5 * float((Y ** 2).sum())]  # W = 0
    for _ in range(8):
        _, state = titan_memory_update(k, k, v, gates(0.3), gates(0.0), gates(0.0), chunk_size=1, memory="linear",
                                       rule="dgd", state=state)
        W = state.W[0, 0]
        losses.append(0.5 * float(((X @ W.T - Y) ** 2).sum()))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.6 * losses[0], losses


def test_memorized_state_expands_to_several_choices():
    torch.manual_seed(0)
    model = build_model(tiny("hope"))
    ctx, _ = batch(model.config, B=1, T=16)
    st = memorize(model, ctx)
    choices, labels = batch(model.config, B=3, T=6, seed=2)
    many = model(choices, labels=labels, state=st.expand_batch(3), return_logits=True).logits
    for i in range(3):
        one = model(choices[i:i + 1], state=st, return_logits=True).logits
        torch.testing.assert_close(many[i:i + 1], one, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch size"):
        st.expand_batch(3).expand_batch(2)
