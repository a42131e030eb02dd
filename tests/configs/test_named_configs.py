"""Named configs shipped in the package: resolution from any folder, --list, --dry-run (no data, no network)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hope.configs import config_dir, config_names, resolve_config
from hope.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
RUN_NAMES = ("smoke", "titan_smoke", "transformer_smoke", "pilot", "titan_pilot", "transformer_pilot", "mid",
             "titan_mid", "transformer_mid", "hope_selfmod_off", "hope_cms_depth1", "hope_dgd")


def _env():
    """The subprocess imports this checkout's code (PYTHONPATH) from a folder outside it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_packaged_names_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert set(RUN_NAMES) <= set(config_names())
    assert {"embedded", "embedded_pilot", "continual_embedded"} <= set(config_names("data"))
    pilot = config_dir() / "pilot.yaml"
    for ref in ("pilot", "pilot.yaml", "configs/pilot.yaml", pilot, str(pilot)):
        assert resolve_config(ref) == pilot, ref
    manifest = config_dir("data") / "embedded.yaml"
    for ref in ("embedded", "data/embedded", "configs/data/embedded.yaml", "embedded.yaml"):
        assert resolve_config(ref, "data") == manifest, ref
    for name in RUN_NAMES:
        cfg = load_config(name)
        assert resolve_config(cfg.data.manifest, "data").is_file()  # every config's manifest resolves too


def test_a_file_path_still_works_and_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pilot").write_text("name: mine\nsteps: 3\n")  # a file named like a packaged config
    assert load_config("pilot").name == "mine"
    custom = tmp_path / "sub" / "run.yaml"
    custom.parent.mkdir()
    custom.write_text("name: custom\nsteps: 5\ndata: {manifest: embedded}\n")
    cfg = load_config(custom, ["steps=6"])
    assert (cfg.name, cfg.steps) == ("custom", 6)


def test_unknown_names_are_refused_with_the_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no such file or named config 'pilott'.*pilot, smoke"):
        load_config("pilott")
    with pytest.raises(ValueError, match=r"named manifests: .*embedded"):
        resolve_config("nope", "data")
    with pytest.raises(ValueError, match="no such file"):
        resolve_config("configs/data/embedded.yaml", "run")  # a data manifest is not a run config
    with pytest.raises(ValueError, match="kind"):
        resolve_config("pilot", "model")


def test_list_names_every_config(tmp_path):
    res = subprocess.run([sys.executable, "-m", "hope.train", "--list"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert sorted(line.split()[0] for line in lines) == config_names()
    pilot = next(line for line in lines if line.split()[0] == "pilot")
    assert "pilot-hope" in pilot and "91553 x 32.8k = 3.00B tok" in pilot


@pytest.mark.parametrize("name", ["pilot", "titan_pilot", "transformer_pilot"])
def test_dry_run_touches_no_data_and_no_network(name, tmp_path, monkeypatch, capsys):
    """In process, with every socket connect and the data preparation made to fail: the plan still comes out."""
    import hope.data
    import hope.data.sources
    from hope.train.__main__ import main

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run touched data or the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(hope.data, "prepare", refuse)
    monkeypatch.setattr(sys.modules["hope.data.prepare"], "prepare", refuse)
    monkeypatch.setattr(hope.data.sources, "embedded_corpus_dir", refuse)
    monkeypatch.setenv("HOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main([name, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert abs(plan["parameters"] - 160e6) <= 0.05 * 160e6, plan["parameters"]  # the pilot's 160M +-5%
    assert plan["tokens_per_step"] == 16 * 2048
    assert plan["steps"] == 91553 and plan["total_tokens"] == 91553 * 16 * 2048
    assert plan["config"]["name"] == name and plan["model"]["d_model"] == 768
    assert list(tmp_path.iterdir()) == []  # no prepared data, no run folder, no cache


def test_dry_run_cli_output(tmp_path, capsys):
    res = subprocess.run([sys.executable, "-m", "hope.train", "pilot", "--dry-run", "steps=1000", "--world-size", "8"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "# resolved config" in out and "model_resolved:" in out and "steps: 1000" in out
    assert "parameters:       156," in out  # the pilot's 156.8M at the manifest's vocabulary (no M_q: q is not adaptive)
    assert "tokens per step:  262,144 (16 sequences x 2048 tokens x 8 ranks)" in out
    assert "total tokens:     262,144,000 (262.1M)" in out
    assert list(tmp_path.iterdir()) == []
    from hope.train.__main__ import main

    assert main(["pilot", "--dry-run", "optim.outer.lr=-1"]) == 2
    assert "optim.outer.lr" in capsys.readouterr().err
    assert main(["pilot", "--dry-run", "--world-size", "0"]) == 2
    assert "--world-size" in capsys.readouterr().err
