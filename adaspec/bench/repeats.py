"""Repeats of one sweep, side by side: mean and min-max per policy and level.

A sweep is seeded, so every repeat sends the same requests at the same times; what differs between
repeats is the machine. `adaspec bench sweep --repeats N` runs them with the policy order rotated
(each policy runs early in one repeat and late in another, so a slow stretch of the machine does not
land on the same policies every time) and writes this report next to them; `python
benchmarks/trace_repeats.py DIRS...` pools any sweep folders. A policy is "best" on a metric at a
level when its mean is, and the report says how far `adaspec` is from the best on each metric
(the bench issue's 5% bar).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

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


def render(dirs: list[Path], runs: dict, policy: str = "adaspec") -> str:
    levels = sorted({lv for lv, _ in runs})
    lines = [f"Repeats: {', '.join(f'`{d}`' for d in dirs)} (values: mean over repeats, min-max).", ""]
    for lv in levels:
        pols = [p for (lev, p) in runs if lev == lv]
        lines += [f"## Level {lv:g}", "",
                  "| policy | " + " | ".join(m for m, _, _ in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        means = {}
        for p in pols:
            cells = []
            for label, get, _ in METRICS:
                vals = [get(r) for r in runs[(lv, p)]]
                means[(p, label)] = statistics.fmean(vals)
                cells.append(f"{statistics.fmean(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})"
                             if len(vals) > 1 else f"{vals[0]:.2f}")
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
    runs = load(dirs)
    text = render(dirs, runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    rows = []
    for (lv, p), rs in sorted(runs.items()):
        rows.append({"level": lv, "policy": p, "repeats": len(rs),
                     **{label: [get(r) for r in rs] for label, get, _ in METRICS}})
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return text
