"""Repeats of one sweep, side by side: mean and min-max per policy and level.

A sweep is seeded, so every repeat sends the same requests at the same times; what differs between
repeats is the machine. `adaspec bench sweep --repeats N` runs them with the policy order rotated
(each policy runs early in one repeat and late in another, so a slow stretch of the machine does not
land on the same policies every time) and writes this report next to them; `python
benchmarks/trace_repeats.py DIRS...` pools any sweep folders. A policy is "best" on a metric at a
level when its mean is, and the report says how far `adaspec` is from the best on each metric
(the bench issue's 5% bar). The machine-speed column (`metrics.host_speed`, pooled over the
repeats) says how slow the machine was during each policy's runs, measured on work every policy does
alike (prefilling the same prompts): a policy behind by less than its runs' slowdown may not be.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from adaspec.bench.metrics import host_speed

METRICS = [  # (label, getter, lower is better)
    ("mean TPOT (ms)", lambda r: r["tpot_ms"]["mean"], True),
    ("P99 TPOT (ms)", lambda r: r["tpot_ms"]["p99"], True),
    ("mean TTFT (ms)", lambda r: r["ttft_ms"]["mean"], True),
    ("SLO attainment", lambda r: r["slo"]["attainment"], False),
    ("output tok/s", lambda r: r["output_throughput"], False),
]


def load(dirs: list[Path]) -> dict[tuple[float, str], list[dict]]:
    runs: dict[tuple[float, str], list[dict]] = {}
    for d in dirs:
        f = d / "summary.json"
        if not f.exists():
            raise ValueError(f"{d}: no summary.json (not an `adaspec bench sweep` output directory)")
        for r in json.loads(f.read_text())["runs"]:
            runs.setdefault((float(r["level"]), r["policy"]), []).append(r)
    return runs


def host_speeds(dirs: list[Path]) -> dict[tuple[float, str], list[float]]:
    """(level, policy) -> each repeat's `host_speed` pooled over all the repeats (every prompt's
    prefill time against its median over every run of the level in every folder), from the folders'
    requests.jsonl; a run without prefill times is left out."""
    prefills: dict[float, dict] = {}
    for k, d in enumerate(dirs):
        f = d / "requests.jsonl"
        for line in f.read_text().splitlines() if f.exists() else []:
            row = json.loads(line)
            if row.get("prefill_s"):
                lv = float(row["level"])
                run = prefills.setdefault(lv, {}).setdefault((row["policy"], k), {})
                run[row["index"]] = row["prefill_s"]
    out: dict[tuple[float, str], list[float]] = {}
    for lv, per_run in prefills.items():
        for (p, _), h in sorted(host_speed(per_run).items(), key=lambda kv: kv[0][1]):
            if h:
                out.setdefault((lv, p), []).append(h["relative"])
    return out


def render(dirs: list[Path], runs: dict, policy: str = "adaspec", speeds: dict | None = None) -> str:
    levels = sorted({lv for lv, _ in runs})
    lines = [f"Repeats: {', '.join(f'`{d}`' for d in dirs)} (values: mean over repeats, min-max).", ""]
    for lv in levels:
        pols = [p for (lev, p) in runs if lev == lv]
        lines += [f"## Level {lv:g}", "",
                  "| policy | " + " | ".join(m for m, _, _ in METRICS) + " | machine speed |",
                  "|---|" + "---|" * (len(METRICS) + 1)]
        means = {}
        for p in pols:
            cells = []
            for label, get, _ in METRICS:
                vals = [get(r) for r in runs[(lv, p)]]
                means[(p, label)] = statistics.fmean(vals)
                cells.append(f"{statistics.fmean(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"
                             if len(vals) > 1 else f"{vals[0]:.2f}")
            hs = (speeds or {}).get((lv, p))
            cells.append(f"{statistics.fmean(hs):.2f} ({min(hs):.2f}-{max(hs):.2f})" if hs and len(hs) > 1
                         else f"{hs[0]:.2f}" if hs else "-")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines.append("")
        if policy in pols:
            for label, _, lower in METRICS:
                best = (min if lower else max)(pols, key=lambda p, lab=label: means[(p, lab)])
                b, ours = means[(best, label)], means[(policy, label)]
                gap = (ours - b) / b if lower else (b - ours) / b if b else 0.0
                verdict = "best" if best == policy else f"{100 * gap:.1f}% behind {best}"
                bar = " (over the 5% bar)" if gap > 0.05 else ""
                lines.append(f"- {label}: `{policy}` {verdict}{bar}")
            lines.append("")
    return "\n".join(lines)


def rotated(policies: list[str], k: int) -> list[str]:
    """The policy order of repeat k (0-based): the list rotated left by k."""
    k %= max(len(policies), 1)
    return policies[k:] + policies[:k]


def write(dirs: list[Path], out: Path) -> str:
    """Pool the sweeps in `dirs` into OUT.md and OUT.json; returns the Markdown."""
    runs, speeds = load(dirs), host_speeds(dirs)
    text = render(dirs, runs, speeds=speeds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    rows = []
    for (lv, p), rs in sorted(runs.items()):
        rows.append({"level": lv, "policy": p, "repeats": len(rs),
                     **{label: [get(r) for r in rs] for label, get, _ in METRICS},
                     "machine speed": speeds.get((lv, p), [])})
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return text
