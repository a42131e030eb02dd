"""A tiny randomly initialised Llama-style causal LM and a byte-level BPE tokenizer, built in the test session
and saved to a folder as from_pretrained reads it (no hub download)."""
from pathlib import Path

import pytest

TEXT = Path(__file__).resolve().parents[2] / "README.md"  # real text shipped with the checkout


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory):
    """A saved tiny Llama (2 layers, hidden 32) with its own tokenizer (byte-level BPE, 300 pieces)."""
    pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXT.read_text().splitlines(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tok))).save_pretrained(folder)
    return folder
