"""Configs read 1e-3-style floats as floats, in files and in key=value overrides (PyYAML alone reads strings)."""
from hope.train.config import load_config, parse_overrides
from hope.yamlio import load_yaml


def test_exponent_floats_without_a_dot():
    assert load_yaml("lr: 1e-3\nb: -2E+2\nc: 3\nname: 1e3x\n") == {"lr": 1e-3, "b": -200.0, "c": 3, "name": "1e3x"}
    assert parse_overrides(["optim.outer.lr=6e-3", "model.cms_lr=1e-4"]) == {
        "optim": {"outer": {"lr": 6e-3}}, "model": {"cms_lr": 1e-4}}


def test_override_reaches_the_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: t\noptim:\n  outer: {type: adamw, lr: 3e-3}\n")
    cfg = load_config(path, ["optim.outer.weight_decay=1e-2"])
    assert cfg.optim.outer.lr == 3e-3 and cfg.optim.outer.weight_decay == 1e-2
