"""Parameter groups: memory/CMS vs other slow weights (per-level clipping), and the Muon mix split."""
from __future__ import annotations

import torch
from torch import nn

# memory and CMS-level parameters: clipped as their own level (optim.clip_memory). The same groups for every
# architecture: the memories' learnable initial weights (mem_w*, gen_w*) and the CMS levels; the projections and
# gates that feed a memory (TITAN's memory.qkv / gates / out, HOPE's titans.inp / gate_readout / out) are outer
_MEMORY_KEYS = ("cms.", "mem_w", "gen_w")


def memory_parameter_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and any(k in n for k in _MEMORY_KEYS)}


def split_parameters(model: nn.Module) -> tuple[list, list]:
    """(muon_params, adamw_params): Muon takes 2-D hidden matrices only; embeddings, norms, gates, conv,
    and every non-2-D tensor go to AdamW (torch.optim.Muon accepts 2-D parameters only)."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_hidden_matrix = (p.ndim == 2 and "embed" not in name and "norm" not in name and "gate" not in name
                            and "conv" not in name and "head" not in name)
        (muon if is_hidden_matrix else adamw).append(p)
    return muon, adamw


def _decay_groups(params, weight_decay):
    # no weight decay on vectors (norm gains, biases)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return groups


def build_optimizers(model: nn.Module, cfg, device: torch.device) -> list[torch.optim.Optimizer]:
    """Outer optimizers for ``cfg`` (an OuterOptimConfig); each group stores its peak lr in ``base_lr``."""
    fused_opt = str(cfg.fused).lower()
    fused = (device.type == "cuda") if fused_opt == "auto" else fused_opt == "true"
    adam_kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if fused:
        adam_kw["fused"] = True
    if cfg.type == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        opts = [torch.optim.AdamW(_decay_groups(params, cfg.weight_decay), **adam_kw)]
    elif cfg.type == "muon_mix":
        muon_params, adam_params = split_parameters(model)
        opts = []
        if muon_params:
            opts.append(torch.optim.Muon(muon_params, lr=cfg.muon_lr, weight_decay=cfg.weight_decay))
        opts.append(torch.optim.AdamW(_decay_groups(adam_params, cfg.weight_decay), **adam_kw))
    else:
        raise ValueError(f"optim.outer.type: expected 'adamw' or 'muon_mix', got {cfg.type!r}")
    for opt in opts:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return opts
