"""Checkpoint loading errors, the zeroshot/niah CLI end to end, report rendering, the lm-eval adapter's methods
(its agreement with the harness itself: test_run_folder_and_cli.py)."""
import json
from types import SimpleNamespace

import pytest
import torch

from hope.eval.__main__ import main as eval_main
from hope.eval.loading import check_tokenizer, load_for_eval
from hope.models import build_model
from hope.report.__main__ import main as report_main
from hope.train.checkpoint import save_checkpoint
from tests.models._util import tiny


def _save(run_dir, model, tokenizer, step=1):
    state = {"step": step, "tokens_seen": 0, "model_config": model.config.to_dict(),
             "tokenizer": {"path": str(tokenizer.path), "sha256": tokenizer.sha256}, "config": {},
             "val_loss": None, "complete": True}
    return save_checkpoint(run_dir, step, model, {}, state)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("runs") / "hope-test"
    _save(d, build_model(tiny("hope", vocab_size=tokenizer.vocab_size, max_seq_len=512)), tokenizer)
    return d


def test_strict_loading_rejects_mismatched_keys(tmp_path, tokenizer):
    torch.manual_seed(0)
    d = tmp_path / "bad"
    model = build_model(tiny("hope", vocab_size=tokenizer.vocab_size))
    step = _save(d, model, tokenizer)
    # state.json now describes a different architecture than the saved weights
    sj = json.loads((step / "state.json").read_text())
    sj["model_config"] = tiny("transformer", vocab_size=tokenizer.vocab_size).to_dict()
    (step / "state.json").write_text(json.dumps(sj))
    with pytest.raises((ValueError, RuntimeError), match="(?i)missing|unexpected"):
        load_for_eval(d)
    with pytest.raises(ValueError, match="checkpoint"):
        load_for_eval(tmp_path / "nope")


def test_tokenizer_mismatch_stops_with_message(run_dir, tokenizer, tmp_path, filler_text):
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_tokenizer(tokenizer, "0" * 64, 10_000)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_tokenizer(tokenizer, tokenizer.sha256, 100)
    from hope.data.tokenizer import train_tokenizer
    (tmp_path / "t.txt").write_text(filler_text)
    other = train_tokenizer([tmp_path / "t.txt"], tmp_path / "other", vocab_size=400)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        load_for_eval(run_dir, tokenizer_path=other.path)
    assert eval_main(["zeroshot", "--checkpoint", str(run_dir), "--tokenizer", str(other.path), "--no-wandb",
                      "--tasks", "navigate", "--limit", "1"]) == 2


def test_zeroshot_and_niah_cli_then_report(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = eval_main(["zeroshot", "--checkpoint", str(run_dir), "--tasks", "social_iqa,navigate", "--limit", "2",
                    "--memorize", "--memorize-paths", "titan,cms", "--memorize-steps", "2", "--out", str(out),
                    "--no-wandb", "--batch-size", "4"])
    assert rc == 0
    res = json.loads((out / "zeroshot.json").read_text())
    for t in ("social_iqa", "navigate", "average"):
        for m in ("acc", "acc_norm", "acc_memorize", "acc_norm_memorize"):
            assert 0.0 <= res["metrics"][t][m] <= 1.0
    assert res["metrics"]["social_iqa"]["n"] == 2 and res["arch"] == "hope"
    assert eval_main(["zeroshot", "--checkpoint", str(run_dir), "--tasks", "nope", "--no-wandb", "--out", str(out)]) == 2
    assert "tasks in" in capsys.readouterr().err
    rc = eval_main(["niah", "--checkpoint", str(run_dir), "--lengths", "128,256", "--depths", "0,1",
                    "--kinds", "passkey", "--seeds", "1", "--memorize", "--out", str(out), "--no-wandb"])
    assert rc == 0
    niah = json.loads((out / "niah.json").read_text())
    assert [(r["length"], r["depth"]) for r in niah["rows"]] == [(128, 0.0), (128, 1.0), (256, 0.0), (256, 1.0)]
    # a second "run" (a Transformer baseline JSON) so the report shows deltas
    base = dict(res, arch="transformer")
    base["metrics"] = {t: {k: (v * 0.5 if isinstance(v, float) and k != "seconds" else v) for k, v in m.items()}
                       for t, m in res["metrics"].items()}
    bdir = tmp_path / "transformer-run" / "eval"
    bdir.mkdir(parents=True)
    (bdir / "zeroshot.json").write_text(json.dumps(base))
    cont = {"suite": "continual", "segments": ["a", "b"], "steps_per_segment": 5, "batch_size": 2, "seq_len": 16,
            "results": {"hope": {"loss_matrix": [[1.0, 3.0], [2.0, 1.0]], "avg_final_loss": 1.5,
                                 "mean_forgetting": 1.0, "backward_transfer": -1.0, "forgetting": [1.0, 0.0]}}}
    (bdir / "continual.json").write_text(json.dumps(cont))
    md_path = tmp_path / "reports" / "results.md"
    assert report_main([str(out.parent), str(bdir.parent), "--out", str(md_path),
                        "--plots", str(tmp_path / "reports" / "plots")]) == 0
    md = md_path.read_text()
    assert "## Zero-shot multiple choice" in md and "## Needle in a haystack" in md and "## Continual learning" in md
    assert "Baseline for deltas: `transformer:transformer-run`" in md
    avg_row = next(l for l in md.splitlines() if l.startswith("| average"))
    delta = 100 * (res["metrics"]["average"]["acc"] - base["metrics"]["average"]["acc"])
    assert f"{delta:+.1f}" in avg_row
    assert "| hope | 1.500 | 1.000 | -1.000 |" in md
    assert (tmp_path / "reports" / "plots" / "zeroshot_average.png").exists()
    assert report_main([str(tmp_path / "missing")]) == 2


def _req(*args):
    """A request as the harness passes them (an Instance's ``args``)."""
    return SimpleNamespace(args=args)


def test_lm_eval_adapter_methods(tokenizer):
    from hope.eval.lm_eval_adapter import HarnessLM
    from hope.eval.scoring import rolling_windows, score_continuations

    torch.manual_seed(0)
    model = build_model(tiny("transformer", vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval()
    lm = HarnessLM(model=model, tokenizer=tokenizer, batch_size=2)
    reqs = [_req("In the beginning God created", " the heaven"), _req("And the earth was ", "without form")]
    got = lm.loglikelihood(reqs)
    ctx = tokenizer.encode("In the beginning God created")
    cont = tokenizer.encode("In the beginning God created the heaven")[len(ctx):]  # joint encoding
    want = score_continuations(model, [([tokenizer.eos_id] + ctx, cont)])[0].logprob
    assert got[0][0] == pytest.approx(want, abs=1e-5) and isinstance(got[1][1], bool)
    # trailing context space moves onto the continuation, as the harness does
    assert got[1][0] == pytest.approx(lm.loglikelihood([_req("And the earth was", " without form")])[0][0], abs=1e-5)
    text = "And God said, Let there be light: and there was light. " * 6
    rolled = lm.loglikelihood_rolling([_req(text)])[0]
    ids = tokenizer.encode(text)
    assert len(ids) > 64  # exercises the windowing
    # every token predicted once: the sum over the windows equals scoring each window directly
    windows = rolling_windows(ids, tokenizer.eos_id, 64)
    assert [t for _, pred in windows for t in pred] == ids and all(len(c) + len(p) <= 65 for c, p in windows)
    try:  # the harness's own windows, where it is installed
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError:
        pass
    else:
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tokenizer.eos_id, 64, 1)]
        assert windows == theirs
    direct = sum(s.logprob for s in score_continuations(model, windows, batch_size=1))
    assert rolled == pytest.approx(direct, abs=1e-4) and rolled < 0
    gen = lm.generate_until([_req("And God said", {"until": ["\n"], "max_gen_toks": 5})])
    assert isinstance(gen[0], str) and "\n" not in gen[0]
