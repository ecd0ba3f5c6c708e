"""The cost model's step-time predictions replayed on recorded telemetry, by batch size and depth.

    python benchmarks/cost_replay.py --profile ~/.cache/adaspec/profiles/target-draft-<key>.json \
        runs/s15/code-rot/r1/telemetry-adaspec.jsonl runs/s15/code-r3/telemetry-static_5.jsonl ...

Each telemetry file is a run of its own: a fresh `CostModel` from the profile observes its decode
steps in order and each step is predicted before it is learned from (prequential, as the engine
does). Per (batch-size bucket, deepest draft of the step): the summed prediction over the summed
measurement of the whole step and of the time outside the forwards (`predict_overhead`); and a
least-squares fit of that outside time over all the steps (`outside_fit`). A step's
draft lags are not recorded; they are reconstructed from the step before (1 after a draft that was
not fully accepted or no step yet, 2 after a fully accepted one, +1 for each step without drafts),
which touches only the first draft forward's width. Session 15 used it to find that the time
outside the forwards, priced per request and per draft forward, is priced 18-22% low at depth
4-5 at batch 6+ (it grows per drafted token); a per-token rate learned apart fixed that in the
replay but not the replays' TPOT, and was not kept (`docs/policies.md`, session 15).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from adaspec.spec import cost_model
from adaspec.spec.cost_model import CostModel, StepShape

BUCKETS = (1, 2, 6, 16)  # lower edges of the batch-size buckets
OUTSIDE_TERMS = ("const", "batch", "draft_forwards", "drafted_tokens")


def outside_fit(records: list[dict]) -> dict[str, float]:
    """Least squares of the time outside the forwards (ms) of decode steps on OUTSIDE_TERMS: how it
    grows, whatever the cost model assumes."""
    dec = [r for r in records if r["kind"] == "decode"]
    x = np.array([[1.0, r["batch_size"], r["draft_steps"], sum(r["drafted"])] for r in dec])
    y = np.array([1e3 * max(0.0, r["step_time"] - r["draft_time"] - r["verify_time"]) for r in dec])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return dict(zip(OUTSIDE_TERMS, (round(float(c), 4) for c in coef), strict=True))


def bucket(batch: int) -> int:
    return max(b for b in BUCKETS if b <= batch)


def replay(cm: CostModel, records: list[dict], sums: dict, profiled: dict | None = None) -> None:
    """Observe one run's decode steps in order, adding (steps, predicted and measured step time,
    predicted and measured time outside the forwards, absolute relative error) per cell to `sums`,
    and to `profiled[(batch bucket, "draft" | "verify")]` each step's measured time over the start-up
    profile's (no online correction)."""
    cm.reset()
    lag: dict[str, int] = defaultdict(lambda: 1)
    for r in records:
        if r["kind"] != "decode":
            continue
        ids, drafted = r["request_ids"], r["drafted"]
        shape = StepShape(list(r["context_lens"]), [lag[i] for i in ids], list(drafted), list(drafted))
        if profiled is not None:
            base = cm.predict(shape, corrected=False)
            if base.draft > 0 and r["draft_time"] > 0:
                profiled[(bucket(len(ids)), "draft")].append(r["draft_time"] / base.draft)
            profiled[(bucket(len(ids)), "verify")].append(r["verify_time"] / base.verify)
        p = cm.observe(shape, r["draft_time"], r["verify_time"], r["step_time"])
        for i, d, a in zip(ids, drafted, r["accepted"], strict=True):
            lag[i] = (2 if a == d else 1) if d else lag[i] + 1
        outside = max(0.0, r["step_time"] - r["draft_time"] - r["verify_time"])
        cell = sums[(bucket(len(ids)), max(drafted, default=0))]
        for k, v in enumerate((1, p.total, r["step_time"], p.overhead, outside,
                               abs(p.total - r["step_time"]) / r["step_time"])):
            cell[k] += v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("telemetry", nargs="+", type=Path)
    ap.add_argument("--profile", type=Path, required=True, help="a cost-model profile (JSON)")
    ap.add_argument("--min-steps", type=int, default=10, help="cells with fewer steps are not printed")
    ap.add_argument("--median", action="store_true",
                    help="online corrections by the median of their window, as until session 16 "
                         "(default: the mean without outliers, `robust_mean`)")
    ap.add_argument("--out", help="write OUT.json")
    a = ap.parse_args(argv)
    default = cost_model.robust_mean
    if a.median:
        cost_model.robust_mean = statistics.median
    try:
        return report(a, argv)
    finally:
        cost_model.robust_mean = default


def report(a: argparse.Namespace, argv) -> int:
    cm = CostModel.load(a.profile)
    sums: dict = defaultdict(lambda: [0.0] * 6)
    profiled: dict = defaultdict(list)
    records = []
    for path in a.telemetry:
        run = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        replay(cm, run, sums, profiled)
        records += run
    steps = sum(c[0] for c in sums.values())
    mape = sum(c[5] for c in sums.values()) / max(steps, 1)
    bias = sum(c[1] for c in sums.values()) / max(sum(c[2] for c in sums.values()), 1e-12)
    fit = outside_fit(records)
    print(f"{int(steps)} decode steps; mean absolute relative error of the step time {mape:.4f}; "
          f"predicted / measured over all of them {bias:.4f}")
    print("outside the forwards, ms = " + " + ".join(f"{v} {k}" for k, v in fit.items()))
    by_batch = {f"batch>={b} {part}": {"steps": len(v), "median": statistics.median(v),
                                        "mean": statistics.fmean(v)}
                for (b, part), v in sorted(profiled.items())}
    for k, v in by_batch.items():
        print(f"measured / profiled, {k}: median {v['median']:.3f}, mean {v['mean']:.3f} "
              f"({v['steps']} steps)")
    cells = {}
    for (b, depth), c in sorted(sums.items()):
        row = {"steps": int(c[0]), "step_pred_over_real": c[1] / c[2],
               "outside_pred_over_real": c[3] / c[4] if c[4] else None}
        cells[f"batch>={b} depth={depth}"] = row
        if c[0] >= a.min_steps:
            out = row["outside_pred_over_real"]
            print(f"batch >= {b:2d}  depth {depth}  steps {int(c[0]):5d}  step predicted/measured "
                  f"{row['step_pred_over_real']:.3f}  outside the forwards "
                  f"{'-' if out is None else f'{out:.3f}'}")
    if a.out:
        args = sys.argv[1:] if argv is None else argv
        Path(f"{a.out}.json").write_text(json.dumps(
            {"command": "python benchmarks/cost_replay.py " + " ".join(map(str, args)),
             "steps": int(steps), "correction": "median" if a.median else "robust_mean", "mape": mape,
             "step_pred_over_real": bias, "outside_fit_ms": fit,
             "measured_over_profiled": by_batch, "cells": cells}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
