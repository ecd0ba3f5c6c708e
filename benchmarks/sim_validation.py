"""Does the simulator reproduce the real engine? Compare a real replay with its simulation.

    # 1. the real run (bench sweep keeps each server's telemetry in its results folder)
    adaspec bench sweep --policies none,static:3,adaspec --trace T.csv ... --output-dir runs/real
    # 2. its simulation, with step times fitted from that run's engine telemetry (forwards pooled,
    #    time outside the forwards per policy: adaspec.sim.fitted) and the acceptance seen in it
    adaspec simulate --policies none,static:3,adaspec --trace T.csv ... (same workload flags) \
        --cost-model telemetry:$(ls runs/real/telemetry-*.jsonl | paste -sd,) \
        --acceptance empirical:runs/real/telemetry-static_3.jsonl --no-oracle --output-dir runs/sim
    # 3. the comparison
    python benchmarks/sim_validation.py runs/real runs/sim --out docs/sim_validation
    # with a second real run of the same workload: the engine against itself, the noise floor
    python benchmarks/sim_validation.py runs/real runs/sim --repeat runs/real2 --out docs/sim_validation

(The first version timed steps with a start-up profile, `adaspec profile`, plus a per-row overhead
measured from one policy's telemetry: `--calibrate PROFILE TELEMETRY --out`; it made the replay
about twice too fast. `benchmarks/telemetry_breakdown.py` shows where the time goes.)

For every policy and level present in both summaries: mean TPOT, P99 TPOT, output throughput and
SLO attainment, real vs simulated, the relative error (attainment: absolute difference, since it is
a share), whether it is within the tolerance (15% by default), and whether the policies rank the
same way by mean TPOT. With `--repeat`, the same figures for the real run against its repeat: on
this machine two replays of one workload differ by more than 15% in many figures (the machine's
drift), and a simulation cannot be expected to agree with one real run better than a second real run
does. Writes OUT.md and OUT.json; every number comes from the summaries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = (("tpot_mean_ms", "mean TPOT (ms)", lambda r: r["tpot_ms"]["mean"]),
           ("tpot_p99_ms", "P99 TPOT (ms)", lambda r: r["tpot_ms"]["p99"]),
           ("throughput_tok_s", "output tok/s", lambda r: r["output_throughput"]),
           ("slo_attainment", "SLO attainment", lambda r: r["slo"]["attainment"]))


def load(folder: Path) -> tuple[dict, dict]:
    path = folder / "summary.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read {path}: {exc}") from None
    return d["meta"], {(r["policy"], r["level"]): r for r in d["runs"]}


def swapped_pairs(real_order: list[str], sim_order: list[str]) -> dict:
    """How far from the same ranking: pairs of policies the two orders put the other way round, of
    all pairs (Kendall's tau = 1 - 2 * swapped / pairs)."""
    pos = {p: i for i, p in enumerate(sim_order)}
    pairs = [(a, b) for i, a in enumerate(real_order) for b in real_order[i + 1:]]
    swapped = sum(pos[a] > pos[b] for a, b in pairs)
    return {"swapped_pairs": swapped, "pairs": len(pairs)}


def compare(real: dict, sim: dict, tolerance: float) -> dict:
    rows, levels = [], sorted({lv for _, lv in real} & {lv for _, lv in sim})
    for key in sorted(real.keys() & sim.keys(), key=lambda k: (k[1], k[0])):
        r, s = real[key], sim[key]
        row = {"policy": key[0], "level": key[1]}
        for name, _, get in METRICS:
            a, b = get(r), get(s)
            if a is None or b is None:
                continue
            err = abs(b - a) if name == "slo_attainment" else abs(b - a) / a if a else float("inf")
            row[name] = {"real": a, "sim": b, "error": err, "within": err <= tolerance}
        rows.append(row)
    ranking = {}
    for lv in levels:
        here = [x for x in rows if x["level"] == lv and "tpot_mean_ms" in x]
        real_order = [x["policy"] for x in sorted(here, key=lambda x: x["tpot_mean_ms"]["real"])]
        sim_order = [x["policy"] for x in sorted(here, key=lambda x: x["tpot_mean_ms"]["sim"])]
        ranking[str(lv)] = {"real": real_order, "sim": sim_order, "same": real_order == sim_order,
                            **swapped_pairs(real_order, sim_order)}
    return {"rows": rows, "ranking": ranking, "tolerance": tolerance}


def summary_line(res: dict) -> str:
    checks = [m for r in res["rows"] for m in r.values() if isinstance(m, dict)]
    swapped = ", ".join(str(v["swapped_pairs"]) for v in res["ranking"].values())
    return (f"{sum(c['within'] for c in checks)} of {len(checks)} figures within tolerance; policy ranking "
            f"by mean TPOT the same at {sum(v['same'] for v in res['ranking'].values())} of "
            f"{len(res['ranking'])} levels (pairs swapped per level: {swapped})")


def _error(name: str, m: dict) -> str:
    return f"{m['error']:.2f}" if name == "slo_attainment" else f"{100 * m['error']:.0f}%"


def render(res: dict, real_meta: dict, sim_meta: dict, args: argparse.Namespace,
           floor: dict | None = None) -> str:
    """The report; `floor`: the real run against its repeat (`compare(real, repeat)`), shown as each
    figure's repeat error next to the simulation's."""
    tol = res["tolerance"]
    again = {(r["policy"], r["level"]): r for r in floor["rows"]} if floor else {}
    command = f"python benchmarks/sim_validation.py {args.real} {args.sim}"
    lines = ["# Simulator validation: a real replay and its simulation", "",
             f"Real run: `{args.real}` ({real_meta.get('command', '')}).  ",
             f"Simulation: `{args.sim}` ({sim_meta.get('command', '')}).  "]
    if floor:
        lines.append(f"Repeat of the real run: `{args.repeat}`.  ")
        command += f" --repeat {args.repeat}"
    lines += [f"Comparison: `{command}`. Tolerance {100 * tol:.0f}% relative (SLO attainment: {tol:.2f} "
              "absolute).", "", f"**Simulation against the real run: {summary_line(res)}.**", ""]
    if floor:
        lines += [f"**The real run against its repeat (the noise floor): {summary_line(floor)}.**", "",
                  "Each cell: real / simulated (simulation's error; in brackets, the repeat's error "
                  "against the same real run).", ""]
    header = " | ".join(f"{label} real / sim (err)" for _, label, _ in METRICS)
    lines += [f"| policy | level | {header} |",
              "|---|---|" + "---|" * len(METRICS)]
    for r in res["rows"]:
        cells = []
        for name, _, _ in METRICS:
            m = r.get(name)
            if m is None:
                cells.append("-")
                continue
            fmt = "{:.2f}" if name == "slo_attainment" else "{:.1f}"
            rep = again.get((r["policy"], r["level"]), {}).get(name)
            rep = f" [{_error(name, rep)}{'' if rep['within'] else ' !'}]" if rep else ""
            cells.append(f"{fmt.format(m['real'])} / {fmt.format(m['sim'])} ({_error(name, m)}"
                         f"{'' if m['within'] else ' !'}){rep}")
        lines.append(f"| {r['policy']} | {r['level']} | " + " | ".join(cells) + " |")
    lines += ["", "Ranking by mean TPOT (best first):", ""]
    for lv, v in res["ranking"].items():
        lines.append(f"- level {lv}: real {', '.join(v['real'])}; simulated {', '.join(v['sim'])}"
                     f" ({'same' if v['same'] else 'different'}: {v['swapped_pairs']} of {v['pairs']} pairs "
                     "swapped)")
        if floor and lv in floor["ranking"]:
            f = floor["ranking"][lv]
            lines.append(f"  - repeat: {', '.join(f['sim'])} ({f['swapped_pairs']} of {f['pairs']} pairs "
                         "swapped)")
    lines.append("")
    return "\n".join(lines)


def calibrate(profile: Path, telemetry: Path, out: Path) -> float:
    """Write `profile` with its per-row overhead set to the median measured in `telemetry` (engine
    step records): (step time - draft time - verify time) / (1 + batch + drafted tokens), the
    same quantity the online cost model learns."""
    d = json.loads(profile.read_text())
    per_row = []
    for line in telemetry.read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "decode":
            rows = 1 + r["batch_size"] + sum(r["drafted"])
            per_row.append(max(0.0, r["step_time"] - r["draft_time"] - r["verify_time"]) / rows)
    if not per_row:
        raise SystemExit(f"no decode steps in {telemetry}")
    per_row.sort()
    d["overhead_per_row"] = per_row[len(per_row) // 2]
    d.setdefault("meta", {})["overhead_from"] = str(telemetry)
    out.write_text(json.dumps(d, indent=1))
    return d["overhead_per_row"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("real", type=Path, help="results folder of the real run (adaspec bench sweep)")
    ap.add_argument("sim", type=Path, nargs="?", help="results folder of the simulation (adaspec simulate)")
    ap.add_argument("--repeat", type=Path, help="results folder of a second real run of the same workload")
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--out", type=Path, default=Path("docs/sim_validation"))
    ap.add_argument("--calibrate", action="store_true",
                    help="instead: REAL is a profile JSON and SIM a telemetry JSONL; write the profile "
                         "with the measured per-row overhead to --out")
    a = ap.parse_args(argv)
    if a.calibrate:
        print(f"overhead per row: {1e3 * calibrate(a.real, a.sim, a.out):.3f} ms -> {a.out}")
        return 0
    if a.sim is None:
        ap.error("give the real and the simulated results folders")
    real_meta, real = load(a.real)
    sim_meta, sim = load(a.sim)
    res = compare(real, sim, a.tolerance)
    if not res["rows"]:
        raise SystemExit("the two runs share no (policy, level)")
    floor = compare(real, load(a.repeat)[1], a.tolerance) if a.repeat else None
    if floor is not None:
        res["repeat"] = floor
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    a.out.with_suffix(".md").write_text(render(res, real_meta, sim_meta, a, floor))
    print(a.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
