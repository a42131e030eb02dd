"""Every architecture: shapes, causality, loss == CE of the logits, gradients reach every parameter,
bad inputs raise errors naming the argument."""
import os

import pytest
import torch
import torch.nn.functional as F

from hope.models import ModelOutput, ModelState, build_model
from hope.models.online import online_forward
from tests.models._util import ARCH_CONFIGS, batch, tiny

ARCHS = list(ARCH_CONFIGS)


@pytest.mark.parametrize("name", ARCHS)
def test_shapes_loss_and_causality(name):
    torch.manual_seed(0)
    cfg = tiny(name)
    model = build_model(cfg).eval()
    assert model.config is cfg
    ids, labels = batch(cfg, B=2, T=16)
    out = model(ids, labels=labels, return_logits=True, return_state=True)
    assert isinstance(out, ModelOutput)
    assert out.hidden.shape == (2, 16, cfg.d_model) and out.logits.shape == (2, 16, cfg.vocab_size)
    assert out.teach_delta.shape == (2, 16, cfg.d_model) and not out.teach_delta.requires_grad
    ce = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out.loss) and out.metrics["teach_signal_norm"] > 0
    if cfg.arch == "transformer":
        assert out.state is None
    else:
        assert isinstance(out.state, ModelState) and out.state.pos == 16
        for key in ("memory_update_norm", "memory_lr_mean"):
            assert out.metrics[key] > 0, key
    # changing a future token leaves every earlier output unchanged
    t = 9
    ids2 = ids.clone()
    ids2[:, t] = (ids2[:, t] + 1) % cfg.vocab_size
    out2 = model(ids2, return_logits=True)
    torch.testing.assert_close(out2.logits[:, :t], out.logits[:, :t], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out2.logits[:, t], out.logits[:, t])


def _assert_all_grads(model):
    bad = [n for n, p in model.named_parameters()
           if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not bad, f"parameters without a finite nonzero gradient: {bad}"


@pytest.mark.parametrize("name", ARCHS)
def test_every_parameter_gets_a_gradient_parallel(name):
    torch.manual_seed(0)
    model = build_model(tiny(name)).train()
    ids, labels = batch(model.config, T=16)
    model(ids, labels=labels).loss.backward()
    _assert_all_grads(model)


@pytest.mark.parametrize("name", ["titan-mag", "hope"])
def test_every_parameter_gets_a_gradient_online(name):
    torch.manual_seed(0)
    model = build_model(tiny(name)).train()
    ids, labels = batch(model.config, T=16)
    online_forward(model, ids, labels, segment_len=8).loss.backward()
    _assert_all_grads(model)


def test_bad_inputs_name_the_argument():
    model = build_model(tiny("hope"))
    ids, labels = batch(model.config)
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids + model.config.vocab_size)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels[:, :-1])
    with pytest.raises(TypeError, match="state"):
        model(ids, state={"mem": None})
    with pytest.raises(TypeError, match="return_logits"):
        model(ids, return_logits=1)
    with pytest.raises(ValueError, match="batch size"):
        model(ids, state=model(ids[:1], return_state=True).state)
    with pytest.raises(ValueError, match="segment_len"):
        online_forward(model, ids, labels, segment_len=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ARCHS)
def test_bf16_autocast_step_on_gpu(name):
    torch.manual_seed(0)
    model = build_model(tiny(name)).cuda().train()
    ids, labels = batch(model.config, T=32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids.cuda(), labels=labels.cuda())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    _assert_all_grads(model)
    fp32 = model(ids.cuda(), labels=labels.cuda()).loss
    assert abs(float(out.loss) - float(fp32)) < 0.05


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name,T", [("titan-lmm", 16), ("titan-linear-dgd", 16), ("hope-dgd-noselfmod", 16),
                                    ("hope", 8)])
def test_triton_backend_matches_reference_through_the_model(name, T):
    """Every layer on backend='triton' (the mlp / linear memory kernels, HOPE's self-modifying generators with their
    learnable initial states) gives the reference's loss and gradients (fp32, under the interpreter on the CPU)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = build_model(tiny(name, backend=backend)).to(dev).train()
        ids, labels = batch(model.config, T=T)
        out = model(ids.to(dev), labels=labels.to(dev))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_ref, grads_ref), (loss_tri, grads_tri) = results
    assert torch.allclose(loss_tri, loss_ref, rtol=1e-5, atol=1e-6), (float(loss_tri), float(loss_ref))
    assert grads_tri.keys() == grads_ref.keys()
    for n, g in grads_ref.items():
        err = ((grads_tri[n] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{name}: grad of {n} rel err {err:.2e}"


@pytest.mark.parametrize("name", ["titan-lmm", "titan-mag", "hope"])
def test_clip_groups_are_the_same_for_every_architecture(name):
    """The memory clip group holds the memories' learnable initial weights and the CMS levels only; the projections
    and gates feeding a memory are outer parameters in TITAN as in HOPE."""
    from hope.optim import memory_parameter_names

    model = build_model(tiny(name))
    mem = memory_parameter_names(model)
    leaf = {n.rsplit(".", 1)[-1] for n in mem}
    assert mem and leaf <= {"mem_w", "mem_w1", "mem_w2", "gen_w1", "gen_w2", "w1", "w2"}, leaf
    assert all(".cms." in n for n in mem if n.rsplit(".", 1)[-1] in ("w1", "w2"))
    outer = {n for n, _ in model.named_parameters()} - mem
    for part in ("qkv", "gates", "inp", "gate_readout", "out.weight", "gate.weight"):
        assert all(n in outer for n, _ in model.named_parameters() if part in n), part


def test_titan_mag_has_persistent_tokens_every_query_attends():
    from hope.layers.attention import sliding_window_mask
    from hope.models import preset

    for name in ("smoke-titan", "pilot-titan", "mid-titan"):
        assert preset(name).persistent_tokens > 0
    assert preset("smoke-titan-lmm").persistent_tokens == 0
    mask = sliding_window_mask(10, 3, "cpu", prefix=2)
    assert mask[9, :2].all() and not mask[9, 2:7].any() and mask[9, 7:].all() and not mask[1, 2:].any()
    torch.manual_seed(0)
    model = build_model(tiny("titan-mag", window=4)).eval()
    ids, _ = batch(model.config, T=16)
    ref = model(ids, return_logits=True).logits
    with torch.no_grad():
        model.persistent[0].add_(1.0)
    assert not torch.allclose(model(ids, return_logits=True).logits[:, -1], ref[:, -1])  # the last query sees them
