import contextlib
import itertools
import os
from pathlib import Path

import pytest
import torch

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpus" / "kjv.txt"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A real SentencePiece tokenizer trained on the first lines of the shared KJV corpus (vocab 512)."""
    from hope.data.tokenizer import train_tokenizer

    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("tok")
    text = d / "kjv_head.txt"
    with open(CORPUS, encoding="utf-8") as f:
        text.write_text("".join(itertools.islice(f, 3000)), encoding="utf-8")
    return train_tokenizer([text], d / "tok", vocab_size=512)


@pytest.fixture(scope="session")
def filler_text():
    with open(CORPUS, encoding="utf-8") as f:
        return "".join(itertools.islice(f, 400))


TINY_TRAIN_CONFIG = """name: tiny
seed: 0
steps: 2
batch_size: 2
seq_len: 32
segment_len: 16
eval_every: 0
ckpt_every: 2
threads: 2
model: {arch: transformer, d_model: 32, n_layers: 1, n_heads: 2, ffn_hidden: 64, max_seq_len: 32}
data: {manifest: data.yaml}
log: {wandb: disabled, progress: false, plot: false}
"""

# two small segments of the real corpus; out_dir is relative to the working directory, as a user's is
TINY_DATA_MANIFEST = """name: tiny
out_dir: prepared
seq_len: 32
val_fraction: 0.1
shard_sequences: 256
seed: 0
tokenizer: {vocab_size: 512, model_type: unigram}
sources:
  - {name: genesis, kind: text, paths: [genesis.txt], record: line}
  - {name: matthew, kind: text, paths: [matthew.txt], record: line}
"""


def write_tiny_project(folder: Path) -> Path:
    """A folder with a tiny train config (tiny.yaml), a data manifest (data.yaml) and its two text files."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "genesis.txt").write_text("".join(lines[:1200]), encoding="utf-8")
    (folder / "matthew.txt").write_text("".join(lines[23200:24400]), encoding="utf-8")
    (folder / "data.yaml").write_text(TINY_DATA_MANIFEST)
    (folder / "tiny.yaml").write_text(TINY_TRAIN_CONFIG)
    return folder


@contextlib.contextmanager
def working_directory(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield Path(path)
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A real 2-step training run of a tiny Transformer++ (the trainer, the real tokenizer and corpus), made
    in its own working directory with relative data and run paths, as a user's are. Returns the run folder."""
    from hope.train import load_config, train

    work = write_tiny_project(tmp_path_factory.mktemp("train_cwd"))
    with working_directory(work):
        summary = train(load_config("tiny.yaml", ["run_dir=runs/tiny"]))
    assert summary["step"] == 2
    return work / "runs" / "tiny"
