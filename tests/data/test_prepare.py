import hashlib
import json
import shutil

import numpy as np
import pytest

from hope.data import DataIntegrityError, PreparedData, TokenizerChecksumError, build_loader, prepare, verify
from hope.data.__main__ import main as cli_main
from hope.data.prepare import is_val_record, load_manifest
from hope.data.shards import unigram_entropy

from .conftest import small_manifest, write_manifest


def _shard_list(index):
    return [s for src in index["sources"].values() for split in src["splits"].values() for s in split["shards"]]


def test_index_stats_and_shards(prepared_small, corpus_files):
    index = prepared_small.index
    assert index["dtype"] == "<u2" and index["seq_len"] == 64
    stats = json.loads((prepared_small.dir / "stats.json").read_text())
    tok = prepared_small.load_tokenizer()
    for name in ("plays", "bible"):
        src = index["sources"][name]
        for split in ("train", "val"):
            info = src["splits"][split]
            assert info["records"] > 0 and info["sequences"] > 0
            assert info["tokens"] == info["sequences"] * 64
            assert stats["sources"][name][split]["tokens"] == info["tokens"]
            for shard in info["shards"]:
                path = prepared_small.dir / shard["path"]
                assert path.stat().st_size == shard["tokens"] * 2
                assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
                assert stats["sources"][name][split]["shard_sha256"][shard["path"]] == shard["sha256"]
        # the val fraction is honoured on records: 5% of them, evenly spread
        records = src["splits"]["train"]["records"] + src["splits"]["val"]["records"]
        assert src["splits"]["val"]["records"] == sum(is_val_record(i, 0.05) for i in range(records))
    # the shards hold the real text: decoding the start of the plays gives the start of Hamlet
    start = tok.decode(prepared_small.tokens("plays", "train")[:40])
    assert len(start) > 40 and (corpus_files / "hamlet.txt").read_text().startswith(start)
    # several shards for the plays (shard_sequences=512)
    assert len(index["sources"]["plays"]["splits"]["train"]["shards"]) >= 2
    assert stats["tokenizer_sha256"] == prepared_small.tokenizer_sha256


def test_unigram_entropy_matches_direct_count(prepared_small):
    tokens = np.concatenate([prepared_small.tokens(n, "train") for n in prepared_small.sources])
    p = np.bincount(tokens) / tokens.size
    p = p[p > 0]
    nats = float(-(p * np.log(p)).sum())
    result = unigram_entropy(prepared_small.dir, "train")
    assert result["nats_per_token"] == pytest.approx(nats, rel=1e-12)
    assert result["bits_per_token"] == pytest.approx(nats / np.log(2), rel=1e-12)
    stats = json.loads((prepared_small.dir / "stats.json").read_text())
    assert stats["train_unigram_entropy"]["nats_per_token"] == pytest.approx(nats, rel=1e-12)
    assert 4.0 < nats < np.log(512)


def test_prepare_twice_is_idempotent(corpus_files, tmp_path):
    path = write_manifest(tmp_path, small_manifest(corpus_files, tmp_path / "out"))
    first = prepare(path, progress=False)
    out = tmp_path / "out"
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")}
    tok_mtime = (out / "tokenizer.model").stat().st_mtime_ns
    second = prepare(path, progress=False)
    assert second.index == first.index
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")} == mtimes
    assert (out / "tokenizer.model").stat().st_mtime_ns == tok_mtime
    # a weight change rewrites only the index: no re-tokenisation
    third = prepare(path, overrides=["sources.1.weight=3.0"], progress=False)
    assert third.weights == {"plays": 0.75, "bible": 3.0}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")} == mtimes
    # a corrupt shard is found and only its source is rebuilt, to the same bytes
    shard = next(p for p in sorted(mtimes) if "bible" in p.parts)
    good = shard.read_bytes()
    shard.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    fourth = prepare(path, overrides=["sources.1.weight=3.0"], progress=False)
    assert shard.read_bytes() == good
    for name in ("plays", "bible"):
        for key in ("fingerprint", "splits", "weight"):
            assert fourth.index["sources"][name][key] == third.index["sources"][name][key]
    assert all(m == p.stat().st_mtime_ns for p, m in mtimes.items() if "plays" in p.parts)
    assert (out / "tokenizer.model").stat().st_mtime_ns == tok_mtime
    verify(out)


@pytest.fixture
def prepared_copy(prepared_small, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(prepared_small.dir, folder)
    return folder


def test_corrupt_shard_byte_names_the_file(prepared_copy):
    index = verify(prepared_copy)
    shard = _shard_list(index)[1]
    path = prepared_copy / shard["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataIntegrityError, match=str(path)):
        verify(prepared_copy)
    with pytest.raises(DataIntegrityError, match=shard["path"]):
        build_loader(prepared_copy, "train", 2, 64, seed=0, verify_data=True)


def test_truncated_or_missing_shard_names_the_file(prepared_copy):
    shard = _shard_list(verify(prepared_copy))[0]
    path = prepared_copy / shard["path"]
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataIntegrityError, match=f"corrupt shard file {path}"):
        verify(prepared_copy)
    path.unlink()
    with pytest.raises(DataIntegrityError, match=f"missing shard file {path}"):
        verify(prepared_copy)


def test_tokenizer_checksum_mismatch_stops(prepared_copy):
    index = verify(prepared_copy)
    tok_path = prepared_copy / "tokenizer.model"
    with pytest.raises(TokenizerChecksumError, match=str(tok_path)):
        verify(prepared_copy, tokenizer_sha256="f" * 64)
    with pytest.raises(TokenizerChecksumError, match=str(tok_path)):
        build_loader(prepared_copy, "train", 2, 64, tokenizer_sha256="f" * 64)
    data = bytearray(tok_path.read_bytes())
    data[-1] ^= 0xFF
    tok_path.write_bytes(bytes(data))
    with pytest.raises(TokenizerChecksumError, match=str(tok_path)):
        verify(prepared_copy, tokenizer_sha256=index["tokenizer"]["sha256"])
    with pytest.raises(TokenizerChecksumError, match=str(tok_path)):
        PreparedData.open(prepared_copy).load_tokenizer()


def test_cli_prepare_verify_with_reused_tokenizer(prepared_small, corpus_files, tmp_path, capsys):
    path = write_manifest(tmp_path, small_manifest(corpus_files, tmp_path / "out"))
    reuse = f"tokenizer.path={prepared_small.tokenizer_path}"
    assert cli_main(["prepare", str(path), "seq_len=32", reuse, "--quiet"]) == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["seq_len"] == 32 and index["tokenizer"]["sha256"] == prepared_small.tokenizer_sha256
    # same tokenizer, same records: the token streams match the 64-token preparation up to the dropped tails
    ours = PreparedData.open(tmp_path / "out").tokens("bible", "val")
    theirs = prepared_small.tokens("bible", "val")
    common = min(ours.size, theirs.size)
    assert common > 0 and np.array_equal(ours[:common], theirs[:common])
    assert cli_main(["verify", str(tmp_path / "out")]) == 0
    assert "shards verified" in capsys.readouterr().out
    shard = tmp_path / "out" / _shard_list(index)[0]["path"]
    shard.write_bytes(shard.read_bytes()[::-1])
    assert cli_main(["verify", str(tmp_path / "out")]) == 1
    assert str(shard) in capsys.readouterr().err


def test_manifest_errors_name_the_key(corpus_files, tmp_path):
    base = small_manifest(corpus_files, tmp_path / "out")
    cases = [({"seq_len": 0}, "manifest.seq_len"), ({"val_fraction": 1.5}, "manifest.val_fraction"),
             ({"bogus": 1}, "bogus"), ({"tokenizer": {"vocab_size": 3}}, "manifest.tokenizer.vocab_size"),
             ({"sources": []}, "manifest.sources")]
    for change, message in cases:
        path = write_manifest(tmp_path, {**base, **change})
        with pytest.raises(ValueError, match=message):
            load_manifest(path)
    bad_source = {**base, "sources": [{"name": "x", "kind": "csv", "paths": ["a"]}]}
    with pytest.raises(ValueError, match=r"sources\[0\]\.kind"):
        load_manifest(write_manifest(tmp_path, bad_source))
    bad_weight = {**base, "sources": [{**base["sources"][0], "weight": -1}]}
    with pytest.raises(ValueError, match=r"sources\[0\]\.weight"):
        load_manifest(write_manifest(tmp_path, bad_weight))
    no_match = {**base, "sources": [{"name": "x", "kind": "text", "paths": [str(tmp_path / "none*.txt")]}]}
    with pytest.raises(ValueError, match="matches no file"):
        prepare(write_manifest(tmp_path, no_match), progress=False)
