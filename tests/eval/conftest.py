import itertools
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
