"""Where a run's engine time went, from its telemetry: totals of decode and prefill steps and of the
gaps between steps, tokens per ms of decode step, row-steps, the time-weighted batch; then, at
batches of at least --min-batch, the mean decode step by its deepest draft (verify, draft, outside).

    python benchmarks/policies_closed_loop.py --policies static:3,adaspec --concurrency 16 \\
        --requests-per-level 96 --export-telemetry runs/c16-tel --out runs/c16-tel
    python benchmarks/telemetry_totals.py runs/c16-tel/*.jsonl --min-batch 12

Two policies that emit the same tokens differ in decode time (how many steps, how costly each)
and in what happens between steps (their own work, prefills); session 16 used it to find where
adaspec lost to static:3 at c=16 (docs/policies.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def totals(records: list[dict]) -> dict:
    """A run's time and tokens (seconds; tokens emitted = accepted drafts + one a row)."""
    recs = sorted(records, key=lambda r: r["start"])
    dec = [r for r in recs if r["kind"] == "decode"]
    decode = sum(r["step_time"] for r in dec)
    prefill = sum(r["step_time"] for r in recs if r["kind"] == "prefill")
    forwards = sum(r["draft_time"] + r["verify_time"] for r in dec)
    tokens = sum(sum(r["accepted"]) + len(r["accepted"]) for r in dec)
    rows = sum(len(r["request_ids"]) for r in dec)
    drafted = sum(sum(r["drafted"]) for r in dec)
    span = recs[-1]["start"] + recs[-1]["step_time"] - recs[0]["start"] if recs else 0.0
    return {"span_s": span, "decode_s": decode, "decode_steps": len(dec), "forwards_s": forwards,
            "outside_s": decode - forwards, "prefill_s": prefill, "gaps_s": span - decode - prefill,
            "tokens": tokens, "tokens_per_ms": tokens / decode / 1e3 if decode else None,
            "row_steps": rows, "tokens_per_row": tokens / rows if rows else None,
            "time_weighted_batch": (sum(r["step_time"] * len(r["request_ids"]) for r in dec) / decode
                                    if decode else None),
            "drafted": drafted,
            "acceptance": sum(sum(r["accepted"]) for r in dec) / drafted if drafted else None}


def by_depth(records: list[dict], min_batch: int) -> dict[int, dict]:
    """Mean decode step (ms) by its deepest draft, at batches of at least min_batch."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        if r["kind"] == "decode" and len(r["request_ids"]) >= min_batch:
            groups[max(r["drafted"], default=0)].append(r)
    out = {}
    for depth, rs in sorted(groups.items()):
        n = len(rs)
        step, verify, draft = (1e3 * sum(r[k] for r in rs) / n
                               for k in ("step_time", "verify_time", "draft_time"))
        out[depth] = {"steps": n, "step_ms": step, "verify_ms": verify, "draft_ms": draft,
                      "outside_ms": step - verify - draft,
                      "tokens": sum(sum(r["accepted"]) + len(r["accepted"]) for r in rs) / n}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("telemetry", nargs="+", type=Path)
    ap.add_argument("--min-batch", type=int, default=12)
    ap.add_argument("--out", help="also write OUT.json")
    a = ap.parse_args(argv)
    out = {}
    for path in a.telemetry:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        t, d = totals(records), by_depth(records, a.min_batch)
        out[str(path)] = {"totals": t, "by_depth": d}
        print(f"{path.name}: decode {t['decode_s']:.2f} s ({t['decode_steps']} steps, outside the forwards "
              f"{t['outside_s']:.2f} s), prefill {t['prefill_s']:.2f} s, gaps {t['gaps_s']:.2f} s; "
              f"{t['tokens']} tokens, {t['tokens_per_ms']:.3f} per ms of decode step, {t['row_steps']} "
              f"row-steps, time-weighted batch {t['time_weighted_batch']:.2f}")
        for depth, c in d.items():
            print(f"   batch >= {a.min_batch}, depth {depth}: {c['steps']} steps, step {c['step_ms']:.2f} ms "
                  f"(verify {c['verify_ms']:.2f}, draft {c['draft_ms']:.2f}, outside {c['outside_ms']:.2f}), "
                  f"{c['tokens']:.1f} tokens")
    if a.out:
        Path(f"{a.out}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
