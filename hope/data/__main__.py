"""CLI: ``python -m hope.data prepare <manifest> [key=value ...]`` and ``python -m hope.data verify <dir>``."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hope.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="train the tokenizer, tokenise sources, write shards + stats")
    prep.add_argument("manifest", help="a packaged manifest name (embedded, embedded_pilot, continual_embedded) or a YAML file")
    prep.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys), e.g. tokenizer.vocab_size=32000")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    ver = commands.add_parser("verify", help="check tokenizer checksum and every shard's size and sha256")
    ver.add_argument("prepared_dir")
    ver.add_argument("--tokenizer-sha256", default=None, help="also require this tokenizer sha256")
    ent = commands.add_parser("entropy", help="unigram entropy of the prepared tokens")
    ent.add_argument("prepared_dir")
    ent.add_argument("--split", default="train")
    args = parser.parse_args(argv)

    from hope.data.sources import DataIntegrityError
    try:
        if args.command == "prepare":
            from hope.data.prepare import prepare
            prepared = prepare(args.manifest, args.overrides, progress=not args.quiet)
            stats = json.loads((prepared.dir / "stats.json").read_text())
            print(json.dumps({"out_dir": str(prepared.dir), "tokenizer_sha256": prepared.tokenizer_sha256,
                              "train_unigram_entropy": stats["train_unigram_entropy"],
                              "timings_seconds": stats["timings_seconds"]}, indent=2))
        elif args.command == "verify":
            from hope.data.shards import verify
            index = verify(args.prepared_dir, args.tokenizer_sha256, progress=True)
            shards = sum(len(split["shards"]) for src in index["sources"].values() for split in src["splits"].values())
            print(f"OK: {args.prepared_dir}: tokenizer sha256 {index['tokenizer']['sha256']}, {shards} shards verified")
        elif args.command == "entropy":
            from hope.data.shards import unigram_entropy
            print(json.dumps(unigram_entropy(args.prepared_dir, args.split), indent=2))
    except (DataIntegrityError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
