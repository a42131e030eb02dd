"""Continual learning (E3): train sequentially on segments, evaluate every segment after each stage.

Metrics over the loss matrix L[i][j] = validation loss on segment j after training stage i (lower is better):
forgetting_j = final - best over stages i >= j (how much was lost, >= 0), i.e. "best - final" on the
accuracy scale; backward transfer BWT = mean_{j < S-1} (L[j][j] - L[S-1][j]) (positive: later stages helped
earlier segments, Lopez-Paz & Ranzato 2017 with loss in place of accuracy, sign flipped so higher is better).
"""
from __future__ import annotations

import math

import torch


def continual_metrics(loss_matrix) -> dict:
    """Forgetting per segment, average final loss and backward transfer from a square loss matrix."""
    L = [list(map(float, row)) for row in loss_matrix]
    S = len(L)
    if S == 0 or any(len(r) != S for r in L):
        raise ValueError(f"loss_matrix must be square (stages x segments), got shape {[len(r) for r in L]}")
    if not all(math.isfinite(x) for r in L for x in r):
        raise ValueError("loss_matrix must be finite")
    final = L[-1]
    forgetting = [final[j] - min(L[i][j] for i in range(j, S)) for j in range(S)]
    bwt = sum(L[j][j] - final[j] for j in range(S - 1)) / (S - 1) if S > 1 else 0.0
    return {"forgetting": forgetting, "mean_forgetting": sum(forgetting[:-1]) / max(S - 1, 1),
            "avg_final_loss": sum(final) / S, "backward_transfer": bwt}


@torch.no_grad()
def segment_loss(model, sequences: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss over [N, T] sequences."""
    model.eval()
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    for i in range(0, sequences.shape[0], batch_size):
        x = sequences[i:i + batch_size].to(dev)
        labels = torch.full_like(x, -100)
        labels[:, :-1] = x[:, 1:]
        out = model(x, labels=labels)
        n = int((labels != -100).sum())
        total += float(out.loss) * n
        count += n
    return total / count


def train_sequentially(model, train_segments: list[torch.Tensor], val_segments: list[torch.Tensor], *,
                       steps_per_segment: int, batch_size: int, train_cfg, seed: int = 0, eval_batch_size: int = 8,
                       progress: bool = True) -> dict:
    """One training run that sees the segments in order, with the trainer's step recipe from ``train_cfg``
    (a hope.train TrainConfig): hope.optim optimizers, warmup + cosine lr over all stages, teach-signal
    schedule, per-level gradient clipping (memory vs other weights), non-finite steps skipped, and in
    ``parallel`` mode the inner (CMS) updates after each step. Same steps and batch for every arch."""
    from hope.optim import build_optimizers, lr_at, memory_parameter_names, teach_scale_at

    if len(train_segments) != len(val_segments) or not train_segments:
        raise ValueError("train_segments and val_segments must be non-empty and equally long")
    if steps_per_segment < 1 or batch_size < 1:
        raise ValueError(f"steps_per_segment and batch_size must be >= 1, got {steps_per_segment}, {batch_size}")
    oc, tc = train_cfg.optim.outer, train_cfg.optim.teach
    dev = next(model.parameters()).device
    opts = build_optimizers(model, oc, dev)
    mem_names = memory_parameter_names(model)
    total = steps_per_segment * len(train_segments)
    g = torch.Generator().manual_seed(seed)
    matrix, skipped, step = [], 0, 0
    for stage, data in enumerate(train_segments):
        model.train()
        for _ in range(steps_per_segment):
            lr_mult = lr_at(step, total, oc.warmup_steps, oc.min_lr_ratio)
            teach = teach_scale_at(step, total, tc.scale, tc.warmup_steps, tc.decay_to)
            for o in opts:
                for grp in o.param_groups:
                    grp["lr"] = grp["base_lr"] * lr_mult
            step += 1
            idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
            x = data[idx].to(dev)
            labels = torch.full_like(x, -100)
            labels[:, :-1] = x[:, 1:]
            out = model(x, labels=labels, teach_scale=teach)
            for o in opts:
                o.zero_grad(set_to_none=True)
            if not torch.isfinite(out.loss):
                skipped += 1
                continue
            out.loss.backward()
            mem = [p for n, p in model.named_parameters() if p.grad is not None and n in mem_names]
            other = [p for n, p in model.named_parameters() if p.grad is not None and n not in mem_names]
            norms = [float(torch.nn.utils.clip_grad_norm_(ps, lim if lim > 0 else float("inf")))
                     for ps, lim in ((other, train_cfg.optim.clip_outer), (mem, train_cfg.optim.clip_memory)) if ps]
            if not all(math.isfinite(n) for n in norms):
                skipped += 1
                continue
            for o in opts:
                o.step()
        row = [segment_loss(model, v, eval_batch_size) for v in val_segments]
        matrix.append(row)
        if progress:
            print(f"{model.config.arch} stage {stage}: " + " ".join(f"{x:.3f}" for x in row), flush=True)
    return {"loss_matrix": matrix, "skipped_steps": skipped, **continual_metrics(matrix)}
