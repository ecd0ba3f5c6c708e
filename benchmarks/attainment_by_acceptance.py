"""Who meets the TPOT SLO? Per-request TPOT and attainment, grouped by how well the prompt drafts.

    python benchmarks/policies_closed_loop.py ... --out runs/cl/pcl      # writes runs/cl/pcl.requests.jsonl
    python benchmarks/attainment_by_acceptance.py runs/cl/pcl.requests.jsonl --slo-ms 11.3 [--by static:5]

A prompt's draftability is its accepted tokens per verification step under the reference policy
(--by, a static k: every prompt drafts alike there), averaged over that policy's repeats at the
same concurrency; prompts are cut into fifths of it (group 0: drafts worst). Per concurrency and
policy, each group's median TPOT and share within the SLO: where a policy loses attainment, this
says whether it loses the requests that draft well (too little speculation for them) or badly
(steps slowed by others' drafts). Session 21: at c=16, static:5 kept more of the middle groups
within an 11.3 ms SLO than adaspec's one depth for all (docs/policies.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import defaultdict

import numpy as np


def groups(records: list[dict], by: str, parts: int = 5) -> dict[tuple[int, int], int]:
    """(concurrency, prompt) -> group 0..parts-1 of the prompt's accepted tokens per step under `by`."""
    rate: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in records:
        if r["policy"] == by and r["steps"]:
            rate[r["concurrency"], r["prompt"]].append(r["accepted"] / r["steps"])
    out = {}
    for c in {c for c, _ in rate}:
        keys = [k for k in rate if k[0] == c]
        means = [statistics.mean(rate[k]) for k in keys]
        edges = np.quantile(means, [i / parts for i in range(1, parts)])
        out.update({k: int(np.searchsorted(edges, m)) for k, m in zip(keys, means, strict=True)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("requests", help="a policies_closed_loop.py per-request file (<out>.requests.jsonl[.gz])")
    ap.add_argument("--slo-ms", type=float, required=True, help="TPOT SLO (ms) to judge attainment by")
    ap.add_argument("--by", default="static:5", help="reference policy for the prompts' draftability")
    a = ap.parse_args()
    with (gzip.open if a.requests.endswith(".gz") else open)(a.requests, "rt") as f:
        records = [json.loads(line) for line in f if line.strip()]
    group = groups(records, a.by)
    if not group:
        raise SystemExit(f"no records of --by {a.by!r} with verification steps in {a.requests}")
    cells: dict[tuple[int, str, int], list[float]] = defaultdict(list)
    for r in records:
        g = group.get((r["concurrency"], r["prompt"]))
        if g is not None:
            cells[r["concurrency"], r["policy"], g].append(r["tpot_ms"])
    print(f"TPOT median (ms) / share within {a.slo_ms} ms, by fifth of prompts' accepted tokens per step "
          f"under {a.by} (group 0: drafts worst)\n")
    print("| c | policy | " + " | ".join(f"group {g}" for g in range(5)) + " |")
    print("|---|---|" + "---|" * 5)
    for c, pol in sorted({(c, p) for c, p, _ in cells}):
        row = []
        for g in range(5):
            v = cells.get((c, pol, g), [])
            row.append(f"{statistics.median(v):.1f} / {np.mean(np.array(v) <= a.slo_ms):.2f}" if v else "-")
        print(f"| {c} | {pol} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
