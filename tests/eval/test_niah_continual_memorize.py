"""NIAH token lengths / depths, continual metrics math, memorisation semantics and its recall benefit."""
import pytest
import torch

import hope.models.online as online
from hope.eval.continual import continual_metrics, train_sequentially
from hope.eval.niah import build_example, run_niah, summarize, write_csv_and_plot
from hope.eval.scoring import score_choices_memorized, score_continuations
from hope.models import build_model
from tests.eval._oracle import InductionOracle
from tests.models._util import tiny


@pytest.mark.parametrize("kind", ["passkey", "number", "uuid"])
def test_niah_true_token_length_and_depth(tokenizer, filler_text, kind):
    filler = tokenizer.encode(filler_text)
    for length in (256, 512):
        for depth in (0.0, 0.5, 1.0):
            ex = build_example(tokenizer, filler, length=length, depth=depth, kind=kind, seed=3)
            ids = ex["input_ids"]
            assert len(ids) == length  # true token count with the model's tokenizer
            assert ex["value"] in tokenizer.decode(ids)
            text_before = tokenizer.decode(ids[:ex["needle_pos"]])
            assert ex["value"] not in text_before
            # needle start is at round(depth * filler tokens) after the document-start token
            needle_len = len(tokenizer.encode({"passkey": "The pass key is {v}. Remember it. {v} is the pass key.",
                                               "number": "The special magic number is {v}.",
                                               "uuid": "The special magic uuid is {v}."}[kind].format(v=ex["value"])))
            question = {"passkey": "What is the pass key? The pass key is",
                        "number": "What is the special magic number? The special magic number is",
                        "uuid": "What is the special magic uuid? The special magic uuid is"}[kind]
            question_len = len(tokenizer.encode(question))
            assert ids[0] == tokenizer.eos_id  # documents follow EOS in the training stream
            fill = length - 1 - needle_len - question_len
            assert ex["needle_pos"] == 1 + round(depth * fill)
            # the answer's tokens are those that follow the question in running text (no extra word-start piece)
            whole = tokenizer.encode(question + " " + ex["value"])
            assert ex["answer"] == whole[question_len:] and ex["answer"] != tokenizer.encode(" " + ex["value"])
            assert ex["value"] not in tokenizer.decode(ids[-question_len:])  # the answer is never in the prompt tail
    with pytest.raises(ValueError, match="too short"):
        build_example(tokenizer, filler, length=10, depth=0.5, kind=kind, seed=0)


def test_niah_runs_and_writes_csv_and_png(tokenizer, filler_text, tmp_path):
    # a deterministic copy model with a 64-token window: right when the needle sits at the end (depth 1),
    # wrong when it sits at the start (depth 0) of a 96- or 160-token haystack
    oracle = InductionOracle(tokenizer.vocab_size, window=64)
    rows = run_niah(oracle, tokenizer, filler_text, lengths=[96, 160], depths=[0.0, 1.0], kinds=["passkey"], seeds=[0])
    assert [(r["length"], r["depth"], r["exact_match"]) for r in rows] == [
        (96, 0.0, 0.0), (96, 1.0, 1.0), (160, 0.0, 0.0), (160, 1.0, 1.0)]
    s = summarize(rows)
    assert s["by_length"] == {"96": {"exact_match": 0.5, "logprob_acc": 0.5},
                              "160": {"exact_match": 0.5, "logprob_acc": 0.5}}
    csv_path, png = write_csv_and_plot(rows, tmp_path / "plots", "niah_oracle")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "kind,length,depth,seed,exact_match,logprob_acc" and lines[2] == "passkey,96,1.0,0,1.0,1.0"
    assert png.stat().st_size > 1000
    # HOPE with test-time memorisation: the _memorize variants are reported next to the base ones
    torch.manual_seed(0)
    model = build_model(tiny("hope", vocab_size=tokenizer.vocab_size, max_seq_len=256)).eval()
    rows = run_niah(model, tokenizer, filler_text, lengths=[64], depths=[1.0], kinds=["passkey"], seeds=[0],
                    memorize=True, memorize_paths=("titan", "cms"), memorize_steps=1)
    assert set(rows[0]) == {"kind", "length", "depth", "seed", "exact_match", "logprob_acc", "exact_match_memorize",
                            "logprob_acc_memorize"}


def test_continual_metrics_on_known_matrix():
    L = [[1.0, 5.0, 6.0],
         [2.0, 1.5, 6.0],
         [3.0, 1.0, 2.0]]
    m = continual_metrics(L)
    assert m["forgetting"] == [2.0, 0.0, 0.0]         # final - best over stages since learned
    assert m["mean_forgetting"] == pytest.approx(1.0)  # mean over all but the last segment
    assert m["avg_final_loss"] == pytest.approx(2.0)
    assert m["backward_transfer"] == pytest.approx(((1.0 - 3.0) + (1.5 - 1.0)) / 2)
    with pytest.raises(ValueError, match="square"):
        continual_metrics([[1.0, 2.0]])


def test_train_sequentially_fills_matrix(tokenizer):
    from hope.train.config import config_from_dict

    cfg = config_from_dict({"optim": {"outer": {"lr": 1e-2, "warmup_steps": 2, "fused": "false"}}})
    torch.manual_seed(0)
    model = build_model(tiny("transformer"))
    g = torch.Generator().manual_seed(0)
    segs = [torch.randint(0, 97, (16, 16), generator=g) % k for k in (5, 97)]  # two different distributions
    r = train_sequentially(model, segs, [s[:4] for s in segs], steps_per_segment=15, batch_size=4,
                           train_cfg=cfg, progress=False)
    L = r["loss_matrix"]
    assert len(L) == 2 and all(len(x) == 2 for x in L)
    assert L[0][0] < L[0][1]                  # stage 1 learned segment 0 (low-entropy tokens)
    assert r["forgetting"][0] >= 0.0 and torch.isfinite(torch.tensor(L)).all()


def test_memorize_never_sees_the_answer(monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny("hope")).eval()
    seen = []
    real = online.memorize

    def spy(m, input_ids, **kw):
        seen.append(input_ids.clone())
        return real(m, input_ids, **kw)

    monkeypatch.setattr(online, "memorize", spy)
    context = list(range(10, 30))
    choices = [[90, 91, 92], [93, 94]]
    scores = score_choices_memorized(model, context, choices, paths=("titan", "cms"), steps=2)
    assert len(seen) == 1
    assert seen[0].tolist() == [context[:-1]]  # exactly the context (minus the token that predicts the answer)
    assert all(torch.isfinite(torch.tensor(s.logprob)) for s in scores)
    # memorize with only the titan path reproduces base scoring (the forward already runs those updates)
    chunked = tiny("hope", cms_levels=1, cms_periods=(64,))
    m2 = build_model(chunked).eval()
    ctx = list(range(1, 17)) + [5]  # 16 memorised tokens: aligned with the memory chunks
    base = score_continuations(m2, [(ctx, c) for c in choices], batch_size=2)
    mem = score_choices_memorized(m2, ctx, choices, paths=("titan",), steps=1)
    for b, m in zip(base, mem):
        assert m.logprob == pytest.approx(b.logprob, abs=1e-3)


def test_memorize_improves_recall_of_an_early_fact():
    """Synthetic integration: a fact (token pattern) placed early in the context, then filler, then the fact's
    cue; memorising the context (CMS path) raises the log-probability of the fact's continuation over the same
    weights whose CMS does not learn in context (``cms_mode='static'``)."""
    torch.manual_seed(0)
    model = build_model(tiny("hope", cms_lr=0.05, cms_beta=0.0, cms_periods=(4, 8, 16))).eval()
    static = build_model(model.config.replace(cms_mode="static")).eval()
    static.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(3)
    fact = torch.randint(1, 97, (12,), generator=g).tolist()
    filler = torch.randint(1, 97, (16,), generator=g).tolist()
    context = fact + filler + fact[:6]
    answer, wrong = fact[6:], torch.randint(1, 97, (6,), generator=g).tolist()
    base = score_continuations(static, [(context, answer), (context, wrong)], batch_size=2)
    mem = score_choices_memorized(model, context, [answer, wrong], paths=("titan", "cms"), steps=3)
    gain = mem[0].logprob - base[0].logprob
    assert gain > 0.5, (base[0].logprob, mem[0].logprob)
    # the gain is specific to the memorised fact, not a uniform shift
    assert gain > mem[1].logprob - base[1].logprob + 0.5
