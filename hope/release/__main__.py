"""python -m hope.release <run_dir>          build and verify <run_dir>/release/
python -m hope.release --verify <release_dir>"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    from hope.release import release, verify

    try:
        if argv[0] == "--verify" and len(argv) == 2:
            meta = verify(argv[1])
            print(f"ok: {argv[1]} ({len(meta['files_sha256'])} files verified)")
        elif len(argv) == 1:
            out = release(argv[0])
            print(f"release written and verified: {out}")
        else:
            print(__doc__.strip(), file=sys.stderr)
            return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
