"""Run under torchrun by the DDP tests: ``ddp_worker.py [--nan-loss=..] [--nan-params=..] [--nan-ranks=..] <config>
<out> [key=value ...]`` trains the real Trainer (with those faults: tests/train/faults.py), then each rank writes
what it saw and its weights."""
import hashlib
import json
import sys
from pathlib import Path

import torch

from hope.train import load_config
from tests.train.faults import FaultyTrainer, parse_fault_args


def main():
    faults, argv = parse_fault_args(sys.argv[1:])
    config, out = argv[0], Path(argv[1])
    cfg = load_config(config, argv[2:])
    trainer = FaultyTrainer(cfg, **faults)
    rank = trainer.info.rank
    first = trainer.prepared.build_loader("train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=rank,
                                          world_size=trainer.info.world_size)
    first_batch = next(first)["input_ids"]
    backend = trainer.info.backend
    trainer.train()
    digest = hashlib.sha256()
    for name, tensor in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    (out / f"rank{rank}.json").write_text(json.dumps({
        "params_sha256": digest.hexdigest(), "first_batch": first_batch[:, :8].tolist(), "backend": backend,
        "world_size": trainer.info.world_size, "finite": all(bool(torch.isfinite(p).all())
                                                              for p in trainer.model.parameters())}))


if __name__ == "__main__":
    main()
