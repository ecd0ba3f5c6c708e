"""Does the plan value draft depths as they measure? Telemetry and decision logs, by batch size.

    adaspec bench sweep --policies static:3,static:5,adaspec ... --output-dir runs/sweep
    python benchmarks/depth_value.py --telemetry runs/sweep/r*/telemetry-*.jsonl \\
        --decisions runs/sweep/r*/decisions-adaspec.jsonl

(a sweep keeps one telemetry file and one decision log per policy and repeat, its levels pooled)

Measured: every decode step in which all rows drafted the same depth d (static k's steps, and
adaspec's one-depth-for-all steps), grouped by (batch bucket, d): tokens emitted per ms of step
(pooled: total tokens over total step time) and per row. Predicted: each adaspec plan's grid
(decision log, phase "plan", one candidate per depth with every request that may draft), its
tokens per ms at each depth, median over the plans in the bucket; and how often each depth was
chosen. If the measured tokens per ms rise with depth where the predicted ones fall or stay flat,
the plan drafts too shallow (session 17's code-trace loss: adaspec drafted 2-3 for all at batch
8-11 where static:5 drafted 5).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from adaspec.sim.fitted import read_telemetry
from adaspec.spec.decisions import DecisionLog

BUCKETS = ((1, "1"), (3, "2-3"), (7, "4-7"), (11, "8-11"), (15, "12-15"), (10**9, "16+"))


def bucket(batch: int) -> str:
    return next(name for top, name in BUCKETS if batch <= top)


def policy_of(path: str) -> str:
    m = re.match(r"telemetry-(.+)\.jsonl$", Path(path).name)
    return m.group(1) if m else Path(path).stem


def measured(paths: list[str]) -> dict[tuple[str, int], dict]:
    """(bucket, depth) -> steps, tokens per ms of step (pooled) and tokens per row, with the
    policies the steps came from."""
    acc: dict[tuple, list] = defaultdict(lambda: [0, 0.0, 0, 0, set()])
    for path in paths:
        for r in read_telemetry(path):
            if r["kind"] != "decode" or r["step_time"] <= 0 or not r["drafted"]:
                continue
            depths = set(r["drafted"])
            if len(depths) != 1:
                continue
            a = acc[(bucket(len(r["request_ids"])), depths.pop())]
            a[0] += 1
            a[1] += r["step_time"]
            a[2] += sum(r["accepted"]) + len(r["accepted"])
            a[3] += len(r["accepted"])
            a[4].add(policy_of(path))
    return {k: {"steps": n, "tokens_per_ms": tok / t / 1e3, "tokens_per_row": tok / rows,
                "policies": sorted(pols)}
            for k, (n, t, tok, rows, pols) in acc.items()}


def predicted(paths: list[str]) -> tuple[dict[tuple[str, int], float], Counter]:
    """(bucket, depth) -> median over plans of the grid's predicted tokens per ms; chosen depths."""
    eff: dict[tuple, list[float]] = defaultdict(list)
    chosen: Counter = Counter()
    for path in paths:
        for rec in DecisionLog.read_jsonl(path):
            plan = next((p for p in rec["phases"] if p["phase"] == "plan" and p["candidates"]), None)
            if plan is None:
                continue
            b = bucket(len(rec["requests"]))
            for c in plan["candidates"]:
                if c.get("efficiency"):
                    eff[(b, int(c["h"]))].append(c["efficiency"] / 1e3)
            chosen[(b, int(plan["choice"]["h"]) if plan["choice"]["m"] else 0)] += 1
    return {k: statistics.median(v) for k, v in eff.items()}, chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--telemetry", nargs="+", required=True, help="telemetry JSONL files, pooled")
    ap.add_argument("--decisions", nargs="*", default=[], help="adaspec decision logs, pooled")
    ap.add_argument("--json", help="also write the table as JSON here")
    a = ap.parse_args()
    meas = measured(a.telemetry)
    pred, chosen = predicted(a.decisions)
    order = {name: i for i, (_, name) in enumerate(BUCKETS)}
    keys = sorted(set(meas) | set(pred), key=lambda k: (order[k[0]], k[1]))
    print("| batch | depth for all | steps | measured tokens/ms | tokens/row | from | predicted tokens/ms "
          "(median of plans) | plans choosing it |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for k in keys:
        m, p = meas.get(k), pred.get(k)
        rows.append({"batch": k[0], "depth": k[1], **(m or {}), "predicted_tokens_per_ms": p,
                     "chosen": chosen.get(k, 0)})
        print(f"| {k[0]} | {k[1]} | {m['steps'] if m else 0} | "
              f"{'-' if m is None else format(m['tokens_per_ms'], '.3f')} | "
              f"{'-' if m is None else format(m['tokens_per_row'], '.2f')} | "
              f"{'-' if m is None else ','.join(m['policies'])} | "
              f"{'-' if p is None else format(p, '.3f')} | {chosen.get(k, 0)} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
