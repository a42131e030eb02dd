"""Tiny configs for the model tests (2 CPU cores, seconds per test)."""
import torch

from hope.models import ModelConfig

TINY = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, ffn_hidden=48, chunk_size=8,
            window=8, mem_chunk_size=8, gen_chunk_size=4, cms_periods=(2, 4, 8), cms_levels=3, cms_hidden=40,
            memory_expansion=2)

ARCH_CONFIGS = {
    "transformer": dict(arch="transformer"),
    "titan-lmm": dict(arch="titan", titan_variant="lmm"),
    "titan-mag": dict(arch="titan", titan_variant="mag", persistent_tokens=2),
    "titan-linear-dgd": dict(arch="titan", titan_variant="lmm", memory="linear", rule="dgd"),
    "hope": dict(arch="hope"),
    "hope-dgd-noselfmod": dict(arch="hope", rule="dgd", selfmod=False, adaptive_q=False),
}


def tiny(name="hope", **overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **ARCH_CONFIGS[name], **overrides})


def batch(cfg, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels
