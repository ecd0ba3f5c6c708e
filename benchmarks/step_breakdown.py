"""Where a decode step's time goes: forwards vs everything else, from saved decision logs, and the
draft/target decode-forward times at batch 1 on this machine.

    python benchmarks/policies_closed_loop.py --save-decisions runs/decisions-builtin ...
    python benchmarks/step_breakdown.py runs/decisions-builtin

Time outside the forwards = step time - draft time - verify time (policy planning, sampling,
detokenization, bookkeeping), median per batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def overhead_by_batch(path: Path) -> dict[int, tuple[float, int]]:
    by: dict[int, list[float]] = {}
    for line in path.read_text().splitlines():
        o = json.loads(line).get("outcome")
        if o:
            outside = o["step_time"] - o["draft_time"] - o["verify_time"]
            by.setdefault(len(o["request_ids"]), []).append(outside)
    return {b: (statistics.median(v) * 1e3, len(v)) for b, v in sorted(by.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("decisions", type=Path, help="directory written by --save-decisions")
    ap.add_argument("--min-steps", type=int, default=20)
    a = ap.parse_args(argv)
    for f in sorted(a.decisions.glob("*.jsonl")):
        cells = [f"batch {b}: {ms:.2f} ms ({n} steps)" for b, (ms, n) in overhead_by_batch(f).items()
                 if n >= a.min_steps]
        print(f"{f.stem}: " + "; ".join(cells))
    from adaspec.llm import DEFAULT_PAIR
    from adaspec.train.card import step_time_ratio

    print("decode forward at batch 1:", step_time_ratio(DEFAULT_PAIR))
    return 0


if __name__ == "__main__":
    sys.exit(main())
