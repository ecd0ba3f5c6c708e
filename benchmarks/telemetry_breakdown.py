"""Why a real replay is slower than its simulation: the engine telemetry of a `bench sweep` run, step
by step, against a start-up profile and against the cost model fitted from telemetry.

    python benchmarks/telemetry_breakdown.py runs/bench/code-trace --profile runs/profile-engine.json \\
        [--fit-from runs/bench/code-trace] [--out docs/sim_validation_breakdown.md]

Per policy: decode forwards (verify, draft) measured / predicted by the profile / by the fit at the
same shapes (draft lags rebuilt from each request's history); time outside the forwards inside a
step and the gap to the next step while the engine has work; prefill steps (count, time, share of
the engine's busy time: decode waits through them); the first draft forward's catch-up width. Then
per policy and load level: the fit's error on the whole step (forwards + outside + gap), weighted
by the requests waiting on each step, which is what TPOT adds up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from adaspec.sim.fitted import FittedCostModel, fit_telemetry, read_telemetry, step_samples
from adaspec.sim.hardware import load_cost_model
from adaspec.spec.cost_model import StepShape


def levels(records: list[dict], meta: dict) -> dict[float, list[dict]]:
    """Split one server's records into the sweep's load levels (warm-up requests first, then each
    level's requests in order; a request belongs where it was prefilled)."""
    warm, n = meta.get("warmup", 0), meta["workload"]["num_requests"]
    starts, seen = [], 0
    for i, r in enumerate(records):
        if r["kind"] == "prefill":
            for _ in r["request_ids"]:
                if seen >= warm and (seen - warm) % n == 0:
                    starts.append(i)
                seen += 1
    cuts = [*starts, len(records)]
    return {lv: records[cuts[k]:cuts[k + 1]] for k, lv in enumerate(meta["levels"]) if k + 1 < len(cuts)}


def ms(values) -> float:
    return 1e3 * float(np.mean(values)) if len(values) else float("nan")


def forwards(model, samples) -> list[float]:
    return [sum(model.predict(*f) for f in fs) for fs, _ in samples]


def policy_row(name: str, records: list[dict], profile, fit: FittedCostModel) -> str:
    s = step_samples(records, fit)
    dec = [r for r in records if r["kind"] == "decode"]
    pre = [r for r in records if r["kind"] == "prefill"]
    busy = sum(r["step_time"] for r in records)
    widths = [fs[0][1] for fs, _ in s["draft"]]  # the first draft forward's tokens per row
    pre_meas = [r["draft_time"] + r["verify_time"] for r in pre]
    pre_prof, pre_fit = [], []
    for r in pre:  # the old simulator's prefill: the decode profile extrapolated to the prompt's width
        b, w, drafts = r["batch_size"], max(r["context_lens"]), r["draft_time"] > 0
        pre_prof.append(profile.verify.predict(b, w, w) + (profile.draft.predict(b, w, w) if drafts else 0.0))
        st = fit.predict_prefill(r["context_lens"], drafts)
        pre_fit.append(st.draft + st.verify)

    def cell(key, m_prof, m_fit):
        if not s[key]:
            return "-"
        y = [t for _, t in s[key]]
        return f"{ms(y):.1f} / {ms(forwards(m_prof, s[key])):.1f} / {ms(forwards(m_fit, s[key])):.1f}"

    return (f"| {name} | {len(dec)} | {np.mean([r['batch_size'] for r in dec]):.1f} | "
            f"{cell('verify', profile.verify, fit.verify)} | {cell('draft', profile.draft, fit.draft)} | "
            f"{ms([x[2] for x in s['decode']]):.2f} | {ms([x[2] for x in s['decode_gap']]):.2f} | "
            f"{len(pre)} | {ms(pre_meas):.1f} / {ms(pre_prof):.1f} / {ms(pre_fit):.1f} | "
            f"{100 * sum(r['step_time'] for r in pre) / busy:.0f}% | "
            f"{100 * np.mean(np.array(widths) > 1) if widths else 0:.0f}% / "
            f"{100 * np.mean(np.array(widths) > 2) if widths else 0:.0f}% |")


def step_bias(records: list[dict], cm: FittedCostModel) -> float:
    """Fit's predicted / measured step + gap, each step weighted by the requests waiting on it."""
    lag, pred, meas = {}, 0.0, 0.0
    for i, r in enumerate(records):
        gap = records[i + 1]["start"] - r["start"] - r["step_time"] if i + 1 < len(records) else 0.0
        gap = gap if 0 <= gap <= 0.05 else 0.0  # idle waits and one-off stalls are no step's cost
        ids, b = r["request_ids"], r["batch_size"]
        if r["kind"] == "prefill":
            p = cm.predict_prefill(r["context_lens"], r["draft_time"] > 0).total
            p += cm.predict_gap("prefill", b)
            lag.update({q: 1 for q in ids})
            w = b + r.get("num_waiting", 0)
        else:
            d = r["drafted"]
            p = cm.predict(StepShape(r["context_lens"], [lag.get(q, 1) for q in ids], d, d)).total
            p += cm.predict_gap("decode", b, sum(d))
            for q, n, a in zip(ids, d, r["accepted"], strict=True):
                lag[q] = (2 if a == n else 1) if n else lag.get(q, 1) + 1
            w = b
        pred, meas = pred + p * w, meas + (r["step_time"] + gap) * w
    return pred / meas - 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="results folder of adaspec bench sweep (telemetry-*.jsonl)")
    ap.add_argument("--profile", type=Path, required=True, help="start-up profile JSON")
    ap.add_argument("--fit-from", type=Path, help="folder whose telemetry the fit uses (default: RUN)")
    ap.add_argument("--out", type=Path, help="also write the tables here")
    a = ap.parse_args(argv)
    meta = json.loads((a.run / "summary.json").read_text())["meta"]
    files = sorted(a.run.glob("telemetry-*.jsonl"))
    fit = fit_telemetry([str(p) for p in sorted((a.fit_from or a.run).glob("telemetry-*.jsonl"))])
    profile = load_cost_model(a.profile)
    lines = [f"Telemetry: `{a.run}`; profile: `{a.profile}`; fit from `{a.fit_from or a.run}`. "
             "Times in ms, measured / profile / fit at the same shapes.", "",
             "| policy | decode steps | mean batch | verify | draft | outside (in step) | gap to next | "
             "prefill steps | prefill forwards | prefill share of busy time | catch-up > 1 / > 2 tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    bias = ["", "Fit's error on whole steps (forwards + outside + gap), weighted by the requests waiting on "
            "each step:", "", "| policy | " + " | ".join(f"level {lv:g}" for lv in meta["levels"]) + " |",
            "|---|" + "---|" * len(meta["levels"])]
    for f in files:
        name = f.name.removeprefix("telemetry-").removesuffix(".jsonl")
        records = read_telemetry(f)
        lines.append(policy_row(name, records, profile, fit))
        cm = fit.for_policy(name)
        cells = [f"{100 * step_bias(part, cm):+.1f}%" for part in levels(records, meta).values()]
        bias.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines + bias) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
