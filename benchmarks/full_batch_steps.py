"""What each policy's decode steps at one batch size did, and what adaspec's plan predicted there.

    python benchmarks/full_batch_steps.py --batch 16 --telemetry runs/s12/cl-tel \\
        --decisions runs/s12/cl-dec/adaspec-uniform.jsonl runs/s12/cl-dec/adaspec.jsonl

From the engine telemetry a closed-loop run exports (`policies_closed_loop.py --export-telemetry`),
per policy, the decode steps that ran exactly `--batch` requests (at concurrency c, the full-batch
steps): draft forwards, verified and accepted tokens a request, draft / verify / step time, time
outside the forwards, and tokens emitted per ms of step (in-step time only: `observe` runs after the
step is timed). From decision logs (`--save-decisions`), the plan's candidates "depth h for all that
may draft" at that batch size: mean predicted tokens, step time and their ratio, per depth. Side by
side they show whether the plan's efficiency curve over depths has the shape the static policies
realise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def step_rows(path: Path, batch: int) -> dict | None:
    """Means over the telemetry file's decode steps of exactly `batch` requests."""
    steps = [r for r in map(json.loads, path.read_text().splitlines())
             if r["kind"] == "decode" and r["batch_size"] == batch]
    if not steps:
        return None

    def mean(f) -> float:
        return statistics.fmean(f(r) for r in steps)

    return {"steps": len(steps), "draft_forwards": mean(lambda r: r["draft_steps"]),
            "verified_per_request": mean(lambda r: sum(r["drafted"]) / batch),
            "accepted_per_request": mean(lambda r: sum(r["accepted"]) / batch),
            "draft_ms": 1e3 * mean(lambda r: r["draft_time"]),
            "verify_ms": 1e3 * mean(lambda r: r["verify_time"]),
            "step_ms": 1e3 * mean(lambda r: r["step_time"]),
            "outside_ms": 1e3 * mean(lambda r: r["step_time"] - r["draft_time"] - r["verify_time"]),
            "tokens_per_ms": (sum(sum(r["accepted"]) + batch for r in steps)
                              / sum(1e3 * r["step_time"] for r in steps))}


def plan_curve(path: Path, batch: int) -> dict[int, dict]:
    """Per depth h: the plan's mean predicted tokens, step time (ms) and tokens per ms, over its
    plans at this batch size (the candidate logged for each depth: all that may draft)."""
    by_depth = defaultdict(list)
    for rec in map(json.loads, path.read_text().splitlines()):
        if len(rec["requests"]) != batch:
            continue
        for phase in rec["phases"]:
            if phase["phase"] == "plan" and isinstance(phase["choice"], dict):
                for c in phase["candidates"]:
                    by_depth[c["h"]].append((c["tokens"], 1e3 * c["time"]))
    return {h: {"plans": len(v), "tokens": statistics.fmean(t for t, _ in v),
                "time_ms": statistics.fmean(t for _, t in v),
                "tokens_per_ms": statistics.fmean(t / ms for t, ms in v)}
            for h, v in sorted(by_depth.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--telemetry", type=Path, required=True, help="folder of telemetry-*.jsonl / *.jsonl")
    ap.add_argument("--decisions", type=Path, nargs="*", default=[])
    a = ap.parse_args(argv)
    files = sorted(a.telemetry.glob("*.jsonl"))
    if not files:
        raise SystemExit(f"--telemetry {a.telemetry}: no .jsonl files")
    print(f"decode steps of exactly {a.batch} requests (means; tokens/ms of in-step time)")
    for f in files:
        row = step_rows(f, a.batch)
        if row:
            print(f"  {f.stem:22s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items()))
    for d in a.decisions:
        print(f"plan candidates at batch {a.batch}, {d.name}: depth -> tokens / time ms / tokens per ms")
        for h, c in plan_curve(d, a.batch).items():
            print(f"  h={h}: {c['tokens']:.1f} / {c['time_ms']:.2f} / {c['tokens_per_ms']:.3f} "
                  f"({c['plans']} plans)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
