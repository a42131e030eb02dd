"""hope.data: SentencePiece tokenizer, corpus preparation into token shards, and the streaming loader.

    python -m hope.data prepare embedded [key=value ...]      (a packaged manifest name, or a YAML file)
    python -m hope.data verify data/prepared/embedded

    from hope.data import prepare, verify, build_loader, PreparedData, Tokenizer, unigram_entropy
See docs/data_pipeline.md.
"""
from hope.data.tokenizer import Tokenizer, TokenizerChecksumError, sha256_file, train_tokenizer
from hope.data.sources import DataIntegrityError, SourceSpec, embedded_corpus_dir, fetch_embedded_corpus
from hope.data.shards import read_index, unigram_entropy, verify
from hope.data.prepare import Manifest, PreparedData, load_manifest, prepare
from hope.data.loader import TokenDataset, TokenLoader, build_loader, derive_seed, worker_init_fn

__all__ = ["Tokenizer", "TokenizerChecksumError", "sha256_file", "train_tokenizer", "DataIntegrityError",
           "SourceSpec", "embedded_corpus_dir", "fetch_embedded_corpus", "read_index", "unigram_entropy", "verify",
           "Manifest", "PreparedData", "load_manifest", "prepare", "TokenDataset", "TokenLoader", "build_loader",
           "derive_seed", "worker_init_fn"]
