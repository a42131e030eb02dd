"""A plain PyTorch loop training a small byte-level language model built from hope's layers: self-modifying
Titans (NL sec. 8) followed by a CMS level (NL sec. 7) in each block, on Shakespeare's sonnets.

    python examples/plain_pytorch.py [--steps 200]
"""
import argparse

import torch
from torch import nn

from hope import CMSChain, SelfModifyingTitans
from hope.data import embedded_corpus_dir


class TinyHope(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norms = nn.ModuleList(nn.RMSNorm(dim) for _ in range(layers))
        self.memories = nn.ModuleList(SelfModifyingTitans(dim, heads, mem_chunk_size=32, gen_chunk_size=16)
                                      for _ in range(layers))
        self.cms = nn.ModuleList(CMSChain(dim, 2 * dim, periods=(16,)) for _ in range(layers))
        self.head = nn.Sequential(nn.RMSNorm(dim), nn.Linear(dim, vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for norm, memory, cms in zip(self.norms, self.memories, self.cms):
            y, _state, _metrics = memory(norm(x))  # the memory learns in context as it reads
            x, _, _ = cms(x + y)
        return self.head(x)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    text = (embedded_corpus_dir() / "shakespeare" / "sonnets.txt").read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)
    model = TinyHope()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - 129, (8,))
        batch = torch.stack([data[s:s + 129] for s in starts])
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    print(f"loss first {losses[0]:.3f} last {losses[-1]:.3f}")
