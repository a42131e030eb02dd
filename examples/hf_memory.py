"""HOPE memory on a frozen Hugging Face causal LM, trained with a plain PyTorch loop: only the memory blocks
learn; before training the wrapped model's logits are the base's.

    python examples/hf_memory.py                                          # tiny random Llama, byte tokens
    python examples/hf_memory.py --model HuggingFaceTB/SmolLM2-135M       # a pretrained base and its tokenizer
"""
import argparse

import torch

from hope.data import embedded_corpus_dir
from hope.integrations.hf import HopeMemoryLM

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None, help="a Hugging Face causal LM (default: a tiny random Llama)")
parser.add_argument("--steps", type=int, default=100)
args = parser.parse_args()
torch.manual_seed(0)
text = (embedded_corpus_dir() / "shakespeare" / "sonnets.txt").read_text()
if args.model:  # memory after the last decoder layer of a pretrained model
    from transformers import AutoTokenizer

    model = HopeMemoryLM.from_pretrained(args.model, memory_layers=[-1])
    ids = torch.tensor(AutoTokenizer.from_pretrained(args.model)(text)["input_ids"])
else:  # offline: a tiny random Llama over bytes
    from transformers import LlamaConfig, LlamaForCausalLM

    from hope.integrations.hf import HFMemoryConfig

    base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = HopeMemoryLM(base, HFMemoryConfig(hf="", memory_layers=(1,), mem_chunk_size=32, gen_chunk_size=16,
                                              cms_periods=(16,)))
    ids = torch.tensor(list(text.encode()))
opt = torch.optim.AdamW(model.memory_parameters(), lr=3e-3)  # the base is frozen
losses = []
for step in range(args.steps):
    starts = torch.randint(0, len(ids) - 129, (8,))
    batch = torch.stack([ids[s:s + 129] for s in starts])
    loss = model(batch[:, :-1], labels=batch[:, 1:]).loss  # labels already shifted, as in hope.models
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step % 20 == 0 or step == args.steps - 1:
        print(f"step {step:4d}  loss {loss.item():.3f}")
print(f"loss first {losses[0]:.3f} last {losses[-1]:.3f}; trainable {model.num_parameters(trainable_only=True):,} "
      f"of {model.num_parameters():,} parameters")
