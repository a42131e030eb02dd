"""Fixtures for the trainer tests: tiny models on the real embedded corpus (prepared once, idempotently)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hope.data.sources import find_shared_data_dir

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "hope" / "configs" / "data" / "embedded.yaml"
PREPARED = REPO / "data" / "prepared" / "embedded"
# a model small enough that a training step takes tens of milliseconds on 2 CPU cores
DEFAULT_ARCH = "hope"
TINY_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 2, "ffn_hidden": 128, "cms_hidden": 64,
              "cms_periods": [4, 16, 32], "chunk_size": 16, "mem_chunk_size": 16, "gen_chunk_size": 8,
              "window": 32, "max_seq_len": 64}


def tiny_overrides(run_dir, arch: str = DEFAULT_ARCH, **extra) -> list[str]:
    """key=value overrides of configs/smoke.yaml for a few-second run."""
    base = {"run_dir": str(run_dir), "steps": 6, "batch_size": 4, "seq_len": 64, "segment_len": 32,
            "eval_every": 3, "eval_batches": 2, "ckpt_every": 3, "threads": 2, "log.wandb": "disabled",
            "log.progress": False, "log.plot": False, "data.manifest": str(MANIFEST),
            "data.overrides": f"[out_dir={PREPARED}]", "optim.outer.warmup_steps": 2,
            "model": "{" + ", ".join([f"preset: smoke-{arch}"] + [f"{k}: {v}" for k, v in TINY_MODEL.items()]) + "}"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def prepared_corpus():
    if find_shared_data_dir() is None:
        pytest.skip("needs ../shared/data (or $HOPE_SHARED_DATA)")
    from hope.data import prepare

    return prepare(MANIFEST, [f"out_dir={PREPARED}"], progress=False)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
