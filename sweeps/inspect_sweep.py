"""Print a sweep's table and rebuild its results files (results.csv/.parquet, plots, summary.md, best/).

python sweeps/inspect_sweep.py sweep_results/lr_sweep [--top 10] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lm import cli
from sweeps.layout import DEFAULT_STORAGE
from sweeps.storage import RESULT_NAMES, Storage, mirror


def build_parser() -> cli.ArgumentParser:
    ap = cli.ArgumentParser(prog="python sweeps/inspect_sweep.py", description=__doc__.split("\n")[0])
    ap.add_argument("path", help="the sweep's experiment directory (STORAGE/NAME: a local path or a URI)")
    ap.add_argument("--top", type=int, default=20, help="rows of the table")
    ap.add_argument("--no-write", action="store_true", help="only print, do not rewrite the files")
    return ap


def _command(args: argparse.Namespace) -> int:
    from sweeps.results import load_sweep, print_table, write_results

    sweep = load_sweep(args.path)
    print_table(sweep, top=args.top)
    if not args.no_write:
        remote = Storage.at(args.path)
        out = remote.local_path or Path.cwd() / DEFAULT_STORAGE / remote.name  # a remote sweep: a local copy
        write_results(sweep, out)
        mirror(out, remote, RESULT_NAMES)
        where = f"{remote.show()} (local copy: {out})" if remote.local_path is None else str(out)
        print(f"rebuilt summary.md, results.csv, results.parquet, history.parquet, plots/, best/ in {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`lm-sweep-inspect`: exit 0, or 2 with one `error:` line when PATH is not a sweep directory."""
    return cli.run(_command, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
