"""Eval results reach W&B through the real client in offline mode, in the training run's project."""
from __future__ import annotations

import pytest

from hope.eval.wandb_log import DEFAULT_PROJECT, log_results, project_for

wandb = pytest.importorskip("wandb")


def test_project_comes_from_the_run_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert project_for(tmp_path) == DEFAULT_PROJECT
    (tmp_path / "config.yaml").write_text("name: x\nlog: {wandb_project: my-proj}\n")
    assert project_for(tmp_path) == "my-proj"
    monkeypatch.setenv("WANDB_PROJECT", "env-proj")
    assert project_for(tmp_path) == "env-proj"


def test_log_results_writes_an_offline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    mode = log_results(tmp_path, "zeroshot", {"piqa/acc": 0.5, "piqa/acc_norm": 0.55, "note": "not a number"})
    assert mode == "offline"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {tmp_path / 'wandb'}, found {runs}"
    assert list(runs[0].glob("run-*.wandb")), "the offline run holds no .wandb record file"


def test_disabled_mode_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert log_results(tmp_path, "niah", {"acc": 1.0}).startswith("disabled")
