"""CMS online path (F2) and teach signal (F1): buffers sized to the period, an update exactly when a
buffer fills, telemetry, shared vs exact teach signal, parallel-mode inner updates."""
import pytest
import torch

from hope.layers.cms import CMSLevel
from hope.models import build_model
from hope.models.online import apply_parallel_inner_updates, level_deltas, online_forward
from hope_kernels import cms_update
from hope_kernels.cms_update import CMSParams
from tests.models._util import batch, tiny


def test_period_3_fires_exactly_every_three_tokens():
    torch.manual_seed(0)
    level = CMSLevel(dim=8, hidden=12, period=3)
    st = level.fresh_state(2, "cpu")
    x, d = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    counts = []
    for t in range(10):  # one token at a time
        before = st.off1.clone()
        st = level.push(st, x[:, t:t + 1], d[:, t:t + 1], lr=0.1, beta=0.9, precond=False)
        counts.append(st.update_count)
        assert st.fill == (t + 1) % 3
        assert torch.equal(before, st.off1) != (t % 3 == 2)  # the weights change only when the buffer fills
    assert counts == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    # the update that fired on tokens 6..8 is cms_update on exactly those tokens (and the buffer was cleared)
    st6 = level.fresh_state(2, "cpu")
    st6 = level.push(st6, x[:, :6], d[:, :6], lr=0.1, beta=0.9, precond=False)
    p = CMSParams(level.w1.detach() + st6.off1, level.w2.detach() + st6.off2)
    ref, _, _ = cms_update(p, CMSParams(st6.mom1, st6.mom2), x[:, 6:9], d[:, 6:9], lr=0.1, beta=0.9)
    torch.testing.assert_close(level.w1.detach() + st.off1, ref.w1, rtol=1e-5, atol=1e-6)
    assert st.buf_x[:, 0].abs().sum() > 0 and st.fill == 1  # token 9 waits in the buffer


def test_chain_periods_1_4_16_online():
    torch.manual_seed(0)
    model = build_model(tiny("hope", n_layers=1, cms_periods=(1, 4, 16)))
    ids, labels = batch(model.config, T=20)
    res = online_forward(model, ids, labels, segment_len=5)
    m = res.metrics
    assert [m[f"cms/layer0/level{j}/update_count"] for j in range(3)] == [20.0, 5.0, 1.0]
    fills = [st.fill for st in res.state.layers[0]["cms"]]
    assert fills == [0, 0, 4]
    for j in range(3):
        for key in ("update_count", "update_norm", "teach_signal_norm"):
            v = m[f"cms/layer0/level{j}/{key}"]
            assert v == v and v > 0, key  # finite (not NaN) and positive
    assert m["teach_signal_norm"] > 0 and "loss" in m


def test_shared_vs_exact_teach_signal():
    torch.manual_seed(0)
    shared = build_model(tiny("hope", teach_signal="shared"))
    exact = build_model(tiny("hope", teach_signal="exact"))
    exact.load_state_dict(shared.state_dict())
    ids, labels = batch(shared.config, T=16)
    out_s = shared(ids, labels=labels, collect=True)
    out_e = exact(ids, labels=labels, collect=True)
    n = out_s.aux["n_valid"]
    d_s = level_deltas(shared, out_s, 1.0)
    d_e = level_deltas(exact, out_e, 1.0)
    # shared: the head delta (per-token units) for every level
    for row in d_s:
        for d in row:
            torch.testing.assert_close(d, out_s.teach_delta * n)
    # exact: d loss / d level output, checked against autograd on a fresh graph
    last = out_e.aux["level_outputs"][-1][-1]
    g = torch.autograd.grad(out_e.loss, last, retain_graph=True)[0]
    torch.testing.assert_close(d_e[-1][-1], g * n)
    assert not torch.allclose(d_e[0][0], d_s[0][0])
    # parallel mode's hooks capture the same exact deltas during the outer backward
    exact.train()
    out_p = exact(ids, labels=labels)
    out_p.loss.backward()
    hooked = level_deltas(exact, out_p, 1.0, from_hooks=True)
    torch.testing.assert_close(hooked[0][0], d_e[0][0], rtol=1e-4, atol=1e-6)
    # the online updates differ between the two signals
    r_s = online_forward(shared, ids, labels, segment_len=16)
    r_e = online_forward(exact, ids, labels, segment_len=16)
    assert r_s.metrics["cms/layer0/level0/update_norm"] != r_e.metrics["cms/layer0/level0/update_norm"]


def test_parallel_inner_updates_apply_cms_update_to_slow_weights():
    torch.manual_seed(0)
    model = build_model(tiny("hope", n_layers=1, cms_periods=(4, 8), cms_levels=2, teach_signal="shared")).train()
    ids, labels = batch(model.config, B=2, T=16)
    out = model(ids, labels=labels)
    out.loss.backward()
    level = model.blocks[0].cms.levels[1]
    w1, w2 = level.w1.detach().clone(), level.w2.detach().clone()
    # expected: two sequential cms_update steps on the 8-token blocks, batch folded, delta / B
    x = out.aux["level_inputs"][0][1].float()
    d = out.teach_delta.float() * out.aux["n_valid"] * 0.5 / 2
    p, m = CMSParams(w1[None], w2[None]), CMSParams(torch.zeros_like(w1)[None], torch.zeros_like(w2)[None])
    for u in range(2):
        p, m, _ = cms_update(p, m, x[:, 8 * u:8 * u + 8].reshape(1, 16, -1), d[:, 8 * u:8 * u + 8].reshape(1, 16, -1),
                             lr=model.config.cms_lr, beta=model.config.cms_beta)
    metrics = apply_parallel_inner_updates(model, out, teach_scale=0.5)
    assert metrics["cms/layer0/level0/update_count"] == 4 and metrics["cms/layer0/level1/update_count"] == 2
    torch.testing.assert_close(level.w1.detach(), p.w1[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(level.w2.detach(), p.w2[0], rtol=1e-5, atol=1e-7)
    assert not torch.equal(level.w1.detach(), w1)
    # teach_scale 0: nothing changes
    w1b = level.w1.detach().clone()
    assert apply_parallel_inner_updates(model, out, 0.0) == {}
    assert torch.equal(level.w1.detach(), w1b)
    with pytest.raises(ValueError, match="teach_scale"):
        apply_parallel_inner_updates(model, out, -1.0)
    with pytest.raises(TypeError, match="out"):
        apply_parallel_inner_updates(model, {"loss": 1}, 1.0)
