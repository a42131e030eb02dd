"""Runs that cannot be hijacked, cannot lose work and always end (docs/runs.md): one test per fault.

The tiny Transformer++ keeps these fast; what they check (checkpoint files, resume, the guard, the run-folder
lock, the resume checks, the CLI's error line) does not depend on the architecture.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hope.train import Trainer, load_config, train
from hope.train.__main__ import main
from hope.train.config import TrainConfig
from hope.train.logging import read_log
from tests.train.conftest import REPO, tiny_overrides
from tests.train.faults import make_legacy, snapshot, write_crafted_pickle

SMOKE = REPO / "hope" / "configs" / "smoke.yaml"
FAST = dict(steps=2, ckpt_every=1, eval_every=0, batch_size=2)


def args(run_dir, **extra) -> list[str]:
    return tiny_overrides(run_dir, "transformer", **{**FAST, **extra})


def run(run_dir, **extra) -> dict:
    return train(load_config(SMOKE, args(run_dir, **extra)))


def cli(capsys, run_dir, **extra) -> tuple[int, str]:
    """``python -m hope.train`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    rc = main([str(SMOKE), *args(run_dir, **extra)])
    return rc, capsys.readouterr().err


def events(run_dir, event: str) -> list[dict]:
    return [r for r in read_log(Path(run_dir) / "log.jsonl") if r["event"] == event]


def assert_one_error_line(err: str, *words: str) -> str:
    """The CLI's failure: one ``error:`` line naming ``words``, no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prepared_corpus):
    """A finished 4-step run with checkpoints at steps 0, 2 and 4 (all kept)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(run_dir, steps=4, ckpt_every=2, keep_checkpoints=3)
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------- pickles never run
@pytest.mark.parametrize("name", ["model.safetensors", "train_state.safetensors", "train_state.json", "state.json",
                                  "train_state.pt"])
def test_crafted_pickle_in_any_checkpoint_file_never_runs(tmp_path, finished_run, capsys, name):
    """A pickle that would create a file, written over (or beside) a checkpoint file of the newest checkpoint:
    resume never unpickles it, skips that checkpoint when it no longer verifies and takes the one before."""
    run_dir = copy_run(finished_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    write_crafted_pickle(run_dir / "checkpoints" / "step_4" / name, marker)
    rc, err = cli(capsys, run_dir, steps=4, ckpt_every=2, keep_checkpoints=3, resume="auto")
    assert not marker.exists(), "a pickle in the checkpoint ran"
    assert rc == 0, err[-3000:]
    resumed = events(run_dir, "resume")[-1]
    if name == "train_state.pt":  # not a file of the checkpoint: never read
        assert resumed["checkpoint"] == "step_4" and not resumed["skipped"]
    else:
        assert resumed["checkpoint"] == "step_2" and name in resumed["skipped"]["step_4"], resumed
        assert "step_4" in err and name in err


def test_legacy_pickle_checkpoint_is_refused_with_how_to_convert(tmp_path, finished_run, capsys):
    """A checkpoint in the older layout (train state pickled in train_state.pt) is never loaded: resume refuses
    and names the converter; the converter loads only tensors and plain data (weights_only), so a crafted
    pickle is refused there too, and a converted checkpoint resumes exactly."""
    run_dir = copy_run(finished_run, tmp_path / "run")
    for step in (0, 2, 4):
        make_legacy(run_dir / "checkpoints" / f"step_{step}")
    before = snapshot(run_dir)
    rc, err = cli(capsys, run_dir, steps=6, ckpt_every=2, resume="auto")
    assert rc != 0
    assert_one_error_line(err, "train_state.pt", "python -m hope.train.checkpoint convert")
    assert snapshot(run_dir) == before

    from hope.train.checkpoint import convert_legacy

    marker = tmp_path / "pwned"
    crafted = copy_run(run_dir / "checkpoints" / "step_4", tmp_path / "crafted_step")
    write_crafted_pickle(crafted / "train_state.pt", marker)
    with pytest.raises(ValueError, match="train_state.pt"):
        convert_legacy(crafted)
    assert not marker.exists()

    convert_legacy(run_dir / "checkpoints" / "step_2")
    rc, err = cli(capsys, run_dir, steps=4, ckpt_every=2, keep_checkpoints=3, resume="auto")
    assert rc == 0, err[-3000:]
    assert events(run_dir, "resume")[-1]["checkpoint"] == "step_2"
    original = load_file(finished_run / "checkpoints" / "step_4" / "model.safetensors")
    again = load_file(run_dir / "checkpoints" / "step_4" / "model.safetensors")
    for key, value in original.items():
        assert torch.equal(value, again[key]), key


# ------------------------------------------------------------------------------ broken latest, no data lost
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("fault", ["latest_names_a_missing_step", "state_json_missing", "weights_truncated",
                                   "train_state_truncated"])
def test_broken_latest_falls_back_to_the_newest_good_checkpoint(tmp_path, finished_run, capsys, fault):
    run_dir = copy_run(finished_run, tmp_path / "run")
    step_4 = run_dir / "checkpoints" / "step_4"
    if fault == "latest_names_a_missing_step":
        (run_dir / "checkpoints" / "latest").write_text("step_9")
    elif fault == "state_json_missing":
        (step_4 / "state.json").unlink()
    elif fault == "weights_truncated":
        _truncate(step_4 / "model.safetensors")
    else:
        _truncate(step_4 / "train_state.safetensors")
    kept = {k: v for k, v in snapshot(run_dir).items() if k.startswith(("checkpoints/step_0", "checkpoints/step_2"))}
    rc, err = cli(capsys, run_dir, steps=4, ckpt_every=2, keep_checkpoints=3, resume="auto")
    assert rc == 0, err[-3000:]
    resumed = events(run_dir, "resume")[-1]
    expected = "step_4" if fault == "latest_names_a_missing_step" else "step_2"
    assert resumed["checkpoint"] == expected, resumed
    assert resumed["checkpoint"] in err
    if expected == "step_2":
        assert "step_4" in resumed["skipped"] and "step_4" in err
    after = snapshot(run_dir)
    assert all(after[k] == v for k, v in kept.items())  # older checkpoints untouched
    original = load_file(finished_run / "checkpoints" / "step_4" / "model.safetensors")
    again = load_file(step_4 / "model.safetensors")
    for key, value in original.items():  # the lost steps were trained again, exactly
        assert torch.equal(value, again[key]), key
    assert [r["step"] for r in events(run_dir, "train")] == [1, 2, 3, 4]


def test_no_fresh_start_over_checkpoints_that_do_not_verify(tmp_path, finished_run, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    for step in (0, 2, 4):
        _truncate(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors")
    before = snapshot(run_dir)
    rc, err = cli(capsys, run_dir, steps=4, ckpt_every=2, resume="auto")
    assert rc != 0
    assert_one_error_line(err, "step_0", "step_2", "step_4", "model.safetensors")
    assert snapshot(run_dir) == before


# ------------------------------------------------------------------------------------- a guard that ends
def _float_keys(cls=TrainConfig, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _float_keys(type(default), f"{prefix}{f.name}.")
        elif isinstance(default, float):
            yield f"{prefix}{f.name}"


def test_config_refuses_inf_and_nan_for_every_float():
    keys = list(_float_keys())
    assert "optim.outer.lr" in keys and "guard.max_teach_norm" in keys
    for key in keys + ["model.cms_lr", "data.weights.kjv"]:
        # YAML's .inf / .nan anywhere; the string "inf" too where the key is a float field
        for bad in (".inf", "-.inf", ".nan") + (("inf",) if key in keys else ()):
            with pytest.raises(ValueError, match=rf"^{key.replace('.', '[.]')}: .*finite"):
                load_config(SMOKE, [f"{key}={bad}"])


def test_exploding_loss_ends_within_bounded_rollbacks(tmp_path, prepared_corpus, capsys):
    """At optim.outer.lr=1e3 the loss jumps from ~8 to ~6e6 (finite): a bad step. Each rollback replays into the
    same blow-up; after guard.max_rollbacks the run stops with rc != 0 naming the step, loss and checkpoint."""
    run_dir = tmp_path / "run"
    rc, err = cli(capsys, run_dir, steps=20, ckpt_every=5, **{"optim.outer.lr": 1e3, "guard.max_bad_steps": 2,
                                                              "guard.max_rollbacks": 2})
    assert rc != 0
    line = assert_one_error_line(err, "step 1", "loss", "step_0", "guard.max_rollbacks")
    assert "e+0" in line or "inf" in line or "nan" in line, line
    assert len(events(run_dir, "rollback")) == 2
    skipped = events(run_dir, "skipped")
    assert len(skipped) == 3 * 2 and skipped[0]["reason"] == "loss_spike", skipped[0]


# ------------------------------------------------------------------------------------------ the lock
def test_second_run_into_a_live_folder_is_refused(tmp_path, prepared_corpus, capsys):
    run_dir = tmp_path / "run"
    first = Trainer(load_config(SMOKE, args(run_dir)))  # holds the folder from here to the end of train()
    before = snapshot(run_dir)
    for resume in ("none", "auto"):
        rc, err = cli(capsys, run_dir, resume=resume)
        assert rc != 0
        assert_one_error_line(err, str(run_dir), f"pid {os.getpid()}", socket.gethostname())
        assert snapshot(run_dir) == before
    assert first.train()["step"] == 2
    assert not (run_dir / "run.lock").exists()


def test_new_run_into_a_finished_folder_is_refused(tmp_path, finished_run, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run_dir)
    rc, err = cli(capsys, run_dir, steps=4, ckpt_every=2)
    assert rc != 0
    assert_one_error_line(err, str(run_dir), "resume=auto", "run_dir=")
    assert snapshot(run_dir) == before
    rc, err = cli(capsys, run_dir, steps=6, ckpt_every=2, resume="auto")
    assert rc == 0, err[-3000:]
    assert [r["step"] for r in events(run_dir, "train")] == [1, 2, 3, 4, 5, 6]


def test_resume_auto_never_starts_afresh_over_a_logged_run(tmp_path, prepared_corpus, capsys):
    """A run that logged steps but has no checkpoint (killed before its first one with ckpt_every=0; here: its
    checkpoints removed) is not restarted from scratch over its log by resume=auto."""
    run_dir = tmp_path / "run"
    rc, err = cli(capsys, run_dir, ckpt_every=0)
    assert rc == 0, err[-3000:]
    shutil.rmtree(run_dir / "checkpoints")
    before = snapshot(run_dir)
    rc, err = cli(capsys, run_dir, ckpt_every=0, resume="auto")
    assert rc != 0
    assert_one_error_line(err, str(run_dir), "no checkpoint", "run_dir=")
    assert snapshot(run_dir) == before


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_is_taken_over_and_live_lock_refused(tmp_path, monkeypatch):
    import errno
    import fcntl

    from hope.train.errors import RunError
    from hope.train.run_folder import RunLock

    folder = tmp_path / "run"
    folder.mkdir()
    host = socket.gethostname()
    for flock_works in (True, False):
        if not flock_works:  # a file system without flock: the pid and host in the file decide
            def no_flock(*a, **k):
                raise OSError(errno.ENOLCK, "No locks available")

            monkeypatch.setattr(fcntl, "flock", no_flock)
        (folder / "run.lock").write_text(json.dumps({"pid": _dead_pid(), "host": host}))
        with pytest.warns(UserWarning, match="stale"):
            lock = RunLock.acquire(folder)
        assert json.loads((folder / "run.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(RunError, match=f"pid {os.getpid()} on host {host}"):
            RunLock.acquire(folder)
        lock.release()
        assert not (folder / "run.lock").exists()
    (folder / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(RunError, match="elsewhere.example"):
        RunLock.acquire(folder)


# ------------------------------------------------------------------------ resume checks tokenizer and data
@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Two prepared folders of the same real text with different tokenizers of the same vocabulary size, and a
    third with the first's tokenizer but other data weights."""
    from hope.data import prepare
    from hope.data.sources import find_shared_data_dir

    shared = find_shared_data_dir()
    if shared is None:
        pytest.skip("needs ../shared/data (or $HOPE_SHARED_DATA)")
    root = tmp_path_factory.mktemp("tok")
    text = root / "text.txt"
    text.write_text((shared / "corpus" / "shakespeare" / "hamlet.txt").read_text()
                    + "\n".join((shared / "corpus" / "kjv.txt").read_text().split("\n")[:3000]))

    def manifest(name, weight=1.0, **tokenizer):
        data = {"name": name, "out_dir": str(root / name), "seq_len": 64, "val_fraction": 0.05, "seed": 0,
                "shard_sequences": 512, "tokenizer": {"vocab_size": 512, "input_sentence_size": 0, **tokenizer},
                "sources": [{"name": "text", "kind": "text", "paths": [str(text)], "record": "chunk",
                             "record_lines": 40, "weight": weight},
                            {"name": "more", "kind": "text", "paths": [str(text)], "record": "line", "weight": 1.0}]}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        prepare(path, progress=False)
        return path

    first = manifest("unigram", model_type="unigram")
    return {"first": first, "other_tokenizer": manifest("bpe", model_type="bpe"),
            "other_data": manifest("weights", weight=3.0, path=str(root / "unigram" / "tokenizer.model"))}


@pytest.mark.parametrize("other", ["other_tokenizer", "other_data"])
def test_resume_refuses_another_tokenizer_or_data(tmp_path, two_tokenizers, capsys, other):
    run_dir = tmp_path / "run"
    rc, err = cli(capsys, run_dir, **{"data.manifest": two_tokenizers["first"], "data.overrides": "[]"})
    assert rc == 0, err[-3000:]
    before = snapshot(run_dir)
    state = json.loads((run_dir / "checkpoints" / "step_2" / "state.json").read_text())
    rc, err = cli(capsys, run_dir, steps=3, resume="auto",
                  **{"data.manifest": two_tokenizers[other], "data.overrides": "[]"})
    assert rc != 0
    if other == "other_tokenizer":
        from hope.data.prepare import load_manifest

        now = (load_manifest(two_tokenizers[other]).out_dir / "tokenizer.model").read_bytes()
        import hashlib

        assert_one_error_line(err, "tokenizer", state["tokenizer"]["sha256"], hashlib.sha256(now).hexdigest())
    else:
        assert_one_error_line(err, "data", state["data"]["fingerprint"])
    assert snapshot(run_dir) == before


# --------------------------------------------------------------------------------- errors and disk full
def test_config_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    for argv, words in (([str(bad)], ("config", "bad.yaml")), ([str(SMOKE), "model={preset:"], ("model",)),
                        ([str(tmp_path / "none.yaml")], ("none.yaml",)), ([str(SMOKE), "steps=0"], ("steps",))):
        capsys.readouterr()
        assert main(argv) == 2
        assert_one_error_line(capsys.readouterr().err, *words)


def test_errors_after_config_loading_are_one_line(tmp_path, prepared_corpus, capsys):
    rc, err = cli(capsys, tmp_path / "a", **{"data.manifest": str(tmp_path / "missing.yaml")})
    assert rc != 0
    assert_one_error_line(err, "missing.yaml")
    rc, err = cli(capsys, tmp_path / "b", **{"model": "{preset: smoke-transformer, nonsense: 3}"})
    assert rc != 0
    assert_one_error_line(err, "model", "nonsense")


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, prepared_corpus):
    """A save that cannot write its files (here: the process may not write files over 256 KiB, as on a full
    disk) ends the run with one error line; the previous checkpoint stays the latest, no partial folder is left,
    and the run resumes from it to the same weights."""
    run_dir = tmp_path / "run"
    run(run_dir, steps=2, ckpt_every=2)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "hope.train", str(SMOKE),
                          *args(run_dir, steps=4, ckpt_every=2, resume="auto")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                         preexec_fn=_limit_file_size(256 * 1024))
    assert res.returncode != 0
    assert_one_error_line(res.stderr, "step_4", "model.safetensors")
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_2" and not (ckpts / "step_4").exists()
    assert not list(ckpts.glob(".tmp-*"))
    done = run(run_dir, steps=4, ckpt_every=2, resume="auto")
    reference = run(tmp_path / "reference", steps=4, ckpt_every=2)
    assert done["step"] == 4 and [r["step"] for r in events(run_dir, "train")] == [1, 2, 3, 4]
    a = load_file(ckpts / "step_4" / "model.safetensors")
    b = load_file(Path(reference["run_dir"]) / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


# -------------------------------------------------------------------------------------- data repairs
def test_data_and_tokenizer_repairs_are_logged(two_tokenizers, tmp_path, caplog):
    from hope.data import prepare
    from hope.data.prepare import load_manifest

    manifest = load_manifest(two_tokenizers["first"])
    folder = shutil.copytree(manifest.out_dir, tmp_path / "prepared")
    overrides = [f"out_dir={folder}"]
    index = json.loads((folder / "index.json").read_text())
    shard = folder / index["sources"]["text"]["splits"]["train"]["shards"][0]["path"]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with caplog.at_level("WARNING", logger="hope.data"):
        prepare(two_tokenizers["first"], overrides, progress=False)
    assert any("text" in r.getMessage() and shard.name in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    tokenizer = folder / "tokenizer.model"
    tokenizer.write_bytes(tokenizer.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="hope.data"):
        prepare(two_tokenizers["first"], overrides, progress=False)
    assert any("tokenizer" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records), caplog.text
