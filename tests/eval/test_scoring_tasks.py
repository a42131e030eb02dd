"""acc / acc_norm, batched continuation scoring against a direct computation, task loaders per format."""
import json

import pytest
import torch
import torch.nn.functional as F

from hope.eval.scoring import choice_metrics, score_continuations
from hope.eval.tasks import (STANDARD_LOADERS, embedded_task_names, load_embedded, load_generic_jsonl, load_task)
from hope.models import build_model
from tests.models._util import tiny


def test_acc_and_acc_norm_hand_computed():
    # sums: -3 (1 char) vs -4 (4 chars): acc picks 0; per-char -3 vs -1: acc_norm picks 1
    assert choice_metrics([-3.0, -4.0], ["a", "bbbb"], 1) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    assert choice_metrics([-3.0, -4.0], ["a", "bbbb"], 0) == {"acc": 1.0, "acc_norm": 0.0, "acc_bytes": 0.0}
    # acc_bytes divides by UTF-8 bytes: "éé" is 2 characters, 4 bytes (-3/3 > -3.2/2 per character, < -3.2/4 per byte)
    assert choice_metrics([-3.0, -3.2], ["abc", "éé"], 0) == {"acc": 1.0, "acc_norm": 1.0, "acc_bytes": 0.0}
    # three choices, all agree
    assert choice_metrics([-9.0, -1.0, -5.0], ["xx", "yy", "zz"], 1) == {"acc": 1.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    with pytest.raises(ValueError, match="label"):
        choice_metrics([-1.0, -2.0], ["a", "b"], 2)
    with pytest.raises(ValueError, match="finite"):
        choice_metrics([float("nan"), -2.0], ["a", "b"], 0)


@pytest.mark.parametrize("name", ["transformer", "hope"])
def test_batched_scores_equal_direct_logprobs(name):
    """Right-padded batches of different lengths give the same sums as scoring each sequence alone."""
    torch.manual_seed(0)
    model = build_model(tiny(name)).eval()
    g = torch.Generator().manual_seed(1)
    reqs = [(torch.randint(1, 97, (n,), generator=g).tolist(), torch.randint(1, 97, (m,), generator=g).tolist())
            for n, m in [(5, 3), (11, 1), (7, 6)]]
    got = score_continuations(model, reqs, batch_size=3)
    for (ctx, cont), s in zip(reqs, got):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = F.log_softmax(model(ids, return_logits=True).logits[0].float(), -1)
        want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert s.logprob == pytest.approx(want, abs=1e-4)
        assert s.num_tokens == len(cont)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_standard_format_loaders(tmp_path):
    piqa = _jsonl(tmp_path / "valid.jsonl", [{"goal": "Dry a wet phone", "sol1": "Put it in rice", "sol2": "Boil it"}])
    (tmp_path / "valid-labels.lst").write_text("0\n")
    it = load_task("piqa", piqa)[0]
    assert (it.context, it.choices, it.label) == ("Question: Dry a wet phone\nAnswer:", ["Put it in rice", "Boil it"], 0)
    assert it.requests() == [("Question: Dry a wet phone\nAnswer:", " Put it in rice"),
                             ("Question: Dry a wet phone\nAnswer:", " Boil it")]

    siqa = _jsonl(tmp_path / "dev.jsonl", [{"context": "Tracy stayed.", "question": "Why?", "answerA": "a",
                                            "answerB": "b", "answerC": "c"}])
    (tmp_path / "dev-labels.lst").write_text("3\n")
    it = load_task("siqa", siqa)[0]
    assert it.label == 2 and it.choices == ["a", "b", "c"] and it.context == "Q: Tracy stayed. Why?\nA:"

    hs = _jsonl(tmp_path / "hs.jsonl", [{"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then",
                                         "endings": ["she bakes [title] it.", "x", "y", "z"], "label": 0, "ind": 7}])
    it = load_task("hellaswag", hs)[0]
    assert it.context == "Baking: She mixes flour. Then" and it.choices[0] == "she bakes. it." and it.id == "7"

    wg = _jsonl(tmp_path / "wg.jsonl", [{"sentence": "The cup fell off the table because _ was unstable.",
                                         "option1": "the cup", "option2": "the table", "answer": "2"}])
    it = load_task("winogrande", wg)[0]
    assert it.choices == ["The cup fell off the table because the cup", "The cup fell off the table because the table"]
    assert it.continuation == "was unstable." and it.label == 1
    assert it.requests()[1] == ("The cup fell off the table because the table", " was unstable.")

    arc = _jsonl(tmp_path / "arc.jsonl", [{"id": "q1", "question": {"stem": "2+2?", "choices": [
        {"text": "3", "label": "A"}, {"text": "4", "label": "B"}]}, "answerKey": "B"}])
    for fmt in ("arc_easy", "arc_challenge"):
        it = load_task(fmt, arc)[0]
        assert it.context == "Question: 2+2?\nAnswer:" and it.choices == ["3", "4"] and it.label == 1
    it = load_task("obqa", arc)[0]  # the harness's OpenBookQA prompt is the stem alone
    assert it.context == "2+2?" and it.choices == ["3", "4"] and it.label == 1

    bq = _jsonl(tmp_path / "bq.jsonl", [{"question": "is water wet", "passage": "Water is wet.", "answer": True}])
    it = load_task("boolq", bq)[0]
    assert it.choices == ["no", "yes"] and it.label == 1 and it.context.endswith("Question: is water wet?\nAnswer:")

    gen = _jsonl(tmp_path / "g.jsonl", [{"context": "c", "choices": ["x", "y"], "label": 1}])
    assert load_task("jsonl", gen)[0].label == 1
    _jsonl(tmp_path / "bad.jsonl", [{"context": "c", "choices": ["x", "y"]}])
    with pytest.raises(ValueError, match="label"):
        load_generic_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="known"):
        load_task("mmlu", gen)
    assert set(STANDARD_LOADERS) >= {"piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq",
                                      "siqa", "obqa", "jsonl"}


def test_embedded_bigbench_tasks_load_with_prefixes():
    names = embedded_task_names()
    assert "social_iqa" in names and len(names) >= 10
    for n in names:
        items = load_embedded(n)
        assert items and all(0 <= it.label < len(it.choices) for it in items)
    siqa = load_embedded("social_iqa")[0]
    # BIG-bench formatting: default "\nQ: " input prefix, choices appended, "\nA:" output prefix
    assert siqa.context.startswith("\nQ: Tracy didn't go home") and "\n  choice: Make a new plan" in siqa.context
    # the output prefix "\nA: " ends the context; the choice follows with no extra delimiter
    assert siqa.context.endswith("\nA: ") and siqa.choices[0] == "Make a new plan" and siqa.target_delimiter == ""
    assert siqa.requests()[0] == (siqa.context, "Make a new plan")
    nav = load_embedded("navigate")[0]
    assert nav.context.startswith("If you follow these instructions, do you return to the starting point?")


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError) as e:
        load_task("not_a_task")
    assert "social_iqa" in str(e.value) and "piqa" in str(e.value)
