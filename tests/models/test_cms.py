"""CMS levels (F2) and teach signal (F1): an update exactly when a level's block fills, telemetry over a stream
read in segments, shared vs exact teach signal."""
import pytest
import torch

from hope.layers.cms import CMSLevel
from hope.models import build_model
from hope.models.online import online_forward
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
    """shared: every level is taught with the head's delta (per-token units); exact: each level with the error at
    its own output, which differs from it below the last level."""
    torch.manual_seed(0)
    shared = build_model(tiny("hope", teach_signal="shared"))
    exact = build_model(tiny("hope", teach_signal="exact"))
    exact.load_state_dict(shared.state_dict())
    ids, labels = batch(shared.config, T=16)
    t_s = shared(ids, labels=labels, collect=True).aux["level_teach"]
    t_e = exact(ids, labels=labels, collect=True).aux["level_teach"]
    static = build_model(shared.config.replace(cms_mode="static"))
    static.load_state_dict(shared.state_dict())
    ref = static(ids, labels=labels)
    head = ref.teach_delta * ref.aux["n_valid"]  # d loss / d final hidden in per-token units
    for row in t_s:
        for _, d in row:
            torch.testing.assert_close(d, head, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(t_e[0][0][1], t_s[0][0][1])
    for (xs, _), (xe, _) in zip(t_s[0], t_e[0]):  # the same level inputs
        torch.testing.assert_close(xs, xe)
    r_s = online_forward(shared, ids, labels, segment_len=16)
    r_e = online_forward(exact, ids, labels, segment_len=16)
    assert r_s.metrics["cms/layer0/level0/update_norm"] != r_e.metrics["cms/layer0/level0/update_norm"]
