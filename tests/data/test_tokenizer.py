import hashlib
import json

import pytest

from hope.data.tokenizer import Tokenizer, TokenizerChecksumError, train_tokenizer


@pytest.fixture(scope="module")
def small_tokenizer(corpus_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    return train_tokenizer([corpus_files / "hamlet.txt", corpus_files / "kjv_part.txt"], out, 1024)


def test_roundtrip_and_special_ids(small_tokenizer):
    tok = small_tokenizer
    assert tok.vocab_size == 1024
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.newline_id) == (0, 1, 2, 3, 4)
    texts = ["To be, or not to be: that is the question:",
             "  HAMLET. Indented line\n\n\tand a tab, then 1234567 digits\n",
             "Unseen characters fall back to bytes: Ωμέγα, naïve, 東京 \u2212 end",
             "In the beginning God created the heavens and the earth."]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode("a\nb").count(tok.newline_id) == 1
    with_specials = tok.encode("hello", add_bos=True, add_eos=True)
    assert with_specials[0] == tok.bos_id and with_specials[-1] == tok.eos_id
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    # common words compress: real training, not a character model
    assert len(tok.encode(texts[3])) < len(texts[3]) / 2.5


def test_sha256_and_training_record(small_tokenizer):
    tok = small_tokenizer
    assert tok.sha256 == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    record = json.loads(tok.path.with_suffix(".json").read_text())
    assert record["sha256"] == tok.sha256
    assert record["training_command"]["vocab_size"] == 1024
    assert record["training_command"]["model_type"] == "unigram"
    again = Tokenizer.load(tok.path, expected_sha256=tok.sha256)
    assert again.encode("Horatio") == tok.encode("Horatio")


def test_checksum_mismatch_names_file(small_tokenizer, tmp_path):
    with pytest.raises(TokenizerChecksumError, match=str(small_tokenizer.path)):
        Tokenizer.load(small_tokenizer.path, expected_sha256="0" * 64)
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="broken.model"):
        Tokenizer.load(broken)


def test_training_is_reproducible(corpus_files, tmp_path):
    a = train_tokenizer([corpus_files / "tempest.txt"], tmp_path / "a" / "tok", 512)
    b = train_tokenizer([corpus_files / "tempest.txt"], tmp_path / "b" / "tok", 512)
    sample = "Full fathom five thy father lies;"
    assert a.encode(sample) == b.encode(sample)
    assert [a.id_to_piece(i) for i in range(512)] == [b.id_to_piece(i) for i in range(512)]


def test_bad_arguments(corpus_files, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([corpus_files / "tempest.txt"], tmp_path / "t", 4)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer([corpus_files / "tempest.txt"], tmp_path / "t", 256, model_type="wordpiece")
    with pytest.raises(ValueError, match="text_files"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "t", 512)
    with pytest.raises(TypeError, match="text"):
        Tokenizer.load(train_tokenizer([corpus_files / "tempest.txt"], tmp_path / "t", 512).path).encode(b"bytes")
