"""Print a sweep's table and rebuild its results files (results.csv/.parquet, plots, summary.md, best/).

python sweeps/inspect_sweep.py sweep_results/lr_sweep [--top 10] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", help="the sweep's experiment directory (STORAGE/NAME)")
    ap.add_argument("--top", type=int, default=20, help="rows of the table")
    ap.add_argument("--no-write", action="store_true", help="only print, do not rewrite the files")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    from sweeps.results import load_sweep, print_table, write_results

    path = Path(args.path)
    if not (path / "sweep_meta.json").is_file():
        print(f"error: {path}: not a sweep directory (no sweep_meta.json)", file=sys.stderr)
        return 2
    sweep = load_sweep(path)
    print_table(sweep, top=args.top)
    if not args.no_write:
        write_results(sweep, path)
        print(f"rebuilt {path}/summary.md, results.csv, results.parquet, history.parquet, plots/, best/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
