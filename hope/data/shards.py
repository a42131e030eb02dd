"""Token shards: flat uint16/uint32 files of token ids, an index JSON describing them, and their verification.

Layout of a prepared folder::

    <dir>/tokenizer.model, tokenizer.vocab, tokenizer.json   SentencePiece model + sha256 + training command
    <dir>/shards/<source>/<split>_<k>.bin                     flat token ids (little-endian uint16 or uint32);
                                                              each holds a whole number of seq_len sequences
    <dir>/index.json                                          format, seq_len, dtype, tokenizer sha256,
                                                              per source/split: shards (path, tokens, sha256)
    <dir>/stats.json                                          mixture stats (records, tokens, sequences, shards
                                                              per source; sha256 per shard; unigram entropy)
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from hope.data.sources import DataIntegrityError
from hope.data.tokenizer import TokenizerChecksumError, sha256_file
from hope.data.tokenizer import tokenizer_sha256 as tokenizer_digest

INDEX_FORMAT = "hope-token-shards/1"
INDEX_FILE = "index.json"
STATS_FILE = "stats.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), else uint32: halves disk and page-cache use."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class ShardWriter:
    """Appends token ids and writes shards of ``shard_sequences * seq_len`` tokens; the tail shorter than one
    sequence is dropped (counted in ``dropped_tokens``)."""

    def __init__(self, out_dir: Path, rel_prefix: str, seq_len: int, shard_sequences: int, dtype: np.dtype):
        self.out_dir = out_dir
        self.rel_prefix = rel_prefix  # e.g. "shards/kjv/train"
        self.seq_len = seq_len
        self.shard_tokens = seq_len * shard_sequences
        self.dtype = dtype
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.shards: list[dict] = []
        self.dropped_tokens = 0
        self.records = 0
        (out_dir / rel_prefix).parent.mkdir(parents=True, exist_ok=True)

    def add(self, ids: list[int] | np.ndarray) -> None:
        array = np.asarray(ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype}: [{array.min()}, {array.max()}]")
        self._pending.append(array.astype(self.dtype))
        self._pending_tokens += array.size
        self.records += 1
        while self._pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n_tokens: int) -> None:
        stream = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        block, rest = stream[:n_tokens], stream[n_tokens:]
        self._pending = [rest] if rest.size else []
        self._pending_tokens = int(rest.size)
        rel = f"{self.rel_prefix}_{len(self.shards):05d}.bin"
        path = self.out_dir / rel
        tmp = path.with_name(path.name + ".tmp")
        data = np.ascontiguousarray(block).tobytes()
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.shards.append({"path": rel, "tokens": int(block.size), "sequences": int(block.size // self.seq_len),
                            "sha256": hashlib.sha256(data).hexdigest()})

    def close(self) -> dict:
        whole = (self._pending_tokens // self.seq_len) * self.seq_len
        if whole:
            self._flush(whole)
        self.dropped_tokens += self._pending_tokens
        self._pending, self._pending_tokens = [], 0
        return {"records": self.records, "tokens": sum(s["tokens"] for s in self.shards),
                "sequences": sum(s["sequences"] for s in self.shards), "dropped_tokens": int(self.dropped_tokens),
                "shards": self.shards}


def read_index(prepared_dir: str | os.PathLike) -> dict:
    prepared_dir = Path(prepared_dir)
    path = prepared_dir / INDEX_FILE
    if not path.is_file():
        raise DataIntegrityError(f"no prepared data at {prepared_dir}: missing {path} "
                                 f"(run `python -m hope.data prepare <manifest>`)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataIntegrityError(f"corrupt index file {path}: {exc}") from exc
    if index.get("format") != INDEX_FORMAT:
        raise DataIntegrityError(f"index file {path} has format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
    return index


def open_shard(prepared_dir: Path, shard: dict, dtype: np.dtype) -> np.memmap:
    """Read-only memmap of one shard (lazy: pages load on access)."""
    path = Path(prepared_dir) / shard["path"]
    return np.memmap(path, dtype=dtype, mode="r", shape=(int(shard["tokens"]),))


def verify_shard_file(path: Path, shard: dict, dtype: np.dtype, check_hash: bool = True) -> None:
    if not path.is_file():
        raise DataIntegrityError(f"missing shard file {path}")
    expected_bytes = int(shard["tokens"]) * dtype.itemsize
    size = path.stat().st_size
    if size != expected_bytes:
        raise DataIntegrityError(f"corrupt shard file {path}: {size} bytes, index records {expected_bytes}")
    if check_hash:
        digest = sha256_file(path)
        if digest != shard["sha256"]:
            raise DataIntegrityError(f"corrupt shard file {path}: sha256 {digest}, index records {shard['sha256']}")


def verify(prepared_dir: str | os.PathLike, tokenizer_sha256: str | None = None, check_hashes: bool = True,
           progress: bool = False) -> dict:
    """Check the tokenizer checksum and every shard (size and sha256) against ``index.json``.

    ``tokenizer_sha256`` (e.g. from a checkpoint) must also match the prepared tokenizer. Raises
    ``TokenizerChecksumError`` / ``DataIntegrityError`` naming the offending file; returns the index.
    """
    prepared_dir = Path(prepared_dir)
    index = read_index(prepared_dir)
    tok_info = index["tokenizer"]
    tok_path = prepared_dir / tok_info["path"]
    if not tok_path.exists():
        raise DataIntegrityError(f"missing tokenizer file {tok_path}")
    digest = tokenizer_digest(tok_path)  # a .model file, or a Hugging Face tokenizer folder
    if digest != tok_info["sha256"]:
        raise TokenizerChecksumError(f"tokenizer checksum mismatch for {tok_path}: sha256 {digest}, "
                                     f"index.json records {tok_info['sha256']}")
    if tokenizer_sha256 is not None and digest != tokenizer_sha256:
        raise TokenizerChecksumError(f"tokenizer checksum mismatch for {tok_path}: sha256 {digest}, "
                                     f"expected {tokenizer_sha256} (the run's recorded tokenizer)")
    dtype = np.dtype(index["dtype"])
    shards = [s for src in index["sources"].values() for split in src["splits"].values() for s in split["shards"]]
    iterator = shards
    if progress:
        from tqdm import tqdm
        iterator = tqdm(shards, desc="verify shards", unit="shard")
    for shard in iterator:
        verify_shard_file(prepared_dir / shard["path"], shard, dtype, check_hash=check_hashes)
    return index


def unigram_entropy_of_counts(counts: np.ndarray) -> dict:
    """Entropy of the empirical unigram distribution: the loss of the best context-free predictor."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("counts: expected at least one token")
    p = counts[counts > 0] / total
    nats = float(-(p * np.log(p)).sum())
    return {"nats_per_token": nats, "bits_per_token": nats / float(np.log(2.0)), "tokens": int(total)}


def unigram_entropy(prepared_dir: str | os.PathLike, split: str = "train", sources: list[str] | None = None) -> dict:
    """Unigram entropy (nats and bits per token) of the prepared tokens of ``split`` (all sources by default)."""
    prepared_dir = Path(prepared_dir)
    index = read_index(prepared_dir)
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    dtype = np.dtype(index["dtype"])
    vocab = int(index["tokenizer"]["vocab_size"])
    counts = np.zeros(vocab, dtype=np.int64)
    for name, src in index["sources"].items():
        if sources is not None and name not in sources:
            continue
        for shard in src["splits"][split]["shards"]:
            counts += np.bincount(open_shard(prepared_dir, shard, dtype), minlength=vocab)[:vocab]
    return unigram_entropy_of_counts(counts)


__all__ = ["INDEX_FORMAT", "ShardWriter", "read_index", "open_shard", "verify", "verify_shard_file",
           "unigram_entropy", "unigram_entropy_of_counts", "token_dtype", "SPLITS"]
