"""Scores that can fail: a deterministic model whose answers are known (right and wrong) through zero-shot and
NIAH, per-item log-likelihoods against hand-computed joint-encoding values, and truncation to the window."""
import pytest
import torch
import torch.nn.functional as F

from hope.eval.niah import build_example, run_niah, score_example, summarize
from hope.eval.scoring import encode_pair, prefix_ids, score_continuations
from hope.eval.tasks import MCItem
from hope.eval.zeroshot import evaluate_items
from hope.models import build_model
from tests.eval._oracle import InductionOracle, oracle_logprobs
from tests.models._util import tiny

NEEDLE = "The pass key is 71. Remember it. What is the pass key? The pass key is"


def test_joint_encoding_has_no_extra_word_start_piece(tokenizer):
    ctx, cont = encode_pair(tokenizer, "In the beginning God created the", " heaven")
    assert ctx == prefix_ids(tokenizer) + tokenizer.encode("In the beginning God created the")
    assert cont == tokenizer.encode("heaven") and tokenizer.id_to_piece(cont[0]).startswith("▁he")
    # encoding " heaven" on its own adds SentencePiece's word-start piece: the mistake this convention avoids
    alone = tokenizer.encode(" heaven")
    assert tokenizer.id_to_piece(alone[0]) == "▁" and alone[1:] == cont
    # trailing context whitespace moves onto the continuation before encoding
    assert encode_pair(tokenizer, "In the beginning God created the ", "heaven") == (ctx, cont)
    # an empty context is the document-start token alone
    assert encode_pair(tokenizer, "", "In") == ([tokenizer.eos_id], tokenizer.encode("In"))


def test_oracle_zero_shot_right_and_wrong_with_hand_computed_loglikelihoods(tokenizer):
    oracle = InductionOracle(tokenizer.vocab_size)
    a, b = oracle_logprobs(oracle.confidence, tokenizer.vocab_size)  # predicted token, any other token
    items = [MCItem(NEEDLE, ["71", "90"], 0, "right"),     # copies 71: right
             MCItem(NEEDLE, ["71", "90"], 1, "wrong"),     # the label is the one it cannot copy: wrong
             MCItem(NEEDLE, ["710", "9"], 0, "norm")]      # "710": 3 right + 1 wrong token; "9": 1 right + 1 wrong
    r = evaluate_items(oracle, tokenizer, items, batch_size=2, samples=True)
    n71 = len(encode_pair(tokenizer, NEEDLE, " 71")[1])
    assert [tokenizer.id_to_piece(i) for i in encode_pair(tokenizer, NEEDLE, " 710")[1]] == ["▁", "7", "1", "0"]
    want = {"right": [n71 * a, a + b + b], "wrong": [n71 * a, a + b + b], "norm": [3 * a + b, a + b]}
    for s in r["samples"]:
        assert s["loglikelihoods"] == pytest.approx(want[s["id"]], rel=1e-5, abs=1e-5), s["id"]
    by_id = {s["id"]: s for s in r["samples"]}
    assert (by_id["right"]["acc"], by_id["right"]["acc_norm"]) == (1.0, 1.0)
    assert (by_id["wrong"]["acc"], by_id["wrong"]["acc_norm"]) == (0.0, 0.0)
    # sums prefer "9" (fewer tokens to lose), per character "710" wins
    assert (by_id["norm"]["acc"], by_id["norm"]["acc_norm"]) == (0.0, 1.0)
    assert by_id["right"]["is_greedy"] == [True, False]
    assert r["acc"] == pytest.approx(1 / 3) and r["acc_norm"] == pytest.approx(2 / 3) and r["n"] == 3
    # [1, 0, 0]: sample variance 1/3, standard error sqrt(1/3) / sqrt(3) = 1/3
    assert r["acc_stderr"] == pytest.approx(1 / 3)
    assert r["truncated"] == 0


def test_oracle_niah_right_inside_its_window_wrong_outside(tokenizer, filler_text):
    oracle = InductionOracle(tokenizer.vocab_size, window=64)
    # digit needles: answer and distractor have equally many tokens, so a blind guess ties (logprob_acc 0)
    rows = run_niah(oracle, tokenizer, filler_text, lengths=[160], depths=[0.0, 1.0], kinds=["passkey", "number"],
                    seeds=[0, 1])
    for r in rows:
        right = r["depth"] == 1.0  # the needle ends right before the question, inside the window
        assert (r["exact_match"], r["logprob_acc"]) == ((1.0, 1.0) if right else (0.0, 0.0)), r
    s = summarize(rows)
    assert s["exact_match"] == 0.5 and s["n"] == 8
    # with an unlimited window the needle is found at every depth, uuids too
    unlimited = InductionOracle(tokenizer.vocab_size)
    for kind in ("passkey", "number", "uuid"):
        ex = build_example(tokenizer, tokenizer.encode(filler_text), length=160, depth=0.0, kind=kind, seed=0)
        assert score_example(unlimited, tokenizer, ex) == {"exact_match": 1.0, "logprob_acc": 1.0}, kind


def test_our_loglikelihood_equals_a_hand_computed_joint_encoding_value(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny("transformer", vocab_size=tokenizer.vocab_size, max_seq_len=64)).eval()
    context, choices = "And God said, Let there be", ["light", "darkness upon the deep"]
    r = evaluate_items(model, tokenizer, [MCItem(context, choices, 0)], samples=True)
    for choice, got in zip(choices, r["samples"][0]["loglikelihoods"]):
        ctx = [tokenizer.eos_id] + tokenizer.encode(context)
        whole = [tokenizer.eos_id] + tokenizer.encode(context + " " + choice)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([whole]), return_logits=True).logits[0].double(), -1)
        want = sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))
        assert got == pytest.approx(want, abs=1e-4)


def test_long_requests_keep_the_last_window_and_are_counted(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny("transformer", vocab_size=tokenizer.vocab_size, max_seq_len=16)).eval()
    long_ctx = "In the beginning God created the heaven and the earth. And the earth was without form"
    items = [MCItem(long_ctx, ["and void", "light"], 0, "long"), MCItem("And God", ["said", "saw"], 1, "short")]
    r = evaluate_items(model, tokenizer, items, samples=True)
    assert r["truncated"] == 1 and r["max_length"] == 16
    assert [s["truncated"] for s in r["samples"]] == [True, False]
    ctx, cont = encode_pair(tokenizer, long_ctx, " and void")
    seq = (ctx + cont)[-17:]  # the model reads 16 tokens; the last continuation token is only a target
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([seq[:-1]]), return_logits=True).logits[0].double(), -1)
    want = sum(float(logp[t - 1, seq[t]]) for t in range(len(seq) - len(cont), len(seq)))
    assert r["samples"][0]["loglikelihoods"][0] == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="max_length"):
        score_continuations(model, [([1], list(range(5, 30)))], max_length=16)
