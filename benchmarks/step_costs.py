"""Where a speculating decode step's time goes, per policy, at given batch sizes.

    python benchmarks/policies_closed_loop.py --export-telemetry runs/telemetry-builtin ...
    python benchmarks/step_costs.py runs/telemetry-builtin --batch 16,32

Reads the per-policy telemetry JSONL the closed-loop benchmark exports. Per policy and batch size:
tokens per second over all decode steps of that batch size, and medians over the steps that
drafted: step time, draft forwards, verification, time outside the forwards, tokens emitted per
step, tokens verified per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def rows(path: Path, batch: int) -> dict | None:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    dec = [r for r in recs if r["kind"] == "decode" and r["batch_size"] == batch]
    if not dec:
        return None
    spec = [r for r in dec if sum(r["drafted"])]

    def med(f):
        return 1e3 * statistics.median(f(r) for r in spec) if spec else float("nan")

    emitted = sum(len(r["drafted"]) + sum(r["accepted"]) for r in dec)
    return {"steps": len(dec), "speculating": len(spec),
            "tok_per_s": emitted / sum(r["step_time"] for r in dec),
            "step_ms": med(lambda r: r["step_time"]), "draft_ms": med(lambda r: r["draft_time"]),
            "verify_ms": med(lambda r: r["verify_time"]),
            "outside_ms": med(lambda r: r["step_time"] - r["draft_time"] - r["verify_time"]),
            "tokens_per_step": statistics.fmean(len(r["drafted"]) + sum(r["accepted"]) for r in spec)
            if spec else float("nan"),
            "verified_per_row": statistics.fmean(sum(r["drafted"]) / len(r["drafted"]) for r in spec)
            if spec else float("nan")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("telemetry", type=Path, help="directory of <policy>.jsonl files")
    ap.add_argument("--batch", default="16,32")
    a = ap.parse_args(argv)
    files = sorted(a.telemetry.glob("*.jsonl"))
    if not files:
        ap.error(f"no .jsonl files in {a.telemetry}")
    print("| batch | policy | decode steps | speculating | tok/s | step (ms) | draft | verify | outside "
          "| tokens per step | verified per row |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b in (int(x) for x in a.batch.split(",")):
        for f in files:
            r = rows(f, b)
            if r:
                print(f"| {b} | {f.stem} | {r['steps']} | {r['speculating']} | {r['tok_per_s']:.0f} | "
                      f"{r['step_ms']:.1f} | {r['draft_ms']:.1f} | {r['verify_ms']:.1f} | "
                      f"{r['outside_ms']:.1f} | {r['tokens_per_step']:.1f} | {r['verified_per_row']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
