import pytest
import torch

from hope.models import ModelConfig, build_model, preset, preset_names


@pytest.mark.parametrize("field,value,exc", [
    ("arch", "gpt", ValueError), ("d_model", 0, ValueError), ("n_heads", 5, ValueError),
    ("rule", "sgd", ValueError), ("teach_signal", "both", ValueError), ("cms_levels", 4, ValueError),
    ("cms_periods", (16, 0), ValueError), ("selfmod", 1, TypeError), ("cms_beta", 1.5, ValueError),
    ("titan_variant", "mac", ValueError), ("vocab_size", 2.5, TypeError), ("backend", "gpu", ValueError),
])
def test_bad_config_names_the_field(field, value, exc):
    with pytest.raises(exc, match=field):
        ModelConfig(**{field: value})


def test_config_roundtrip_and_presets():
    for name in preset_names():
        cfg = preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="name"):
        preset("nope")
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(TypeError, match="config"):
        build_model({"arch": "hope"})
    assert preset("smoke-hope", cms_levels=1).active_cms_periods == (4,)


@pytest.mark.parametrize("name", ["pilot-hope", "pilot-titan", "pilot-titan-lmm", "pilot-transformer"])
def test_pilot_parameter_count_is_160M(name):
    cfg = preset(name)
    assert (cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.max_seq_len) == (12, 768, 32000, 2048)
    with torch.device("meta"):
        model = build_model(cfg)
    n = model.num_parameters()
    print(f"{name}: {n:,} parameters ({n / 1e6:.2f}M)")
    assert abs(n - 160e6) <= 0.05 * 160e6
    assert model.head_weight is model.embed.weight  # tied (F1)
