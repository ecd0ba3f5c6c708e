"""What cost-aware adaptation did, read from decision logs: modes, their cost, their gain, and the
plan's step-time prices by depth.

    python benchmarks/policies_closed_loop.py --policies static:3,adaspec,adaspec-always \\
        --save-decisions runs/decisions ...
    python benchmarks/adaptation_report.py runs/decisions/adaspec.jsonl runs/decisions/adaspec-always.jsonl

Per log, per concurrency level and repeat, over the steps whose batch holds at least 3/4 of the
level's concurrency (the steady state of a closed loop):
- speculating steps run adaptive (keep_drafting and prune) or fixed (the plan's depth, no
  questions), and the median time outside the forwards of each (step time - draft - verify);
- emitted tokens / step time, measured (the steps' own throughput, not TPOT);
- the mean predicted gain of adapting (`adaptation.py`) per batch-size bucket, over all levels;
- the plan's predicted step time for depths h = 0..4 (median over steps, all requests drafting):
  these must rise with h; with one online factor per verify-width range they did not always.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def steady_steps(records: list[dict]) -> dict[tuple, list[dict]]:
    out = defaultdict(list)
    for r in records:
        c = r.get("concurrency")
        if c is not None and r.get("outcome") and len(r["requests"]) >= max(1, c * 3 // 4):
            out[(c, r.get("repeat", 0))].append(r)
    return out


def phases(r: dict) -> dict[str, dict]:
    return {p["phase"]: p for p in r["phases"]}


def report(path: Path) -> list[str]:
    records = [json.loads(line) for line in path.open()]
    lines = [f"### {path}", "", "| c | repeat | steps | adaptive | fixed | outside adaptive (ms) | "
             "outside fixed (ms) | tokens/s | plan T(h=0..4) (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for (c, rep), steps in sorted(steady_steps(records).items()):
        outside = {"adaptive": [], "fixed": []}
        prices = defaultdict(list)
        emitted = elapsed = 0.0
        for r in steps:
            o, ph = r["outcome"], phases(r)
            emitted += o["emitted"]
            elapsed += o["step_time"]
            if "mode" in ph:
                gap = o["step_time"] - o["draft_time"] - o["verify_time"]
                outside[ph["mode"]["choice"]].append(1e3 * gap)
            for cand in ph["plan"]["candidates"]:
                if cand.get("h", 9) <= 4:
                    prices[cand["h"]].append(1e3 * cand["time"])

        def med(v):
            return f"{statistics.median(v):.1f}" if v else "-"

        t = " / ".join(med(prices[h]) for h in range(5))
        a, f = outside["adaptive"], outside["fixed"]
        lines.append(f"| {c} | {rep} | {len(steps)} | {len(a)} | {len(f)} | {med(a)} | {med(f)} "
                     f"| {emitted / elapsed:.0f} | {t} |")
    gains = defaultdict(list)
    for r in records:
        for p in r["phases"]:
            if p["phase"] == "adaptation":
                gains[1 << (len(r["requests"]).bit_length() - 1)].append(p["gain"])
    if gains:
        lines += ["", "| batch bucket | adaptive steps | mean gain | share > 1.001 | share < 0.999 |",
                  "|---|---|---|---|---|"]
        for b, g in sorted(gains.items()):
            up, down = sum(x > 1.001 for x in g) / len(g), sum(x < 0.999 for x in g) / len(g)
            lines.append(f"| {b}+ | {len(g)} | {statistics.fmean(g):.3f} | {up:.2f} | {down:.2f} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = ap.parse_args()
    text = "\n".join(line for p in args.logs for line in report(p))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
