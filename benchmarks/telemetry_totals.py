"""Where a run's engine time went, from its telemetry: totals of decode and prefill steps and of the
gaps between steps, tokens per ms of decode step, row-steps, the time-weighted batch; then, at
batches of at least --min-batch, the mean decode step by its deepest draft (verify, draft, outside);
then, by batch size, tokens per ms of decode step and the wait before the next step (`by_batch`).

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


BATCH_EDGES = (1, 2, 4, 8, 16, 32)  # lower edges of the batch-size groups of `by_batch`


def by_batch(records: list[dict], edges: tuple[int, ...] = BATCH_EDGES) -> dict[str, dict]:
    """Decode steps by batch size (groups from each lower edge to the next): steps, seconds, tokens
    per ms of decode step, drafts per row, and the mean wait before the next decode step when no
    prefill came between them (the engine loop and the policy's `observe`, which run outside the
    step). A run's tokens per ms is a mix over batch sizes: a policy that serves each batch size
    less efficiently builds bigger batches, which serve more tokens per ms, so whole-run totals can
    tie while every group loses (session 22, the code trace)."""
    recs = sorted(records, key=lambda r: r["start"])
    groups: dict[int, list] = defaultdict(lambda: [0, 0.0, 0, 0.0, 0.0, 0])
    for k, r in enumerate(recs):
        if r["kind"] != "decode":
            continue
        n = len(r["request_ids"])
        g = groups[max((e for e in edges if e <= n), default=edges[0])]
        g[0] += 1
        g[1] += r["step_time"]
        g[2] += sum(r["accepted"]) + n
        g[3] += sum(r["drafted"]) / n if n else 0.0
        nxt = recs[k + 1] if k + 1 < len(recs) else None
        if nxt is not None and nxt["kind"] == "decode":
            g[4] += nxt["start"] - r["start"] - r["step_time"]
            g[5] += 1
    out = {}
    for lo in sorted(groups):
        steps, secs, tokens, drafts, wait, waits = groups[lo]
        hi = next((e - 1 for e in edges if e > lo), None)
        label = f"{lo}" if hi == lo else f"{lo}-{hi}" if hi else f"{lo}+"
        out[label] = {"steps": steps, "decode_s": secs,
                      "tokens_per_ms": tokens / secs / 1e3 if secs else None,
                      "drafts_per_row": drafts / steps, "wait_ms": 1e3 * wait / waits if waits else None}
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
        t, d, b = totals(records), by_depth(records, a.min_batch), by_batch(records)
        out[str(path)] = {"totals": t, "by_depth": d, "by_batch": b}
        print(f"{path.name}: decode {t['decode_s']:.2f} s ({t['decode_steps']} steps, outside the forwards "
              f"{t['outside_s']:.2f} s), prefill {t['prefill_s']:.2f} s, gaps {t['gaps_s']:.2f} s; "
              f"{t['tokens']} tokens, {t['tokens_per_ms']:.3f} per ms of decode step, {t['row_steps']} "
              f"row-steps, time-weighted batch {t['time_weighted_batch']:.2f}")
        for depth, c in d.items():
            print(f"   batch >= {a.min_batch}, depth {depth}: {c['steps']} steps, step {c['step_ms']:.2f} ms "
                  f"(verify {c['verify_ms']:.2f}, draft {c['draft_ms']:.2f}, outside {c['outside_ms']:.2f}), "
                  f"{c['tokens']:.1f} tokens")
        for label, c in b.items():
            wait = "-" if c["wait_ms"] is None else f"{c['wait_ms']:.2f} ms"
            print(f"   batch {label}: {c['steps']} steps, {c['decode_s']:.2f} s, {c['tokens_per_ms']:.3f} "
                  f"tokens per ms of decode step, {c['drafts_per_row']:.2f} drafts a row, wait before the "
                  f"next {wait}")
    if a.out:
        Path(f"{a.out}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
