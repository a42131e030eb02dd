"""HOPE's continuum memory learning within the sequence (NL eq. 70-71; hope/models/hope.py): weights constant inside
a level's block and updated at each boundary, causal, floor(T / period) updates per sequence, the chunk-parallel
form against the float64 per-token oracle and against the exact sequential form, memorisation."""
import pytest
import torch
import torch.nn.functional as F

from hope.layers.cms import CMSLevel
from hope.models import build_model
from hope.models.hope import HopeBlock
from hope.models.online import memorize, online_forward
from hope_kernels import cms_update
from hope_kernels.cms_update import CMSParams, cms_forward
from tests.models._util import batch, tiny
from tests.models.layer_oracles import F64, cms_continual_oracle, hope_block_oracle, params64
from tests.models.test_layer_oracles import _compare, _perturb

MODES = ["chunk_parallel", "sequential"]


def _mode(mode) -> dict:
    """Config fields of a CMS mode (the default one written as no field at all)."""
    return {} if mode == "chunk_parallel" else {"cms_mode": mode}


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def test_weights_constant_inside_each_block_and_updated_at_each_boundary():
    """Each token of level j is read with W(m) = the slow weights + the updates fired at the boundaries before it;
    the updates are cms_update's momentum SGD on each finished block's (input, error) pairs, all taken at the
    segment-start weights."""
    torch.manual_seed(0)
    model = build_model(tiny("hope", n_layers=2, cms_periods=(3, 5), cms_levels=2, cms_lr=0.05)).eval()
    ids, labels = batch(model.config, T=13)
    out = model(ids, labels=labels, collect=True)
    cfg = model.config
    for i, block in enumerate(model.blocks):
        for j, level in enumerate(block.cms.levels):
            x, y = out.aux["level_inputs"][i][j], out.aux["level_outputs"][i][j]
            tx, td = out.aux["level_teach"][i][j]
            B, T, _ = x.shape
            P = level.period
            w0 = CMSParams(*(w.detach().float().unsqueeze(0).expand(B, *w.shape).contiguous() for w in (level.w1, level.w2)))
            weights, mom = [w0], CMSParams(torch.zeros_like(w0.w1), torch.zeros_like(w0.w2))
            for m in range(T // P):  # W(m + 1) = W(m) - lr m_m, m_m = beta m_{m-1} + g_m(W(0))
                sl = slice(m * P, (m + 1) * P)
                stepped, mom, _ = cms_update(w0, mom, tx[:, sl].contiguous(), td[:, sl].contiguous(), lr=cfg.cms_lr,
                                             beta=cfg.cms_beta)
                weights.append(CMSParams(*(w + (s - z) for w, s, z in zip(weights[-1], stepped, w0))))
            for m in range(len(weights) - 1):
                assert (weights[m + 1].w1 - weights[m].w1).abs().max() > 1e-6, (i, j, m)  # changes at the boundary
            for t in range(T):
                wm = weights[t // P]  # constant inside the block
                torch.testing.assert_close(y[:, t:t + 1], cms_forward(wm.w1, wm.w2, x[:, t:t + 1]), rtol=1e-4,
                                           atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_each_level_fires_floor_T_over_period_updates(mode):
    torch.manual_seed(0)
    model = build_model(tiny("hope", cms_periods=(2, 4, 8), **_mode(mode)))
    ids, labels = batch(model.config, T=13)
    out = model(ids, labels=labels, return_state=True)
    for i, layer in enumerate(out.state.layers):
        assert [st.update_count for st in layer["cms"]] == [6, 3, 1]
        assert [st.fill for st in layer["cms"]] == [1, 1, 5]  # the open blocks wait for the next call
        for j in range(3):
            assert out.metrics[f"cms/layer{i}/level{j}/update_count"] == [6, 3, 1][j]
            assert out.metrics[f"cms/layer{i}/level{j}/update_norm"] > 0
    assert out.metrics["cms/level0/update_count"] == 12


@pytest.mark.parametrize("mode", MODES)
def test_perturbing_token_t_changes_no_output_before_t(mode):
    """Every update that reads token t's label or input fires at or after t: outputs before t never move, and the
    CMS path carries the change to later blocks (the static model's logits there change less)."""
    torch.manual_seed(0)
    model = build_model(tiny("hope", cms_periods=(2, 4), cms_levels=2, cms_lr=0.05, **_mode(mode))).eval()
    ids, labels = batch(model.config, T=16)
    base = model(ids, labels=labels, return_logits=True).logits
    for t in (3, 8, 15):
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 7) % model.config.vocab_size
        labels2 = labels.clone()
        labels2[:, t - 1] = ids2[:, t]
        pert = model(ids2, labels=labels2, return_logits=True).logits
        torch.testing.assert_close(pert[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(pert[:, t], base[:, t])
    # the last label (the stream's next token) only reaches the state, never an output of this call
    labels3 = labels.clone()
    labels3[:, -1] = (labels3[:, -1] + 1) % model.config.vocab_size
    a = model(ids, labels=labels, return_logits=True, return_state=True)
    b = model(ids, labels=labels3, return_logits=True, return_state=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert not torch.equal(a.state.layers[0]["cms"][0].off1, b.state.layers[0]["cms"][0].off1)


def test_chunk_parallel_teach_signal_is_each_tokens_own_loss_gradient():
    """The teach pass's error of level j at token t is d loss_t / d y_t (the token's own next-token loss, all
    paths) at the segment-start weights: with o_t = M_{t-1}(q_t), every other path from y_t reaches only later
    tokens."""
    torch.manual_seed(0)
    cfg = tiny("hope", n_layers=2, cms_periods=(4, 8), cms_levels=2)
    model = build_model(cfg).eval()
    ids, labels = batch(cfg, B=2, T=9)
    teach = model(ids, labels=labels, collect=True).aux["level_teach"]
    static = build_model(cfg.replace(cms_mode="static"))
    static.load_state_dict(model.state_dict())
    out = static(ids, labels=labels, collect=True, return_logits=True)
    outputs = [o for row in out.aux["level_outputs"] for o in row]
    lp = F.log_softmax(out.logits.double(), -1)
    for (_, err) in [e for row in teach for e in row]:
        assert torch.equal(err[:, 8], torch.zeros_like(err[:, 8]))  # the last token has no label
    for t in range(8):
        loss_t = -lp[:, t].gather(-1, labels[:, t:t + 1]).sum()
        grads = torch.autograd.grad(loss_t, outputs, retain_graph=True)
        for (_, err), g in zip([e for row in teach for e in row], grads):
            torch.testing.assert_close(err[:, t], g[:, t].float(), rtol=1e-4, atol=1e-6)


def test_first_block_titans_shared_by_the_teach_pass_and_the_forward():
    """The first block's self-modifying Titans runs once per step (the teach pass reads it at the forward's own input
    and state): the same loss, every gradient and every teach error as running it in each pass (a test-side model
    that never shares it, as under FSDP)."""
    from hope.models.hope import HopeLM

    class Unshared(HopeLM):
        def _first_titans(self, x, state):
            return None

    torch.manual_seed(0)
    cfg = tiny("hope", n_layers=2, cms_periods=(4, 8), cms_levels=2)
    shared = build_model(cfg)
    unshared = Unshared(cfg)
    unshared.load_state_dict(shared.state_dict())
    ids, labels = batch(cfg, B=2, T=13)
    results = []
    for model in (shared, unshared):
        out = model(ids, labels=labels, collect=True)
        out.loss.backward()
        teach = [e for row in out.aux["level_teach"] for _, e in row]
        results.append((out.loss.detach(), teach, {n: p.grad for n, p in model.named_parameters()}))
    (loss_s, teach_s, grads_s), (loss_u, teach_u, grads_u) = results
    torch.testing.assert_close(loss_s, loss_u, rtol=1e-6, atol=0)
    for a, b in zip(teach_s, teach_u):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for name, g in grads_u.items():
        assert g is not None and torch.isfinite(grads_s[name]).all(), name
        torch.testing.assert_close(grads_s[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_chunk_parallel_equals_sequential_when_one_update_is_read():
    """One layer (its errors are each token's own loss gradient either way), T = 2 periods of the fastest level:
    the only update any token reads is taken at the slow weights in both forms, so loss and every gradient match
    (memory chunks = the fastest period: the sequential form calls the layers once per block, which restarts their
    chunks)."""
    results = []
    for mode in MODES:
        torch.manual_seed(0)
        model = build_model(tiny("hope", n_layers=1, cms_periods=(4, 16), cms_levels=2, cms_mode=mode, cms_lr=0.05,
                                 mem_chunk_size=4, gen_chunk_size=4))
        ids, labels = batch(model.config, T=8)
        out = model(ids, labels=labels)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for n in ga:
        assert _rel(ga[n], gb[n]) < 1e-4, n


def test_sequential_chained_segments_equal_one_pass():
    """Segments that end at boundaries of every level and memory chunk: carrying the state equals one call."""
    torch.manual_seed(0)
    model = build_model(tiny("hope", cms_periods=(2, 4), cms_levels=2, cms_mode="sequential", cms_lr=0.05))
    ids, labels = batch(model.config, T=16)
    full = model(ids, labels=labels, return_logits=True, return_state=True)
    st, parts = None, []
    for s in (slice(0, 8), slice(8, 16)):
        o = model(ids[:, s], labels=labels[:, s], state=st, return_state=True, return_logits=True)
        st, parts = o.state, parts + [o.logits]
    torch.testing.assert_close(torch.cat(parts, 1), full.logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(st.layers[0]["cms"], full.state.layers[0]["cms"]):
        assert a.update_count == b.update_count
        torch.testing.assert_close(a.off1, b.off1, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fill,carried", [(0, False), (2, True)])
def test_level_chunk_parallel_matches_per_token_oracle(fill, carried):
    """CMSLevel.continual vs the float64 oracle (gradients at the call's start weights), T = 11 not a multiple of the
    period, with and without a carried state (open block, offsets, momenta): outputs, end state, and the gradients of
    a loss of the outputs w.r.t. the slow weights and the inputs."""
    torch.manual_seed(0)
    D, E, P, T, B = 6, 5, 3, 11, 2
    lr, beta = 0.3, 0.7
    level = CMSLevel(D, E, P)
    _perturb(level, scale=1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g, requires_grad=True)
    tx, td = torch.randn(B, T, D, generator=g), 0.5 * torch.randn(B, T, D, generator=g)
    st = level.fresh_state(B, "cpu")
    if carried:
        st.off1, st.off2 = 0.05 * torch.randn(B, E, D, generator=g), 0.05 * torch.randn(B, D, E, generator=g)
        st.mom1, st.mom2 = 0.1 * torch.randn(B, E, D, generator=g), 0.1 * torch.randn(B, D, E, generator=g)
        st.buf_x[:, :fill], st.buf_delta[:, :fill] = torch.randn(B, fill, D, generator=g), torch.randn(B, fill, D, generator=g)
        st.fill, st.update_count = fill, 4
    y, new = level.continual(x, tx, td, st, lr=lr, beta=beta)
    P64 = params64(level)
    x64 = x.detach().double().requires_grad_(True)
    ys = []
    for b in range(B):
        kw = {}
        if carried:
            kw = dict(fill=fill, off=(st.off1[b].double(), st.off2[b].double()),
                      mom=(st.mom1[b].double(), st.mom2[b].double()),
                      buf=list(zip(st.buf_x[b].double(), st.buf_delta[b].double())))
        yb, off, mom, fired = cms_continual_oracle(P64["w1"], P64["w2"], x64[b], tx[b].double(), td[b].double(),
                                                   period=P, lr=lr, beta=beta, **kw)
        ys.append(yb)
        assert new.update_count - st.update_count == fired == (fill + T) // P
        for a, o in zip((new.off1[b], new.off2[b], new.mom1[b], new.mom2[b]), off + mom):
            assert _rel(a, o) < 1e-5
    assert new.fill == (fill + T) % P
    y64 = torch.stack(ys)
    R = torch.randn(y.shape, generator=g, dtype=F64)
    loss, loss64 = (y.double() * R).sum(), (y64 * R).sum()
    assert abs(loss.item() - loss64.item()) < 1e-5 * max(1.0, abs(loss64.item()))
    loss.backward()
    loss64.backward()
    assert _rel(level.w1.grad, P64["w1"].grad) < 1e-5 and _rel(level.w2.grad, P64["w2"].grad) < 1e-5
    assert _rel(x.grad, x64.grad) < 1e-5


def test_level_sequential_form_matches_per_token_oracle():
    """The sequential form (read a block with the current weights, then ``push`` fires cms_update at the weights
    current at the boundary) vs the oracle with gradients at the current weights."""
    torch.manual_seed(0)
    D, E, P, T = 6, 5, 3, 10
    lr, beta = 0.3, 0.7
    level = CMSLevel(D, E, P)
    _perturb(level, scale=1.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, T, D, generator=g, requires_grad=True)
    td = 0.5 * torch.randn(1, T, D, generator=g)
    st, ys = level.fresh_state(1, "cpu"), []
    for s in range(0, T, P):
        sl = slice(s, min(T, s + P))
        ys.append(level(x[:, sl], st))
        st = level.push(st, x[:, sl].detach(), td[:, sl], lr=lr, beta=beta, precond=False, backend="reference")
    y = torch.cat(ys, 1)
    P64 = params64(level)
    x64 = x.detach().double().requires_grad_(True)
    y64, off, mom, fired = cms_continual_oracle(P64["w1"], P64["w2"], x64[0], x64[0].detach(), td[0].double(), period=P,
                                                lr=lr, beta=beta, start_grads=False)
    assert fired == st.update_count == T // P
    assert _rel(st.off1[0], off[0]) < 1e-5 and _rel(st.mom2[0], mom[1]) < 1e-5
    R = torch.randn(y64.shape, generator=g, dtype=F64)
    loss, loss64 = (y[0].double() * R).sum(), (y64 * R).sum()
    loss.backward()
    loss64.backward()
    assert abs(loss.item() - loss64.item()) < 1e-5 * max(1.0, abs(loss64.item()))
    assert _rel(level.w1.grad, P64["w1"].grad) < 1e-5 and _rel(x.grad[0], x64.grad) < 1e-5


@pytest.mark.parametrize("gen_chunk,mem_chunk", [(1, 1), (3, 4)])
def test_hope_block_with_continual_cms_matches_per_token_oracle(gen_chunk, mem_chunk):
    """Self-modifying Titans + the continual CMS chain (chunk-parallel form, given teach inputs and errors) vs the
    float64 oracle: loss and every parameter gradient."""
    torch.manual_seed(0)
    cfg = tiny("hope", d_model=8, n_heads=2, cms_hidden=6, cms_periods=(2, 3), cms_levels=2, gen_chunk_size=gen_chunk,
               mem_chunk_size=mem_chunk, cms_lr=0.2, backend="reference")
    block = HopeBlock(cfg)
    _perturb(block)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 8, generator=g)
    teach = [(torch.randn(2, 7, 8, generator=g), 0.5 * torch.randn(2, 7, 8, generator=g)) for _ in range(2)]
    y, _, _, _, _ = block(x, None, False, teach)

    def weights(b, t, j, W1, W2):  # the oracle's level j weights at token t of sample b
        level = block.cms.levels[j]
        _, off, _, _ = cms_continual_oracle(W1, W2, teach[j][0][b, :t].double(), teach[j][0][b, :t].double(),
                                            teach[j][1][b, :t].double(), period=level.period, lr=cfg.cms_lr,
                                            beta=cfg.cms_beta)
        return W1 + off[0], W2 + off[1]

    y_o, P = hope_block_oracle(block, x, gen_chunk=gen_chunk, mem_chunk=mem_chunk, cms_weights=weights)
    _compare(block, y, y_o, P)


def test_memorized_context_changes_the_cms_levels():
    torch.manual_seed(0)
    model = build_model(tiny("hope", cms_periods=(4, 8, 16), cms_lr=0.05))
    ctx, _ = batch(model.config, B=1, T=16, seed=3)
    state = model(ctx, return_state=True).state  # reading a context is enough
    for layer in state.layers:
        assert [st.update_count for st in layer["cms"]] == [4, 2, 1]
        assert all(st.off1.abs().max() > 0 for st in layer["cms"])
    mem = memorize(model, ctx, paths=("cms",), steps=2)
    assert all(st.update_count == 2 * c for st, c in zip(mem.layers[0]["cms"], [4, 2, 1]))
    cont, cont_labels = batch(model.config, B=1, T=8, seed=4)
    a = model(cont, labels=cont_labels, state=mem).loss
    b = model(cont, labels=cont_labels).loss
    assert torch.isfinite(a) and not torch.allclose(a, b)


def test_teach_scale_zero_and_static_mode_leave_the_levels_alone():
    torch.manual_seed(0)
    model = build_model(tiny("hope"))
    ids, labels = batch(model.config, T=16)
    static = build_model(model.config.replace(cms_mode="static"))
    static.load_state_dict(model.state_dict())
    ref = static(ids, labels=labels, return_logits=True).logits
    torch.testing.assert_close(model(ids, labels=labels, return_logits=True, teach_scale=0.0).logits, ref)
    assert not torch.allclose(model(ids, labels=labels, return_logits=True).logits, ref)
    with pytest.raises(ValueError, match="teach_scale"):
        model(ids, teach_scale=-1.0)
    res = online_forward(model, ids, labels, segment_len=8)
    assert res.metrics["cms/layer0/level0/update_count"] == 16 // model.config.cms_periods[0]
