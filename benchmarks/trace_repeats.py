"""Repeats of one trace replay, side by side: mean and min-max per policy and level.

    adaspec bench sweep ... --output-dir runs/bench/code-r1   (same flags, same seed, again:)
    adaspec bench sweep ... --output-dir runs/bench/code-r2
    python benchmarks/trace_repeats.py runs/bench/code-r1 runs/bench/code-r2 --out docs/bench/code-repeats

(`adaspec bench sweep --repeats N` does both, with the policy order rotated between repeats.) The
report itself is `adaspec.bench.repeats`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaspec.bench.repeats import load, render, write


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    a = ap.parse_args(argv)
    print(write(a.dirs, a.out) if a.out else render(a.dirs, load(a.dirs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
