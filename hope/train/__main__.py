"""python -m hope.train <config.yaml> [key=value ...]   (also under torchrun --nproc_per_node=N)"""
from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    from hope.train import RunError, load_config, train

    path, overrides = argv[0], argv[1:]
    try:
        cfg = load_config(path, overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = train(cfg)
    except (RunError, ValueError, OSError) as e:  # refusals, bad data / model keys, unwritable files: one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.get("run_dir") and summary.get("step") is not None:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
