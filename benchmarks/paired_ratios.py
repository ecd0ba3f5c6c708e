"""Two policies compared repeat by repeat, pooled over closed-loop runs.

    python benchmarks/paired_ratios.py adaspec static:3 docs/policies_closed_loop_*.json runs/ab*/*.json

`policies_closed_loop.py` runs its policies in turns within each repeat, so the two policies' mean
TPOTs of one repeat were measured minutes apart, under nearly the same machine; across repeats and
processes the machine's speed moves by more than the differences between policies (docs/policies.md).
The ratio A / B within each repeat cancels most of that drift. Per prompt set and concurrency, over
every report JSON given that has both policies: the number of paired repeats, how many A won (lower
mean TPOT), the geometric mean of the ratios with its 95% bootstrap interval and their range, and a
sign test's two-sided p-value (`adaspec.bench.metrics.paired_ratio`). Prints a Markdown table;
`--json` writes the rows too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaspec.bench.metrics import paired_ratio


def pairs(report: dict, a: str, b: str) -> dict[tuple[str, int], tuple[list[float], list[float]]]:
    """(prompt set, concurrency) -> each repeat's mean TPOT of A and of B, from one report."""
    prompts = Path(report["meta"].get("prompts", "?")).stem
    rows = {(r["policy"], r["concurrency"]): r for r in report["results"]}
    out = {}
    for (policy, c), ra in rows.items():
        rb = rows.get((b, c))
        if policy != a or rb is None:
            continue
        ta, tb = ra.get("tpot_mean_by_repeat_ms", []), rb.get("tpot_mean_by_repeat_ms", [])
        n = min(len(ta), len(tb))
        if n:
            out[(prompts, c)] = (ta[:n], tb[:n])
    return out


def summarise(files: list[Path], a: str, b: str) -> list[dict]:
    pooled: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for f in files:
        try:
            report = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot read {f}: {exc}") from None
        if "results" not in report or "meta" not in report:
            raise SystemExit(f"{f}: not a policies_closed_loop.py report (no 'meta' and 'results')")
        for key, (ta, tb) in pairs(report, a, b).items():
            pa, pb = pooled.setdefault(key, ([], []))
            pa.extend(ta)
            pb.extend(tb)
    rows = []
    for (prompts, c), (ta, tb) in sorted(pooled.items()):
        r = paired_ratio(ta, tb)
        if r is not None:
            rows.append({"prompts": prompts, "concurrency": c, **r})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="policy A (e.g. adaspec)")
    ap.add_argument("b", help="policy B (e.g. static:3)")
    ap.add_argument("reports", type=Path, nargs="+", help="report JSON files of policies_closed_loop.py")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = summarise(args.reports, args.a, args.b)
    if not rows:
        raise SystemExit(f"no report has both {args.a} and {args.b}")
    print(f"| prompts | c | paired repeats | {args.a} lower | geometric mean {args.a} / {args.b} "
          "(95% interval) | range | sign test p |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["ci95"]
        print(f"| {r['prompts']} | {r['concurrency']} | {r['pairs']} | {r['lower']} | {r['geomean']:.3f} "
              f"({lo:.3f}-{hi:.3f}) | {r['min']:.2f}-{r['max']:.2f} | {r['sign_test_p']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
