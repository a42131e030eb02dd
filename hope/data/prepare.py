"""``prepare(manifest)``: train (or reuse) the tokenizer, tokenise every source, write token shards and stats.

Manifest (YAML)::

    name: embedded
    out_dir: data/prepared/embedded      # relative to the current directory
    seq_len: 256                         # shards hold whole sequences of this length
    val_fraction: 0.02                   # every (1/val_fraction)-th record of each source is held out
    shard_sequences: 4096                # sequences per shard file
    seed: 0
    tokenizer:
      vocab_size: 4096
      model_type: unigram
      input_sentence_size: 200000        # lines sampled for SentencePiece training (0 = all)
      path: null                         # an existing .model to reuse instead of training
      hf: null                           # or a Hugging Face tokenizer (name or folder; `revision:`) to use as is
    sources:                             # paths are relative to the manifest's folder
      - {name: kjv, kind: embedded, corpus: kjv, weight: 0.5}
      - {name: mine, kind: text, paths: ["texts/*.txt"], record: chunk, record_lines: 100}
      - {name: web, kind: jsonl, paths: [a.jsonl], text_field: text}
      - {name: hf, kind: hf, dataset: wikitext, config: wikitext-2-raw-v1, split: train, text_field: text}

Each record is encoded (``\\n`` is a token) and followed by EOS. ``prepare`` is idempotent: the tokenizer
is retrained only when its inputs or settings change, and a source is re-tokenised only when its files,
settings or the tokenizer change (recorded fingerprints); otherwise the existing shards are verified and kept.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from hope.data.shards import (INDEX_FILE, INDEX_FORMAT, SPLITS, STATS_FILE, ShardWriter, open_shard, read_index,
                              token_dtype, unigram_entropy_of_counts, verify, verify_shard_file, write_json_atomic)
from hope.data.sources import DataIntegrityError, SourceSpec
from hope.data.tokenizer import (HF_TOKENIZER_DIR, HFTokenizer, Tokenizer, load_tokenizer, sha256_file,
                                 train_tokenizer)
from hope.yamlio import load_yaml

_log = logging.getLogger("hope.data")

TOKENIZER_DEFAULTS = {"vocab_size": 4096, "model_type": "unigram", "input_sentence_size": 200000, "path": None,
                      "character_coverage": 1.0, "hard_vocab_limit": True, "hf": None, "revision": None}
MANIFEST_KEYS = {"name", "out_dir", "seq_len", "val_fraction", "shard_sequences", "seed", "tokenizer", "sources",
                 "encode_batch_records"}


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Manifest:
    sources: list[SourceSpec]
    out_dir: Path
    name: str = "data"
    seq_len: int = 256
    val_fraction: float = 0.02
    shard_sequences: int = 4096
    seed: int = 0
    tokenizer: dict = field(default_factory=lambda: dict(TOKENIZER_DEFAULTS))
    encode_batch_records: int = 2048
    path: Path | None = None

    @classmethod
    def from_dict(cls, raw: dict, base_dir: Path | None = None, path: Path | None = None) -> "Manifest":
        if not isinstance(raw, dict):
            raise TypeError(f"manifest: expected a mapping, got {type(raw).__name__}")
        unknown = set(raw) - MANIFEST_KEYS
        if unknown:
            raise ValueError(f"manifest: unknown keys {sorted(unknown)}; expected some of {sorted(MANIFEST_KEYS)}")
        if "out_dir" not in raw:
            raise ValueError("manifest.out_dir: required (folder for the tokenizer, shards and index)")
        sources_raw = raw.get("sources")
        if not isinstance(sources_raw, list) or not sources_raw:
            raise ValueError("manifest.sources: expected a non-empty list of sources")
        sources = [SourceSpec.from_dict(s, i, base_dir) for i, s in enumerate(sources_raw)]
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"manifest.sources: names must be unique, got {names}")
        tokenizer = dict(TOKENIZER_DEFAULTS)
        tok_raw = raw.get("tokenizer") or {}
        if not isinstance(tok_raw, dict):
            raise TypeError(f"manifest.tokenizer: expected a mapping, got {type(tok_raw).__name__}")
        unknown = set(tok_raw) - set(TOKENIZER_DEFAULTS)
        if unknown:
            raise ValueError(f"manifest.tokenizer: unknown keys {sorted(unknown)}; expected {sorted(TOKENIZER_DEFAULTS)}")
        tokenizer.update(tok_raw)
        if tokenizer["path"] is not None:  # like out_dir, relative to the current directory
            tokenizer["path"] = os.path.expanduser(str(tokenizer["path"]))
        if tokenizer["hf"] is not None and tokenizer["path"] is not None:
            raise ValueError("manifest.tokenizer: give either path (a SentencePiece model) or hf (a Hugging Face "
                             "tokenizer), not both")
        manifest = cls(sources=sources, out_dir=Path(os.path.expanduser(str(raw["out_dir"]))),
                       name=str(raw.get("name", "data")), tokenizer=tokenizer, path=path,
                       **{k: raw[k] for k in ("seq_len", "val_fraction", "shard_sequences", "seed",
                                              "encode_batch_records") if k in raw})
        manifest.validate()
        return manifest

    def validate(self) -> None:
        for key in ("seq_len", "shard_sequences", "encode_batch_records"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"manifest.{key}: expected an int >= 1, got {value!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1:
            raise ValueError(f"manifest.val_fraction: expected a number in [0, 1), got {self.val_fraction!r}")
        vocab = self.tokenizer["vocab_size"]
        if not isinstance(vocab, int) or vocab < 16:
            raise ValueError(f"manifest.tokenizer.vocab_size: expected an int >= 16, got {vocab!r}")
        if not any(s.weight > 0 for s in self.sources):
            raise ValueError("manifest.sources: at least one source needs weight > 0")


def _set_dotted(target: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = target
    for key in keys[:-1]:
        if key.isdigit() and isinstance(node, list):
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
    last = keys[-1]
    if last.isdigit() and isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def load_manifest(path: str | os.PathLike, overrides: Iterable[str] | dict | None = None) -> Manifest:
    """Read a YAML manifest (a file, or a packaged manifest's name such as ``embedded``: see ``hope.configs``);
    ``overrides`` are ``key=value`` strings (dotted keys, YAML values) or a dict."""
    from hope.configs import resolve_config

    path = resolve_config(path, "data")  # a file, or a packaged manifest's name (``embedded``)
    raw = load_yaml(path.read_text()) or {}
    if isinstance(overrides, dict):
        overrides = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        _set_dotted(raw, key.strip(), load_yaml(value))
    return Manifest.from_dict(raw, base_dir=path.parent.resolve(), path=path)


def is_val_record(index: int, val_fraction: float) -> bool:
    """Deterministic, evenly spread hold-out: record i is validation when floor((i+1)f) > floor(i f)."""
    return val_fraction > 0 and int((index + 1) * val_fraction) > int(index * val_fraction)


@dataclass
class PreparedData:
    """A prepared folder: its index, tokenizer and per-source (segment) token streams.

    ``tokens(source, split)`` -> 1-D int64 numpy array of the source's tokens (shards concatenated);
    ``sequences(source, split, seq_len)`` -> LongTensor [N, seq_len] (e.g. one continual-learning segment);
    ``build_loader(...)`` -> hope.data.loader.TokenLoader over this folder.
    """
    dir: Path
    index: dict

    @classmethod
    def open(cls, prepared_dir: str | os.PathLike, verify_data: bool = False,
             tokenizer_sha256: str | None = None) -> "PreparedData":
        prepared_dir = Path(prepared_dir)
        index = verify(prepared_dir, tokenizer_sha256) if verify_data else read_index(prepared_dir)
        return cls(prepared_dir, index)

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / self.index["tokenizer"]["path"]

    @property
    def tokenizer_sha256(self) -> str:
        return self.index["tokenizer"]["sha256"]

    @property
    def seq_len(self) -> int:
        return int(self.index["seq_len"])

    @property
    def sources(self) -> list[str]:
        return list(self.index["sources"])

    @property
    def weights(self) -> dict[str, float]:
        return {name: float(src["weight"]) for name, src in self.index["sources"].items()}

    def load_tokenizer(self) -> Tokenizer | HFTokenizer:
        return load_tokenizer(self.tokenizer_path, expected_sha256=self.tokenizer_sha256)

    def tokens(self, source: str, split: str = "train") -> np.ndarray:
        if source not in self.index["sources"]:
            raise ValueError(f"source: expected one of {self.sources}, got {source!r}")
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        dtype = np.dtype(self.index["dtype"])
        parts = [np.asarray(open_shard(self.dir, s, dtype)) for s in self.index["sources"][source]["splits"][split]["shards"]]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def sequences(self, source: str, split: str = "val", seq_len: int | None = None):
        import torch
        seq_len = seq_len or self.seq_len
        tokens = self.tokens(source, split)
        n = tokens.size // seq_len
        return torch.from_numpy(tokens[: n * seq_len].reshape(n, seq_len).copy())

    def unigram_entropy(self, split: str = "train") -> dict:
        from hope.data.shards import unigram_entropy
        return unigram_entropy(self.dir, split)

    def build_loader(self, split: str, batch_size: int, seq_len: int | None = None, seed: int = 0, rank: int = 0,
                     world_size: int = 1, weights: dict | None = None, start_position=None, **kwargs):
        from hope.data.loader import build_loader
        return build_loader(self.dir, split, batch_size, seq_len or self.seq_len, seed, rank, world_size,
                            weights=weights, start_position=start_position, **kwargs)


def _progress(iterable, desc: str, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, **kwargs)


def _prepare_tokenizer(manifest: Manifest, source_prints: dict, log: list[str],
                       progress: bool) -> tuple[Tokenizer | HFTokenizer, dict]:
    out_dir = manifest.out_dir
    settings = manifest.tokenizer
    model_path = out_dir / "tokenizer.model"
    record_path = out_dir / "tokenizer.json"
    if settings["hf"]:
        # a Hugging Face base model's own tokenizer, copied in (save_pretrained) so the folder is self-contained;
        # unchanged tokenizer files give the same sha256, so the shards are kept
        tok = HFTokenizer.save_from_pretrained(settings["hf"], out_dir / HF_TOKENIZER_DIR, settings["revision"])
        write_json_atomic(record_path, {"hf": settings["hf"], "revision": settings["revision"], "sha256": tok.sha256,
                                        "vocab_size": tok.vocab_size, "path": HF_TOKENIZER_DIR})
        return tok, {"hf": settings["hf"]}
    if settings["path"]:
        # reuse a given tokenizer (e.g. the pilot's): copy it in so the prepared folder is self-contained
        given = Tokenizer.load(settings["path"])
        if not model_path.is_file() or sha256_file(model_path) != given.sha256:
            shutil.copyfile(given.path, model_path)
            given_json = Path(str(given.path)[: -len(".model")] + ".json")
            record = json.loads(given_json.read_text()) if given_json.is_file() else {}
            record.update({"model": model_path.name, "sha256": given.sha256, "copied_from": str(given.path)})
            write_json_atomic(record_path, record)
        return Tokenizer.load(model_path, given.sha256), {"reused": str(given.path)}
    fingerprint = _fingerprint({"tokenizer": {k: v for k, v in settings.items() if k != "path"},
                                "sources": source_prints, "val_fraction": manifest.val_fraction,
                                "seed": manifest.seed})
    if model_path.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        digest = sha256_file(model_path)
        if record.get("fingerprint") == fingerprint and record.get("sha256") == digest:
            log.append(f"tokenizer: up to date ({model_path}, sha256 {record['sha256'][:12]})")
            return Tokenizer.load(model_path, record["sha256"]), {"skipped": True}
        if record.get("fingerprint") == fingerprint:
            _log.warning("repairing the prepared data: tokenizer %s has sha256 %s, its record %s; it is trained "
                         "again (and the sources tokenised again if it changed)", model_path, digest, record.get("sha256"))
    # training text: the train split of every source, one line per text line (SentencePiece trains on lines)
    train_text = out_dir / "tokenizer_train.txt.tmp"
    start = time.perf_counter()
    lines = 0
    with open(train_text, "w", encoding="utf-8") as handle:
        for spec in _progress(manifest.sources, "tokenizer text", progress, unit="source"):
            for number, (_, text) in enumerate(spec.iter_records()):
                if is_val_record(number, manifest.val_fraction):
                    continue
                for line in text.split("\n"):
                    if line.strip():
                        handle.write(line + "\n")
                        lines += 1
    gather_seconds = time.perf_counter() - start
    try:
        tok = train_tokenizer([train_text], out_dir / "tokenizer", settings["vocab_size"], settings["model_type"],
                              input_sentence_size=settings["input_sentence_size"], seed=manifest.seed,
                              character_coverage=settings["character_coverage"],
                              hard_vocab_limit=settings["hard_vocab_limit"])
    except ValueError as exc:
        raise ValueError(f"manifest.tokenizer.{exc}") from exc
    finally:
        train_text.unlink(missing_ok=True)
    record = json.loads(record_path.read_text())
    record.update({"fingerprint": fingerprint, "training_lines": lines,
                   "training_text": "train split of the manifest sources, one text line per line (file removed)",
                   "gather_seconds": round(gather_seconds, 3)})
    write_json_atomic(record_path, record)
    log.append(f"tokenizer: trained vocab {tok.vocab_size} on {lines} lines in {record['train_seconds']:.1f}s "
               f"(sha256 {tok.sha256[:12]})")
    return tok, {"train_seconds": record["train_seconds"], "gather_seconds": gather_seconds, "lines": lines}


def _source_up_to_date(out_dir: Path, old: dict | None, fingerprint: str, dtype: np.dtype) -> bool:
    if not old or old.get("fingerprint") != fingerprint:
        return False
    try:
        for split in old["splits"].values():
            for shard in split["shards"]:
                verify_shard_file(out_dir / shard["path"], shard, dtype)
    except DataIntegrityError as e:
        _log.warning("repairing the prepared data: %s; its source is tokenised again", e)
        return False
    return True


def _tokenise_source(manifest: Manifest, spec: SourceSpec, tok: Tokenizer, dtype: np.dtype, progress: bool) -> dict:
    out_dir = manifest.out_dir
    source_dir = out_dir / "shards" / spec.name
    if source_dir.exists():
        shutil.rmtree(source_dir)
    writers = {split: ShardWriter(out_dir, f"shards/{spec.name}/{split}", manifest.seq_len,
                                  manifest.shard_sequences, dtype) for split in SPLITS}
    batch_texts: list[str] = []
    batch_splits: list[str] = []

    def flush():
        for split, ids in zip(batch_splits, tok.encode_batch(batch_texts, add_eos=True)):
            writers[split].add(ids)
        batch_texts.clear()
        batch_splits.clear()

    bar = _progress(spec.iter_records(), f"tokenise {spec.name}", progress, unit="rec")
    for number, (_, text) in enumerate(bar):
        batch_texts.append(text)
        batch_splits.append("val" if is_val_record(number, manifest.val_fraction) else "train")
        if len(batch_texts) >= manifest.encode_batch_records:
            flush()
    if batch_texts:
        flush()
    return {split: writer.close() for split, writer in writers.items()}


def prepare(manifest: Manifest | str | os.PathLike, overrides: Iterable[str] | dict | None = None,
            progress: bool = True) -> PreparedData:
    """Prepare token shards for ``manifest`` (a Manifest or a YAML path); skips work whose hashes match."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest, overrides)
    elif overrides:
        raise ValueError("overrides: only supported with a manifest path")
    out_dir = manifest.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log: list[str] = []

    source_prints = {spec.name: spec.fingerprint() for spec in manifest.sources}
    tok_start = time.perf_counter()
    tok, tok_info = _prepare_tokenizer(manifest, source_prints, log, progress)
    tok_seconds = time.perf_counter() - tok_start
    dtype = token_dtype(tok.vocab_size)

    old_index = None
    try:
        old_index = read_index(out_dir)
    except DataIntegrityError:
        pass
    sources_out: dict[str, dict] = {}
    tokenise_seconds = 0.0
    for spec in manifest.sources:
        fingerprint = _fingerprint({"source": source_prints[spec.name], "tokenizer_sha256": tok.sha256,
                                    "seq_len": manifest.seq_len, "val_fraction": manifest.val_fraction,
                                    "shard_sequences": manifest.shard_sequences, "dtype": dtype.str})
        old = (old_index or {}).get("sources", {}).get(spec.name)
        if old_index is not None and old_index.get("dtype") == dtype.str and \
                _source_up_to_date(out_dir, old, fingerprint, dtype):
            splits, seconds = old["splits"], float(old.get("tokenise_seconds", 0.0))
            log.append(f"source {spec.name}: up to date")
        else:
            t0 = time.perf_counter()
            splits = _tokenise_source(manifest, spec, tok, dtype, progress)
            seconds = time.perf_counter() - t0
            tokenise_seconds += seconds
            log.append(f"source {spec.name}: " + ", ".join(
                f"{split} {info['records']} records {info['tokens']} tokens {len(info['shards'])} shards"
                for split, info in splits.items()))
        sources_out[spec.name] = {"kind": spec.kind, "weight": float(spec.weight), "fingerprint": fingerprint,
                                  "tokenise_seconds": round(seconds, 3), "splits": splits}
    # drop shard folders of sources no longer in the manifest
    shards_root = out_dir / "shards"
    for folder in (shards_root.iterdir() if shards_root.is_dir() else []):
        if folder.name not in sources_out:
            shutil.rmtree(folder)

    index = {"format": INDEX_FORMAT, "name": manifest.name, "seq_len": manifest.seq_len, "dtype": dtype.str,
             "val_fraction": manifest.val_fraction, "seed": manifest.seed,
             "tokenizer": {"path": tok.path.name, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                           "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                           **({"hf": manifest.tokenizer["hf"], "revision": manifest.tokenizer["revision"]}
                              if isinstance(tok, HFTokenizer) else {})},
             "manifest": str(manifest.path) if manifest.path else None, "sources": sources_out}
    write_json_atomic(out_dir / INDEX_FILE, index)
    _write_stats(out_dir, index, tok_info, tok_seconds, tokenise_seconds, time.perf_counter() - start)
    if progress:
        for line in log:
            print(f"[hope.data] {line}", flush=True)
    return PreparedData(out_dir, index)


def _write_stats(out_dir: Path, index: dict, tok_info: dict, tok_seconds: float, tokenise_seconds: float,
                 total_seconds: float) -> dict:
    dtype = np.dtype(index["dtype"])
    vocab = int(index["tokenizer"]["vocab_size"])
    counts = np.zeros(vocab, dtype=np.int64)
    total_weight = sum(src["weight"] for src in index["sources"].values())
    total_train_tokens = sum(src["splits"]["train"]["tokens"] for src in index["sources"].values())
    per_source = {}
    for name, src in index["sources"].items():
        entry = {"weight": src["weight"], "weight_share": src["weight"] / total_weight if total_weight else 0.0,
                 "train_token_share": src["splits"]["train"]["tokens"] / max(1, total_train_tokens)}
        for split, info in src["splits"].items():
            entry[split] = {"records": info["records"], "tokens": info["tokens"], "sequences": info["sequences"],
                            "dropped_tokens": info["dropped_tokens"], "shards": len(info["shards"]),
                            "shard_sha256": {s["path"]: s["sha256"] for s in info["shards"]}}
        for shard in src["splits"]["train"]["shards"]:
            counts += np.bincount(open_shard(out_dir, shard, dtype), minlength=vocab)[:vocab]
        per_source[name] = entry
    stats = {"name": index["name"], "seq_len": index["seq_len"], "dtype": index["dtype"],
             "tokenizer_sha256": index["tokenizer"]["sha256"], "vocab_size": vocab, "sources": per_source,
             "train_unigram_entropy": unigram_entropy_of_counts(counts) if counts.sum() else None,
             # build: measured when the work was done (kept across idempotent re-runs); this_run: this call
             "timings_seconds": {
                 "build": {"tokenizer_train": json.loads((out_dir / "tokenizer.json").read_text()).get("train_seconds"),
                           "tokenise": {n: s.get("tokenise_seconds") for n, s in index["sources"].items()}},
                 "this_run": {"tokenizer": round(tok_seconds, 3), "tokenise": round(tokenise_seconds, 3),
                              "total": round(total_seconds, 3)}},
             "tokenizer_info": tok_info}
    write_json_atomic(out_dir / STATS_FILE, stats)
    return stats


__all__ = ["Manifest", "PreparedData", "load_manifest", "prepare", "is_val_record"]
