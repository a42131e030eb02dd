"""``python -m hope.models``: parameter count of every preset (built on the meta device: no memory)."""
from __future__ import annotations

import torch

from hope.models import build_model, preset, preset_names


def main() -> None:
    for name in preset_names():
        cfg = preset(name)
        with torch.device("meta"):
            n = build_model(cfg).num_parameters()
        print(f"{name:20s} {cfg.n_layers:3d} x {cfg.d_model:5d}  vocab {cfg.vocab_size:6d}  {n / 1e6:9.2f}M")


if __name__ == "__main__":
    main()
