"""``python -m hope.report <run_dirs or eval JSONs...> [--out reports/results.md] [--plots reports/plots]``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hope.report.render import collect, render_markdown, render_plots


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hope.report")
    ap.add_argument("run_dirs", nargs="+", help="run folders (reads <run>/eval/*.json) or eval JSON files")
    ap.add_argument("--out", default="reports/results.md")
    ap.add_argument("--plots", default="reports/plots")
    a = ap.parse_args(argv)
    try:
        found = collect(a.run_dirs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = render_markdown(found)
    plots = render_plots(found, a.plots)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md += "\n" + "\n".join(f"![{p.stem}]({os.path.relpath(p, out.parent)})"
                           for p in plots) + "\n"
    out.write_text(md)
    print(f"wrote {out} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
