"""How much longer a request lives than its own decode steps take, from engine telemetry.

    python benchmarks/request_waits.py runs/bench9/code-r1/telemetry-adaspec.jsonl [more files]

A running request's time per output token is not only the decode steps it is in: between them it
waits for prefill steps of arriving requests, for the policy's `observe`, the engine loop and the
server. Per request: wall time from the start of its first decode step to the end of its last,
over the summed time of those steps (requests whose decode steps add up to at least `--min-decode`
seconds). Per file: the median, 10th and 90th percentiles of that ratio, and the prefill steps'
share of the engine's busy time. This is the bias the SLO rule corrects with `between`
(`adaspec.spec.control`; docs/policies.md, session 9). Telemetry: `LLMEngine.export_telemetry`
JSONL, as `adaspec bench sweep` writes it next to its results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def request_waits(records: list[dict], min_decode: float = 0.2) -> dict:
    """Life over decode time per request (see module doc), and the prefill share of busy time."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    decode: dict[str, float] = {}
    for r in records:
        if r["kind"] != "decode":
            continue
        end = r["start"] + r["step_time"]
        for rid in r["request_ids"]:
            first.setdefault(rid, r["start"])
            last[rid] = end
            decode[rid] = decode.get(rid, 0.0) + r["step_time"]
    ratios = np.array([(last[k] - first[k]) / d for k, d in decode.items() if d >= min_decode])
    busy = sum(r["step_time"] for r in records)
    prefill = sum(r["step_time"] for r in records if r["kind"] == "prefill")
    out = {"requests": int(ratios.size), "prefill_share": prefill / busy if busy else float("nan")}
    if ratios.size:
        out.update(median=float(np.median(ratios)), p10=float(np.percentile(ratios, 10)),
                   p90=float(np.percentile(ratios, 90)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("telemetry", nargs="+", type=Path)
    ap.add_argument("--min-decode", type=float, default=0.2,
                    help="seconds of decode steps a request needs to count")
    a = ap.parse_args(argv)
    print("| telemetry | requests | life / decode steps: median (p10-p90) | prefill share of busy time |")
    print("|---|---|---|---|")
    for path in a.telemetry:
        with open(path) as f:
            res = request_waits([json.loads(line) for line in f if line.strip()], a.min_decode)
        spread = (f"{res['median']:.3f} ({res['p10']:.3f}-{res['p90']:.3f})" if res["requests"] else "-")
        print(f"| {path} | {res['requests']} | {spread} | {res['prefill_share']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
