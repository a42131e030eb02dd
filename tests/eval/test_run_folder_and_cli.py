"""A trained run evaluated from anywhere (the tokenizer travels with it), the zero-shot JSON, the continual CLI
end to end, the harness adapter's options, and the same scores from lm-evaluation-harness and from us."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hope.data.tokenizer import sha256_file
from hope.eval.__main__ import main as eval_main
from hope.eval.loading import resolve_device
from hope.train.run_tokenizer import RUN_TOKENIZER, copy_tokenizer_into_run
from tests.eval.conftest import CORPUS, write_tiny_project

REPO = Path(__file__).resolve().parents[2]


def _items(n: int = 6, seed: int = 0) -> list[dict]:
    """Multiple-choice items from real verses: the verse's next words against other verses' words. One context
    is longer than the tiny model's 32-token window, one ends in a space, one is empty."""
    rng = random.Random(seed)
    verses = [line.split(" ", 2)[2].split() for line in CORPUS.read_text(encoding="utf-8").splitlines()[:400]]
    verses = [v for v in verses if len(v) > 12]
    rows = []
    for i in range(n):
        v = rng.choice(verses)
        cut = rng.randint(3, 8)
        others = [" ".join(rng.choice(verses)[:rng.randint(1, 4)]) for _ in range(rng.randint(1, 3))]
        choices = [" ".join(v[cut:cut + rng.randint(1, 3)])] + others
        rng.shuffle(choices)
        context = " ".join(v[:cut])
        rows.append({"context": context, "choices": choices, "label": rng.randrange(len(choices))})
    rows[1]["context"] = " ".join(w for v in verses[:4] for w in v)  # beyond the window
    rows[2]["context"] += " "
    rows[3]["context"] = ""
    return rows


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _moved_copy(run: Path, dest: Path) -> Path:
    """The run folder as a user moves it: copied aside, then renamed to a new place."""
    staging = dest.parent / ".staging"
    shutil.copytree(run, staging)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(dest))
    return dest


def test_the_trainer_puts_the_tokenizer_in_the_run_folder(trained_run):
    from hope.train.checkpoint import read_state_json

    recorded = read_state_json(trained_run)["tokenizer"]
    assert not Path(recorded["path"]).is_absolute()  # relative to the folder it trained in
    assert sha256_file(trained_run / RUN_TOKENIZER) == recorded["sha256"]
    assert not list(trained_run.glob(".tokenizer.model.tmp*"))


def test_eval_from_another_folder_and_after_moving_the_run(trained_run, tmp_path, monkeypatch, tokenizer, capsys):
    items = _write_jsonl(tmp_path / "verses.jsonl", _items())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the checkpoint's relative tokenizer path does not resolve from here
    args = ["zeroshot", "--tasks", f"jsonl={items}", "--no-wandb", "--batch-size", "4"]
    assert eval_main(args + ["--checkpoint", str(trained_run), "--out", str(tmp_path / "here")]) == 0
    moved = _moved_copy(trained_run, tmp_path / "archive" / "renamed-run")
    assert eval_main(args + ["--checkpoint", str(moved)]) == 0
    got = json.loads((moved / "eval" / "zeroshot.json").read_text())
    here = json.loads((tmp_path / "here" / "zeroshot.json").read_text())
    assert got["metrics"]["verses"]["acc"] == here["metrics"]["verses"]["acc"]
    assert got["tokenizer_sha256"] == sha256_file(moved / RUN_TOKENIZER)
    capsys.readouterr()
    # a different file in the run folder's place is refused
    shutil.copyfile(tokenizer.path, moved / RUN_TOKENIZER)
    assert eval_main(args + ["--checkpoint", str(moved)]) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err
    # no copy and no reachable recorded path: the error says what to pass
    (moved / RUN_TOKENIZER).unlink()
    assert eval_main(args + ["--checkpoint", str(moved)]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err
    # from the folder it trained in, the recorded relative path still works
    monkeypatch.chdir(trained_run.parent.parent)
    assert eval_main(args + ["--checkpoint", str(moved), "--out", str(tmp_path / "recorded")]) == 0


def test_zeroshot_json_names_tasks_by_file_and_reports_errors_and_truncation(trained_run, tmp_path, monkeypatch):
    rows = _items()
    a = _write_jsonl(tmp_path / "first.jsonl", rows[:3])
    b = _write_jsonl(tmp_path / "second.jsonl", rows[3:])
    out = tmp_path / "out"
    assert eval_main(["zeroshot", "--checkpoint", str(trained_run), "--tasks", f"jsonl={a},jsonl={b}", "--out", str(out),
                      "--no-wandb", "--limit", "2", "--log-samples"]) == 0
    res = json.loads((out / "zeroshot.json").read_text())
    assert set(res["metrics"]) == {"first", "second", "average"}
    first = res["metrics"]["first"]
    assert first["n"] == 2 and first["limit"] == 2 and first["max_length"] == 32
    assert first["truncated"] == 1  # the long verse list is item 2 of first.jsonl
    for k in ("acc", "acc_norm", "acc_bytes"):
        v, se = first[k], first[f"{k}_stderr"]
        assert v in (0.0, 0.5, 1.0) and se == pytest.approx(0.5 if v == 0.5 else 0.0)
    assert first["prompt_format"] == {"source": "jsonl released file, lm-evaluation-harness prompt", "file": str(a),
                                      "template": "{context}", "target_delimiter": " "}
    samples = [json.loads(x) for x in (out / "zeroshot_samples" / "first.jsonl").read_text().splitlines()]
    assert [s["truncated"] for s in samples] == [False, True]
    assert len(samples[0]["loglikelihoods"]) == len(rows[0]["choices"])
    assert sum(s["acc"] for s in samples) / 2 == first["acc"]
    # one name twice is refused, naming the clash
    assert eval_main(["zeroshot", "--checkpoint", str(trained_run), "--tasks", f"jsonl={a},jsonl={a}",
                      "--no-wandb", "--out", str(out)]) == 2
    # a custom task folder, by --task-dir and by $HOPE_ZEROSHOT_DIR
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    _write_jsonl(folder / "verses.jsonl", rows[:2])
    (folder / "prompts.json").write_text(json.dumps({"verses": {"task_prefix": "Finish the verse.",
                                                                "append_choices_to_input": False}}))
    assert eval_main(["zeroshot", "--checkpoint", str(trained_run), "--task-dir", str(folder), "--out", str(out),
                      "--no-wandb"]) == 0
    res = json.loads((out / "zeroshot.json").read_text())
    assert set(res["metrics"]) == {"verses", "average"}
    assert res["metrics"]["verses"]["prompt_format"]["template"] == "Finish the verse.\nQ: {context}\nA: "
    monkeypatch.setenv("HOPE_ZEROSHOT_DIR", str(folder))
    assert eval_main(["zeroshot", "--checkpoint", str(trained_run), "--tasks", "verses", "--out", str(out),
                      "--no-wandb"]) == 0


def test_continual_cli_end_to_end_then_report(tmp_path):
    """``python -m hope.eval continual`` itself, on a tiny Transformer++ and two real corpus segments."""
    project = write_tiny_project(tmp_path / "project")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "hope.eval", "continual", "--configs", "tiny.yaml", "--data",
                           "data.yaml", "--steps-per-segment", "2", "--seq-len", "32", "--val-sequences", "2",
                           "--batch-size", "2", "--no-wandb", "--out", "out"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((project / "out" / "continual.json").read_text())
    assert res["segments"] == ["genesis", "matthew"] and res["steps_per_segment"] == 2
    r = res["results"]["transformer"]
    L = torch.tensor(r["loss_matrix"])
    assert L.shape == (2, 2) and torch.isfinite(L).all() and r["skipped_steps"] == 0
    assert r["forgetting"][0] == pytest.approx(float(L[1, 0] - L[:, 0].min()))
    assert r["backward_transfer"] == pytest.approx(float(L[0, 0] - L[1, 0]))
    assert "transformer stage 1:" in proc.stdout
    from hope.report.__main__ import main as report_main
    md = tmp_path / "results.md"
    assert report_main([str(project / "out" / "continual.json"), "--out", str(md), "--plots", str(tmp_path / "p")]) == 0
    row = next(line for line in md.read_text().splitlines() if line.startswith("| transformer"))
    assert f"{r['avg_final_loss']:.3f}" in row


def test_harness_adapter_options(trained_run, tokenizer):
    from hope.eval.lm_eval_adapter import HarnessLM

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")
    lm = HarnessLM(checkpoint=str(trained_run), batch_size="3")  # no device: cuda when available, else cpu
    assert lm.batch_size_ == 3 and lm.max_length == 32
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert HarnessLM.create_from_arg_string(f"checkpoint={trained_run}", {"batch_size": "auto", "max_batch_size": 16,
                                                                           "device": None}).batch_size_ == 16
    with pytest.raises(ValueError, match="batch_size"):
        HarnessLM(checkpoint=str(trained_run), batch_size="many")
    with pytest.raises(ValueError, match="unknown model_args.*pretrained"):
        HarnessLM(checkpoint=str(trained_run), pretrained="gpt2")
    with pytest.raises(ValueError, match="checkpoint"):
        HarnessLM()


def test_harness_command_needs_lm_eval(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval.__main__", None)  # as if lm-eval were not installed
    assert eval_main(["harness", "--tasks", "piqa"]) == 2
    assert "pip install 'hope[eval]'" in capsys.readouterr().err


def test_copy_tokenizer_into_run_is_atomic_and_refuses_another(tmp_path, tokenizer):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ValueError, match="changed while it was copied"):
        copy_tokenizer_into_run(run, tokenizer.path, "0" * 64)
    assert list(run.iterdir()) == []  # nothing half-written left behind
    assert copy_tokenizer_into_run(run, tokenizer.path, tokenizer.sha256).read_bytes() == tokenizer.path.read_bytes()
    assert copy_tokenizer_into_run(run, tokenizer.path, tokenizer.sha256) == run / RUN_TOKENIZER  # idempotent
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        copy_tokenizer_into_run(run, tokenizer.path, "f" * 64)


def test_lm_eval_harness_and_our_eval_give_identical_scores(trained_run, tmp_path, monkeypatch):
    """The same checkpoint scored by lm-evaluation-harness (its CLI, through ``python -m hope.eval harness``, its
    own request building and joint encoding) and by ``python -m hope.eval zeroshot``: identical per-item
    log-likelihoods, acc and acc_norm (and their standard errors)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = _items(8, seed=1)
    data = _write_jsonl(tmp_path / "generated.jsonl", rows)
    (tmp_path / "generated.yaml").write_text(
        "task: generated\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\n"
        "doc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    harness_out = tmp_path / "harness"
    assert eval_main(["harness", "--model_args", f"checkpoint={trained_run}", "--tasks", "generated",
                      "--include_path", str(tmp_path), "--batch_size", "8", "--output_path", str(harness_out),
                      "--log_samples"]) == 0
    ours_out = tmp_path / "ours"
    assert eval_main(["zeroshot", "--checkpoint", str(trained_run), "--tasks", f"jsonl={data}", "--batch-size", "8",
                      "--out", str(ours_out), "--no-wandb", "--log-samples"]) == 0

    theirs = {}
    for line in next(harness_out.rglob("samples_generated_*.jsonl")).read_text().splitlines():
        s = json.loads(line)
        theirs[s["doc_id"]] = s
    ours = [json.loads(x) for x in (ours_out / "zeroshot_samples" / "generated.jsonl").read_text().splitlines()]
    assert len(theirs) == len(ours) == len(rows)
    for i, mine in enumerate(ours):
        # the harness logs each response as [[loglikelihood, is_greedy]] with the numbers as exact repr strings
        lls = [float(r[0][0]) for r in theirs[i]["resps"]]
        assert mine["loglikelihoods"] == lls, i  # identical, not merely close
        assert (mine["acc"], mine["acc_norm"]) == (theirs[i]["acc"], theirs[i]["acc_norm"]), i
    assert any(s["truncated"] for s in ours)  # the long item exercised the window on both sides
    results = json.loads(next(harness_out.rglob("results_*.json")).read_text())["results"]["generated"]
    mine = json.loads((ours_out / "zeroshot.json").read_text())["metrics"]["generated"]
    for k in ("acc", "acc_norm"):
        assert mine[k] == results[f"{k},none"]
        assert mine[f"{k}_stderr"] == pytest.approx(results[f"{k}_stderr,none"], rel=1e-12)
