"""Target and draft forward times on the embedded pair at decode and verification shapes.

    python benchmarks/forward_times.py --out runs/fwd-new
    (another checkout, alternating: PYTHONPATH=OLD python OLD/benchmarks/forward_times.py --out runs/fwd-old)

Per model, one forward of B rows of T tokens each at a context (the rows on slots 0..B-1), timed by
`profiler.time_forwards` (the start-up profile's own timing) once per point in a shuffled order,
`--repeats` passes, the median per point: a before/after comparison of a forward change runs this
in both checkouts, alternating processes, and compares point by point (session 14's folded
attention, `docs/policies.md`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys

from adaspec.bench import closed_loop
from adaspec.llm import build_engine
from adaspec.spec.profiler import time_forwards


def measure(runner, points: list[tuple[int, int, int]], all_logits: bool, repeats: int) -> dict:
    """Median seconds per (batch, tokens a row, context), over `repeats` shuffled passes."""
    times = {p: [] for p in points}
    for rep in range(repeats):
        order = list(points)
        random.Random(rep).shuffle(order)
        for s in time_forwards(runner, order, all_logits, 1e9, reps=1):
            times[tuple(s[:3])].append(s[3])
    return {p: statistics.median(v) for p, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    closed_loop.add_pair_args(ap)
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--verify-tokens", default="1,2,4,6", help="target: tokens a row")
    ap.add_argument("--draft-tokens", default="1,2", help="draft: tokens a row")
    ap.add_argument("--contexts", default="128,512")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", help="write OUT.json")
    a = ap.parse_args(argv)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    batches, contexts = ints(a.batches), ints(a.contexts)
    engine = build_engine(a.model, a.draft_model, policy="none", max_num_seqs=max(batches))
    out = {}
    for name, runner, widths, all_logits in (("target", engine.target, ints(a.verify_tokens), True),
                                             ("draft", engine.draft, ints(a.draft_tokens), False)):
        points = [(b, t, c) for b in batches for t in widths for c in contexts]
        for (b, t, c), sec in sorted(measure(runner, points, all_logits, a.repeats).items()):
            out[f"{name} b={b} t={t} ctx={c}"] = sec
            print(f"{name:6s} batch {b:2d} tokens {t} context {c:4d}: {1e3 * sec:7.2f} ms")
    if a.out:
        args = sys.argv[1:] if argv is None else argv
        with open(f"{a.out}.json", "w") as f:
            json.dump({"command": "python benchmarks/forward_times.py " + " ".join(args), "ms": {
                k: round(1e3 * v, 4) for k, v in out.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
