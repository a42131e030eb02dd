"""Tokenizers: SentencePiece (trained here: training, loading and a checksum of the model file) and, for a
Hugging Face base model, its own tokenizer (:class:`HFTokenizer`, ``tokenizer.hf`` in a manifest).

Interface (docs/architecture.md, "Tokenizer"):

    tok = Tokenizer.load(path)               # a SentencePiece .model file; verifies it loads
    tok.encode(text) -> list[int]; tok.decode(ids) -> str
    tok.vocab_size; tok.bos_id; tok.eos_id; tok.pad_id; tok.unk_id; tok.newline_id
    tok.sha256                               # of the .model file bytes
    train_tokenizer(text_files, out_prefix, vocab_size, model_type="unigram") -> Tokenizer

Special ids are fixed for every tokenizer trained here: pad=0, unk=1, bos=2, eos=3, and "\n" is a
user-defined piece (id 4) so multi-line text round-trips exactly. Normalisation is the identity and
whitespace is kept, so ``decode(encode(text)) == text`` for any text; characters the model never saw
fall back to UTF-8 byte pieces instead of <unk>.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from hope.data.cache import sha256_bytes, sha256_file

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NEWLINE_PIECE = "\n"
MODEL_TYPES = ("unigram", "bpe", "char", "word")


def _checked_texts(texts: Sequence[str]) -> list[str]:
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}]: expected str, got {type(text).__name__}")
    return texts


class TokenizerChecksumError(ValueError):
    """The tokenizer file's sha256 differs from the one recorded (checkpoint or prepared data)."""


class Tokenizer:
    """A loaded SentencePiece model plus the sha256 of its file."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path, sha256: str):
        self._sp = processor
        self.path = path
        self.sha256 = sha256

    @classmethod
    def load(cls, path: str | os.PathLike, expected_sha256: str | None = None) -> "Tokenizer":
        """Load a .model file; with ``expected_sha256``, raise TokenizerChecksumError naming the file on mismatch."""
        path = Path(path)
        if path.is_dir():
            candidates = sorted(path.glob("*.model"))
            if len(candidates) != 1:
                raise ValueError(f"path: expected a SentencePiece .model file or a folder holding exactly one, "
                                 f"got folder {path} with {len(candidates)} .model files")
            path = candidates[0]
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        digest = sha256_file(path)
        if expected_sha256 is not None and digest != expected_sha256:
            raise TokenizerChecksumError(
                f"tokenizer checksum mismatch for {path}: sha256 {digest}, expected {expected_sha256}")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError depending on version
            raise ValueError(f"tokenizer file {path} is not a loadable SentencePiece model: {exc}") from exc
        return cls(processor, path, digest)

    # --- ids -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    @property
    def newline_id(self) -> int:
        """Id of the "\\n" piece (-1 for a model trained elsewhere without it)."""
        piece_id = int(self._sp.PieceToId(NEWLINE_PIECE))
        return piece_id if piece_id != self.unk_id else -1

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    # --- text <-> ids --------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids = list(self._sp.EncodeAsIds(text))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     num_threads: int = 2) -> list[list[int]]:
        """Encode many strings in one call (SentencePiece threads the batch)."""
        texts = _checked_texts(texts)
        batch = self._sp.Encode(texts, out_type=int, add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)
        return [list(ids) for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        if hasattr(ids, "tolist"):  # torch tensors / numpy arrays
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        # pad carries no text; SentencePiece would render it as an empty piece anyway
        return self._sp.DecodeIds([i for i in ids if i != self.pad_id])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"


HF_TOKENIZER_DIR = "tokenizer_hf"  # a prepared folder's copy of a Hugging Face tokenizer (save_pretrained)


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """sha256 of a tokenizer: of a SentencePiece ``.model`` file's bytes, or, for a Hugging Face tokenizer
    folder, of its ``<file name> <sha256>`` lines (sorted), so any changed, added or removed file changes it."""
    path = Path(path)
    if path.is_dir():
        lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in sorted(path.iterdir()) if p.is_file())
        return sha256_bytes(lines.encode())
    return sha256_file(path)


class HFTokenizer:
    """A Hugging Face (``transformers``) tokenizer behind :class:`Tokenizer`'s interface, for data prepared
    for a Hugging Face base model. ``path`` is a folder written by ``save_pretrained``; ``sha256`` is
    :func:`tokenizer_sha256` of it. Ids a tokenizer does not define (bos, pad, unk, newline) are -1."""

    def __init__(self, hf_tokenizer, path: Path, sha256: str):
        self._tok = hf_tokenizer
        self.path = path
        self.sha256 = sha256
        if hf_tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {path}: has no eos token (needed to end every record)")

    @staticmethod
    def is_hf_folder(path: str | os.PathLike) -> bool:
        path = Path(path)
        return path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))

    @classmethod
    def load(cls, path: str | os.PathLike, expected_sha256: str | None = None) -> "HFTokenizer":
        """Load a saved tokenizer folder; with ``expected_sha256``, raise TokenizerChecksumError on mismatch."""
        path = Path(path)
        if not cls.is_hf_folder(path):
            raise FileNotFoundError(f"tokenizer folder not found (no tokenizer.json / tokenizer_config.json): {path}")
        digest = tokenizer_sha256(path)
        if expected_sha256 is not None and digest != expected_sha256:
            raise TokenizerChecksumError(
                f"tokenizer checksum mismatch for {path}: sha256 {digest}, expected {expected_sha256}")
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)), path, digest)

    @classmethod
    def save_from_pretrained(cls, name: str, out_dir: str | os.PathLike, revision: str | None = None) -> "HFTokenizer":
        """``AutoTokenizer.from_pretrained(name, revision)`` saved into ``out_dir`` (written beside it, then
        renamed into place), loaded back from there."""
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ImportError("tokenizer.hf needs the `transformers` package: pip install 'hope[hf]'") from exc
        out_dir = Path(out_dir)
        staging = out_dir.with_name(f".{out_dir.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)
        AutoTokenizer.from_pretrained(name, revision=revision).save_pretrained(str(staging))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
        return cls.load(out_dir)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def bos_id(self) -> int:
        return -1 if self._tok.bos_token_id is None else int(self._tok.bos_token_id)

    @property
    def eos_id(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def pad_id(self) -> int:
        return -1 if self._tok.pad_token_id is None else int(self._tok.pad_token_id)

    @property
    def unk_id(self) -> int:
        return -1 if self._tok.unk_token_id is None else int(self._tok.unk_token_id)

    @property
    def newline_id(self) -> int:
        ids = self._tok.encode("\n", add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else -1

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos)[0]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     num_threads: int = 2) -> list[list[int]]:
        """Encode many strings (the fast tokenizers batch in Rust; ``num_threads`` is theirs to choose)."""
        texts = _checked_texts(texts)
        if add_bos and self.bos_id < 0:
            raise ValueError(f"add_bos: tokenizer {self.path} has no bos token")
        batch = self._tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        head, tail = [self.bos_id] if add_bos else [], [self.eos_id] if add_eos else []
        return [head + list(ids) + tail for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"


def load_tokenizer(path: str | os.PathLike, expected_sha256: str | None = None) -> "Tokenizer | HFTokenizer":
    """A SentencePiece ``.model`` (or a folder holding one) as :class:`Tokenizer`, a Hugging Face tokenizer
    folder as :class:`HFTokenizer`; ``expected_sha256`` is checked either way."""
    if HFTokenizer.is_hf_folder(path):
        return HFTokenizer.load(path, expected_sha256)
    return Tokenizer.load(path, expected_sha256)


def train_tokenizer(text_files: Sequence[str | os.PathLike], out_prefix: str | os.PathLike, vocab_size: int,
                    model_type: str = "unigram", *, input_sentence_size: int = 0, seed: int = 0,
                    character_coverage: float = 1.0, num_threads: int = 2, max_sentence_length: int = 16384,
                    byte_fallback: bool = True, hard_vocab_limit: bool = True) -> Tokenizer:
    """Train a SentencePiece model on the lines of ``text_files``; writes ``<out_prefix>.model``/``.vocab``
    and ``<out_prefix>.json`` (sha256, training arguments, library version, seconds taken).

    ``input_sentence_size`` > 0 samples that many lines for training (the speed knob for large corpora);
    ``seed`` fixes that sample. ``hard_vocab_limit=False`` lets a small corpus end below ``vocab_size``
    (read the result's ``vocab_size``); with True a corpus too small for the vocabulary raises ValueError.
    """
    if isinstance(text_files, (str, os.PathLike)):
        text_files = [text_files]
    files = [Path(f) for f in text_files]
    if not files:
        raise ValueError("text_files: expected at least one text file, got none")
    for f in files:
        if not f.is_file():
            raise ValueError(f"text_files: {f} is not a file")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 16:
        raise ValueError(f"vocab_size: expected an int >= 16, got {vocab_size!r}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {MODEL_TYPES}, got {model_type!r}")
    if input_sentence_size < 0:
        raise ValueError(f"input_sentence_size: expected >= 0, got {input_sentence_size}")
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)

    args = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=[NEWLINE_PIECE],
        # identity normalisation + kept whitespace: decode(encode(x)) == x, indentation survives
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        byte_fallback=byte_fallback,
        hard_vocab_limit=bool(hard_vocab_limit),
        minloglevel=2,
    )
    # train into a temp folder, then move: a killed run never leaves a half-written .model behind
    start = time.perf_counter()
    spm.set_random_generator_seed(int(seed))
    # a fixed staging folder (not a random temp name): the .model embeds its model_prefix, so the same
    # inputs and settings give byte-identical files and the same sha256
    staging = out_prefix.parent / f".{out_prefix.name}.training"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        tmp_prefix = staging / out_prefix.name
        try:
            spm.SentencePieceTrainer.Train(input=[str(f) for f in files], model_prefix=str(tmp_prefix), **args)
        except RuntimeError as exc:
            if "Vocabulary size" in str(exc):  # corpus too small for the requested vocabulary
                raise ValueError(f"vocab_size: {vocab_size} is too large for this training text ({exc}); lower "
                                 f"it or set hard_vocab_limit=False") from exc
            raise
        for suffix in (".model", ".vocab"):
            os.replace(str(tmp_prefix) + suffix, str(out_prefix) + suffix)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    model_path = Path(str(out_prefix) + ".model")
    tok = Tokenizer.load(model_path)
    record = {
        "model": model_path.name,
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "seed": int(seed),
        "sentencepiece_version": spm.__version__,
        "training_command": {"function": "sentencepiece.SentencePieceTrainer.Train",
                             "input": [str(f) for f in files], "model_prefix": str(out_prefix), **args},
        "train_seconds": round(seconds, 3),
    }
    Path(str(out_prefix) + ".json").write_text(json.dumps(record, indent=2) + "\n")
    return tok


__all__ = ["Tokenizer", "HFTokenizer", "TokenizerChecksumError", "train_tokenizer", "sha256_file", "load_tokenizer",
           "tokenizer_sha256", "HF_TOKENIZER_DIR",
           "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID"]
