"""How well did the policy price its own steps, by batch size and draft depth? From decision logs.

    python benchmarks/policies_closed_loop.py --policies static:5,adaspec --concurrency 1,4 \\
        --save-decisions runs/dec --out runs/cl
    python benchmarks/draft_price_by_depth.py runs/dec/adaspec.jsonl [more logs ...]

Every decision-log record closes with the cost model's prediction for the step that ran, made
before the step was learned from (`control.ControlledPolicy.observe`: prequential), and the measured
times. Per (batch-size bucket, draft forwards of the step): the median over steps of predicted /
measured draft time and of predicted / measured step time. A ratio that grows with depth means
deep drafts are over-priced and the plan drafts too shallow (session 18: one draft correction for
every forward of a step priced 8 drafts 20-33% high at batch 1-4; session 19 measures the split of
first and later forwards with this).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from adaspec.spec.decisions import DecisionLog

BUCKETS = ((1, "1"), (5, "2-5"), (15, "6-15"), (10**9, "16+"))


def bucket(batch: int) -> str:
    return next(name for top, name in BUCKETS if batch <= top)


def price_by_depth(records: list[dict]) -> dict[tuple[str, int], dict]:
    """(batch bucket, draft forwards) -> steps, median predicted/measured draft and step time."""
    draft: dict[tuple, list[float]] = defaultdict(list)
    step: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        p, o = r.get("predicted"), r["outcome"]
        if not p or "step_time" not in p or o["step_time"] <= 0:
            continue
        key = (bucket(len(o["request_ids"])), int(o["draft_steps"]))
        step[key].append(p["step_time"] / o["step_time"])
        if o["draft_steps"] and o["draft_time"] > 0:
            draft[key].append(p["draft"] / o["draft_time"])
    order = {name: i for i, (_, name) in enumerate(BUCKETS)}
    return {k: {"steps": len(step[k]),
                "draft": statistics.median(draft[k]) if draft[k] else None,
                "step": statistics.median(step[k])}
            for k in sorted(step, key=lambda k: (order[k[0]], k[1]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="decision logs (JSONL), pooled")
    args = ap.parse_args()
    records = [r for path in args.logs for r in DecisionLog.read_jsonl(path)]
    print("| batch | draft forwards | steps | draft predicted / measured (median) "
          "| step predicted / measured |")
    print("|---|---|---|---|---|")
    for (b, d), v in price_by_depth(records).items():
        dr = "-" if v["draft"] is None else f"{v['draft']:.3f}"
        print(f"| {b} | {d} | {v['steps']} | {dr} | {v['step']:.3f} |")


if __name__ == "__main__":
    main()
