"""Fixtures for the data tests: a small prepared folder built from real corpus text (a few Shakespeare plays
and the first books of the KJV), so tokenizer training and tokenisation take about a second."""
import shutil
from pathlib import Path

import pytest
import yaml

from hope.data.sources import find_shared_data_dir

SHARED = find_shared_data_dir()
needs_shared = pytest.mark.skipif(SHARED is None, reason="needs ../shared/data (or $HOPE_SHARED_DATA)")


PLAYS = ("hamlet.txt", "tempest.txt", "twelfth_night.txt")


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    """Real text: 3 plays and the first 4000 verses of the KJV, copied into a temp folder."""
    if SHARED is None:
        pytest.skip("needs ../shared/data (or $HOPE_SHARED_DATA)")
    folder = tmp_path_factory.mktemp("corpus")
    for name in PLAYS:
        shutil.copyfile(SHARED / "corpus" / "shakespeare" / name, folder / name)
    kjv_lines = (SHARED / "corpus" / "kjv.txt").read_text().split("\n")[:4000]
    (folder / "kjv_part.txt").write_text("\n".join(kjv_lines) + "\n")
    return folder


def small_manifest(corpus: Path, out_dir: Path, **extra) -> dict:
    manifest = {
        "name": "small", "out_dir": str(out_dir), "seq_len": 64, "val_fraction": 0.05, "shard_sequences": 512,
        "seed": 0, "tokenizer": {"vocab_size": 512, "input_sentence_size": 0},
        "sources": [
            {"name": "plays", "kind": "text", "paths": [str(corpus / n) for n in PLAYS],
             "record": "chunk", "record_lines": 40, "weight": 0.75},
            {"name": "bible", "kind": "text", "paths": [str(corpus / "kjv_part.txt")], "record": "line",
             "weight": 0.25},
        ],
    }
    manifest.update(extra)
    return manifest


@pytest.fixture(scope="session")
def prepared_small(corpus_files, tmp_path_factory):
    from hope.data import prepare
    folder = tmp_path_factory.mktemp("prepared")
    path = write_manifest(folder, small_manifest(corpus_files, folder / "out"))
    return prepare(path, progress=False)
