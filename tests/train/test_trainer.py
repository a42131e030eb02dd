"""Trainer: modes, seeding, exact resume, SIGKILL mid-save, divergence rollback, DDP, Muon mix, release."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hope.train import Trainer, load_config, train
from hope.train.checkpoint import find_latest, load_model, read_state_json
from hope.train.logging import TIMING_KEYS, read_log
from tests.train.conftest import DEFAULT_ARCH, REPO, tiny_overrides
from tests.train.faults import FaultyTrainer

SMOKE = REPO / "hope" / "configs" / "smoke.yaml"


def run(tmp_path, name="run", arch=DEFAULT_ARCH, **extra) -> dict:
    return train(load_config(SMOKE, tiny_overrides(tmp_path / name, arch, **extra)))


def train_lines(run_dir) -> list[dict]:
    return [r for r in read_log(Path(run_dir) / "log.jsonl") if r["event"] == "train"]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


# ----------------------------------------------------------------------------------------------- config
def test_config_unknown_key_and_bad_values_name_the_key():
    with pytest.raises(ValueError, match=r"optim\.outer\.lrr"):
        load_config(SMOKE, ["optim.outer.lrr=1"])
    with pytest.raises(ValueError, match=r"^mode"):
        load_config(SMOKE, ["mode=sideways"])
    with pytest.raises(ValueError, match=r"batch_size"):
        load_config(SMOKE, ["batch_size=-1"])
    with pytest.raises(ValueError, match=r"optim\.outer\.beta2"):
        load_config(SMOKE, ["optim.outer.beta2=1.5"])
    with pytest.raises(ValueError, match=r"override"):
        load_config(SMOKE, ["steps"])
    cfg = load_config(SMOKE, ["optim.outer.lr=1e-4", "mode=online", "steps=7"])
    assert (cfg.optim.outer.lr, cfg.mode, cfg.steps) == (1e-4, "online", 7)


def test_every_shipped_config_loads():
    names = sorted(p.name for p in (REPO / "hope" / "configs").glob("*.yaml"))
    for required in ("smoke.yaml", "pilot.yaml", "mid.yaml", "titan_smoke.yaml", "transformer_smoke.yaml",
                     "titan_pilot.yaml", "transformer_pilot.yaml", "titan_mid.yaml", "transformer_mid.yaml",
                     "hope_selfmod_off.yaml", "hope_cms_depth1.yaml", "hope_dgd.yaml"):
        assert required in names
    for name in names:
        load_config(REPO / "hope" / "configs" / name)


def test_bad_model_key_names_it(tmp_path, prepared_corpus):
    with pytest.raises(ValueError, match="model"):
        Trainer(load_config(SMOKE, tiny_overrides(tmp_path / "r") + ["model.nonsense=3"]))


# ------------------------------------------------------------------------------------------------ modes
@pytest.mark.parametrize("mode", ["online", "parallel"])
def test_modes_train_hope_with_cms_telemetry(tmp_path, prepared_corpus, mode):
    summary = run(tmp_path, arch="hope", mode=mode, steps=4, ckpt_every=0, eval_every=0)
    lines = train_lines(summary["run_dir"])
    assert len(lines) == 4 and all(math.isfinite(r["loss"]) for r in lines)
    last = lines[-1]
    for key in ("loss", "lr", "tokens_per_s", "teach_signal_norm", "grad_norm_outer", "grad_norm_memory"):
        assert key in last and math.isfinite(last[key]), key
    counts = {k: v for k, v in last.items() if k.startswith("cms/level") and k.endswith("update_count")}
    assert counts and all(v > 0 for v in counts.values()), counts
    assert math.isfinite(summary["val_loss"])


def test_loss_decreases_on_real_corpus(tmp_path, prepared_corpus):
    """Sixteen steps of the tiny HOPE model: validation loss falls far below the untrained model's."""
    summary = run(tmp_path, arch="hope", steps=16, eval_every=16, ckpt_every=0)
    lines = train_lines(summary["run_dir"])
    first = sum(r["loss"] for r in lines[:3]) / 3
    last = sum(r["loss"] for r in lines[-3:]) / 3
    assert first > math.log(4096) - 0.5  # an untrained model is near uniform over the vocabulary
    assert last < first - 1.0, (first, last)
    assert summary["val_loss"] < first - 1.0


# ---------------------------------------------------------------------------------- seeding and resume
def test_same_seed_gives_identical_log_lines(tmp_path, prepared_corpus):
    a = run(tmp_path, "a", steps=4, ckpt_every=0)
    b = run(tmp_path, "b", steps=4, ckpt_every=0)
    la = without_timing(read_log(Path(a["run_dir"]) / "log.jsonl"))
    lb = without_timing(read_log(Path(b["run_dir"]) / "log.jsonl"))
    assert la == lb and len(la) >= 4
    c = run(tmp_path, "c", steps=4, ckpt_every=0, seed=1)
    assert without_timing(train_lines(c["run_dir"])) != without_timing(train_lines(a["run_dir"]))


@pytest.mark.parametrize("mode,outer", [("parallel", "adamw"), ("online", "muon_mix")])
def test_resume_is_bit_exact(tmp_path, prepared_corpus, mode, outer):
    """2N steps in one go == N steps, then a fresh process state resuming from the checkpoint for N more."""
    extra = {"mode": mode, "optim.outer.type": outer, "eval_every": 0}
    full = run(tmp_path, "full", steps=6, ckpt_every=3, **extra)
    run(tmp_path, "split", steps=3, ckpt_every=3, **extra)
    resumed = run(tmp_path, "split", steps=6, ckpt_every=3, resume="auto", **extra)
    lf, ls = train_lines(full["run_dir"]), train_lines(resumed["run_dir"])
    assert [r["step"] for r in ls] == [1, 2, 3, 4, 5, 6]
    assert without_timing(lf)[3:] == without_timing(ls)[3:]
    assert lf[-1]["loss"] == ls[-1]["loss"]
    ma, _ = load_model(full["run_dir"])
    mb, _ = load_model(resumed["run_dir"])
    for (name, ta), tb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_resume_auto_finds_the_newest_run_of_the_name(tmp_path, prepared_corpus):
    common = {"out_dir": str(tmp_path / "runs"), "name": "auto", "eval_every": 0,
              "ckpt_every": 2}
    first = train(load_config(SMOKE, tiny_overrides("null", "transformer", steps=2, **common)))
    second = train(load_config(SMOKE, tiny_overrides("null", "transformer", steps=4, resume="auto", **common)))
    assert second["run_dir"] == first["run_dir"] and second["step"] == 4
    assert [r["step"] for r in train_lines(second["run_dir"])] == [1, 2, 3, 4]


def test_sigkill_mid_save_resumes_from_previous_checkpoint(tmp_path, prepared_corpus):
    """SIGKILL in the middle of the step-6 save: the step-3 checkpoint stays the latest, the resumed run ends
    with the uninterrupted run's loss, and its log holds one record per step."""
    run_dir = tmp_path / "killed"
    args = tiny_overrides(run_dir, "transformer", steps=6, ckpt_every=3, eval_every=0)
    # the step-6 save pauses after writing its weights; the test kills the process there
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "train" / "pause_worker.py"), "6", str(SMOKE), *args],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = run_dir / "saving.marker"
    try:
        deadline = time.time() + 180
        while not marker.is_file():
            if proc.poll() is not None:
                pytest.fail(f"trainer exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("the trainer never reached the step-6 save")
            time.sleep(0.2)
        assert (run_dir / "checkpoints" / f".tmp-step_6-{proc.pid}" / "model.safetensors").is_file()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    latest = find_latest(run_dir)
    assert latest.name == "step_3" and read_state_json(latest)["step"] == 3
    assert not (run_dir / "checkpoints" / "step_6").exists()
    assert [r["step"] for r in train_lines(run_dir)] == [1, 2, 3, 4, 5, 6]  # steps 4-6 ran before the kill
    with pytest.warns(UserWarning, match=f"stale lock of pid {proc.pid}"):  # the killed run's lock
        done = train(load_config(SMOKE, tiny_overrides(run_dir, "transformer", steps=6, ckpt_every=3, eval_every=0,
                                                       resume="auto")))
    assert done["step"] == 6 and find_latest(run_dir).name == "step_6"
    assert [r["step"] for r in train_lines(run_dir)] == [1, 2, 3, 4, 5, 6]  # one record per step after the resume
    reference = run(tmp_path, "reference", arch="transformer", steps=6, ckpt_every=3, eval_every=0)
    assert train_lines(reference["run_dir"])[-1]["loss"] == train_lines(run_dir)[-1]["loss"]


# ------------------------------------------------------------------------------------- divergence guard
def test_divergence_guard_skips_then_rolls_back(tmp_path, prepared_corpus):
    cfg = load_config(SMOKE, tiny_overrides(tmp_path / "run", steps=8, ckpt_every=3, eval_every=0,
                                            **{"guard.max_bad_steps": 3}))
    summary = FaultyTrainer(cfg, nan_loss={4, 5, 6}).train()
    records = read_log(Path(summary["run_dir"]) / "log.jsonl")
    skipped = [r for r in records if r["event"] == "skipped"]
    rollbacks = [r for r in records if r["event"] == "rollback"]
    # attempts 4, 5, 6 all try step 5 (4 done): three bad in a row -> back to the step-3 checkpoint
    assert [r["step"] for r in skipped] == [4, 4, 4] and [r["bad_in_row"] for r in skipped] == [1, 2, 3]
    assert skipped[0]["loss"] == "nan"
    assert len(rollbacks) == 1 and rollbacks[0]["step"] == 3 and rollbacks[0]["from_step"] == 4
    steps = [r["step"] for r in train_lines(summary["run_dir"])]
    assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8]  # step 4 is trained again after the rollback
    assert summary["step"] == 8
    assert all(math.isfinite(r["loss"]) for r in train_lines(summary["run_dir"]))


# -------------------------------------------------------------------------------------------- optimizers
def test_muon_mix_takes_only_2d_hidden_matrices(tmp_path, prepared_corpus):
    from hope.optim import split_parameters

    cfg = load_config(SMOKE, tiny_overrides(tmp_path / "m", **{"optim.outer.type": "muon_mix", "steps": 3,
                                                                "eval_every": 0, "ckpt_every": 0}))
    trainer = Trainer(cfg)
    muon, adamw = split_parameters(trainer.model)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert muon and all(p.ndim == 2 for p in muon)
    for p in muon:
        assert not any(k in names[id(p)] for k in ("embed", "norm", "gate", "conv"))
    assert any("embed" in names[id(p)] for p in adamw)
    assert isinstance(trainer.optimizers[0], torch.optim.Muon)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    summary = trainer.train()
    assert summary["step"] == 3
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert any(names[id(p)] in moved for p in muon) and any(names[id(p)] in moved for p in adamw)


def test_bf16_autocast_and_guarded_compile_fallback(tmp_path, prepared_corpus, monkeypatch):
    """bf16 autocast runs on CPU too; a torch.compile that fails warns once and training goes on eagerly."""
    summary = run(tmp_path, "bf16", arch="transformer", steps=2, ckpt_every=0, eval_every=0, bf16=True)
    assert all(math.isfinite(r["loss"]) for r in train_lines(summary["run_dir"]))

    def broken_compile(self, *args, **kwargs):
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    with pytest.warns(UserWarning, match="compile") as caught:
        summary = run(tmp_path, "compiled", arch="transformer", steps=2, ckpt_every=0, eval_every=0, compile=True)
    assert len([w for w in caught if "compile" in str(w.message)]) == 1
    assert summary["step"] == 2


def test_failing_compiled_forward_falls_back_to_eager(tmp_path, prepared_corpus, monkeypatch):
    """torch.compile works but its backend fails on the first forward: one warning, and every later forward
    (training and evaluation) runs eagerly."""
    compile_model = torch.nn.Module.compile

    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("this backend cannot compile")

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_model(self, backend=failing_backend))
    with pytest.warns(UserWarning, match="compiled forward failed") as caught:
        summary = run(tmp_path, "compiled", arch="transformer", steps=2, ckpt_every=0, eval_every=1, compile=True)
    assert len([w for w in caught if "compile" in str(w.message)]) == 1
    assert summary["step"] == 2 and math.isfinite(summary["val_loss"])


def test_schedules():
    from hope.optim import lr_at, teach_scale_at

    assert lr_at(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert teach_scale_at(0, 10, 2.0, 4, 0.5) == pytest.approx(0.5)
    assert teach_scale_at(10, 10, 2.0, 4, 0.5) == pytest.approx(1.0)


# ------------------------------------------------------------------------------ logging, W&B, plot, ckpt
def test_run_folder_has_log_wandb_plot_and_loadable_checkpoint(tmp_path, prepared_corpus):
    summary = run(tmp_path, steps=3, ckpt_every=3, eval_every=3, **{"log.wandb": "offline", "log.plot": True})
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "plots" / "loss.png").stat().st_size > 1000
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run"
    model, state = load_model(run_dir)
    assert state["step"] == 3 and state["complete"] and len(state["tokenizer"]["sha256"]) == 64
    assert model.config.d_model == 64 and state["model_config"]["arch"] == DEFAULT_ARCH
    assert set(os.listdir(run_dir / "checkpoints" / "step_3")) == {"model.safetensors", "train_state.safetensors",
                                                                   "train_state.json", "state.json"}


# ------------------------------------------------------------------------------------------------- DDP
def test_ddp_two_cpu_processes_gloo(tmp_path, prepared_corpus):
    out = tmp_path / "ddp_out"
    out.mkdir()
    args = tiny_overrides(tmp_path / "ddp", steps=3, ckpt_every=3, eval_every=3, threads=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "train" / "ddp_worker.py"), str(SMOKE), str(out), *args]
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["backend"] == r1["backend"] == "gloo" and r0["world_size"] == 2
    assert r0["finite"] and r1["finite"]
    assert r0["params_sha256"] == r1["params_sha256"]  # gradients and inner updates averaged: identical weights
    assert r0["first_batch"] != r1["first_batch"]      # each rank reads its own shard of the data
    lines = train_lines(tmp_path / "ddp")
    assert lines[-1]["tokens_seen"] == 3 * 2 * 4 * 64


# ----------------------------------------------------------------------------------------------- release
def test_release_packages_and_verifies(tmp_path, prepared_corpus):
    from hope.release import release, verify

    summary = run(tmp_path, steps=4, ckpt_every=2, eval_every=2, **{"log.plot": True})
    run_dir = Path(summary["run_dir"])
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "zeroshot.json").write_text(json.dumps({"suite": "zeroshot", "acc": 0.25}))
    res = subprocess.run([sys.executable, "-m", "hope.release", str(run_dir)], cwd=REPO, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = run_dir / "release"
    meta = json.loads((out / "metadata.json").read_text())
    best = (run_dir / "checkpoints" / "best").read_text().strip()
    assert meta["checkpoint"] == best
    assert meta["packages"]["torch"] and meta["packages"]["python"]
    assert meta["tokenizer"]["sha256"] == prepared_corpus.tokenizer_sha256
    assert meta["data"]["shards_sha256"] and all(len(h) == 64 for h in meta["data"]["shards_sha256"].values())
    assert {"checkpoint/model.safetensors", "config.yaml", "log.jsonl", "eval/zeroshot.json",
            "plots/loss.png", "tokenizer.model"} <= set(meta["files_sha256"])
    assert "commit" in meta["git"]
    verify(out)
    (out / "log.jsonl").write_text("tampered\n")
    with pytest.raises(ValueError, match="log.jsonl"):
        verify(out)
