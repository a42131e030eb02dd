"""python -m hope.train <config> [key=value ...]   (also under torchrun --nproc_per_node=N)

<config> is a packaged config's name (pilot, smoke, titan_pilot, ...) or a YAML file.
  --list                 the packaged configs, one line each
  --dry-run              print the resolved config, parameter count, tokens per step, steps and total tokens;
                         touches no data and no network
  --json                 with --dry-run: the same as one JSON object
  --world-size N         with --dry-run: ranks to plan for (default: $WORLD_SIZE or 1)
"""
from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if "--list" in argv:
        from hope.configs import format_config_list

        print(format_config_list())
        return 0
    flags = {"--dry-run": False, "--json": False}
    world_size, rest = None, []
    it = iter(argv)
    for arg in it:
        if arg in flags:
            flags[arg] = True
        elif arg == "--world-size" or arg.startswith("--world-size="):
            raw = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if not raw.isdigit() or int(raw) < 1:
                print(f"error: --world-size: expected a positive int, got {raw!r}", file=sys.stderr)
                return 2
            world_size = int(raw)
        elif arg.startswith("--"):
            print(f"error: unknown option {arg!r} (see python -m hope.train --help)", file=sys.stderr)
            return 2
        else:
            rest.append(arg)
    if not rest:
        print("error: expected a config name or file (python -m hope.train --list)", file=sys.stderr)
        return 2
    from hope.train.config import load_config

    path, overrides = rest[0], rest[1:]
    try:
        cfg = load_config(path, overrides)
        if flags["--dry-run"]:
            from hope.configs.dry_run import format_plan, plan_run

            plan = plan_run(cfg, world_size)
            print(json.dumps(plan.to_dict(), indent=1) if flags["--json"] else format_plan(plan))
            return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from hope.train import RunError, train

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
