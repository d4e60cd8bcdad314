"""fixedcls-compare: one table (and curves) from the runs of one or more Hydra multiruns.

    fixedcls-compare multirun/2025-01-01/12-00-00 [more sweep or run directories] [--out DIR]
    fixedcls-compare --wandb ENTITY/PROJECT [--group GROUP] --out DIR

Writes comparison.csv, comparison.md and the plots into --out (default: the first DIR); the work is
`fixedcls.tracking.aggregate.compare`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..escaping import terminal
from ..tracking.aggregate import compare, load_dirs, load_wandb
from .cli import output_folder, run_command


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fixedcls-compare",
        description="Summarise Hydra multirun (or single run) directories of fixedcls-train: one row per group of "
                    "jobs that differ only by seed, mean ± std over seeds.")
    parser.add_argument("dirs", nargs="*", metavar="DIR", help="multirun sweep directories or run directories")
    parser.add_argument("--out", type=output_folder, help="where comparison.csv/.md and the plots go (default: the first DIR)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from the W&B API instead (online)")
    parser.add_argument("--group", help="with --wandb: only the runs of this W&B group")
    parser.add_argument("--by", action="append", default=[], metavar="KEY",
                        help="group by this override key (repeatable) instead of the keys the sweep varied")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="never group by this override key (repeatable); seed is always ignored")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    args = parser.parse_args(argv)
    if not args.dirs and not args.wandb:
        parser.error("give one or more DIRs, or --wandb ENTITY/PROJECT")
    code = run_command(lambda: _compare(args), prog="fixedcls-compare")
    if code:
        sys.exit(code)


def _compare(args) -> int:
    jobs, skipped = [], []
    if args.dirs:
        jobs, skipped = load_dirs(args.dirs)
    if args.wandb:
        more, more_skipped = load_wandb(args.wandb, args.group)
        jobs, skipped = jobs + more, skipped + more_skipped
    out = Path(args.out or (args.dirs[0] if args.dirs else "."))
    result = compare(jobs, skipped, out, by=args.by, ignore=args.ignore, plots=not args.no_plots,
                     sources=list(args.dirs) + ([f"wandb:{args.wandb}"] if args.wandb else []))
    print(result.table)
    if result.skipped:
        print(f"\nskipped {len(result.skipped)} job(s):")
        for directory, why in result.skipped:
            print(f"  {terminal(directory)}: {terminal(why)}")
    print(f"\n{sum(len(g) for g in result.groups.values())} job(s) in {len(result.groups)} group(s); "
          f"wrote {', '.join(str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p in result.files[:2])}"
          f"{f' and {len(result.files) - 2} plot(s)' if len(result.files) > 2 else ''} to {out}")
    return 0


if __name__ == "__main__":
    main()
