"""How well the acceptance look-ahead predicts a step's accepted tokens, by `request_decay`.

    python benchmarks/lookahead_decay.py runs/cl-tel/static_5.jsonl runs/code/telemetry-static_5.jsonl

Telemetry of a static policy (every request drafts the same k: `--export-telemetry` of
`policies_closed_loop.py`, or a sweep's `telemetry-static_K.jsonl`), replayed prequentially through
a fresh `AcceptanceModel` per decay: before each step is learned, each request's look-ahead
(`predict_unseen`, the plan's) predicts the tokens its drafts will have accepted (sum over j < n of
P(first j+1 accepted)), against what it accepted. Reported per file and decay, over request-steps
that verified at least `--min-drafts` drafts: the mean squared error and the mean error (bias) in
tokens. Session 14 chose 0.9 from this (`AcceptanceModel.request_decay`).
"""

from __future__ import annotations

import argparse
import sys

from adaspec.spec.acceptance import AcceptanceModel, prequential, steps_from_jsonl


def replay(path: str, model: AcceptanceModel, min_drafts: int = 3) -> dict:
    """Prequential look-ahead error over the file's decode steps."""
    se = bias = n = 0.0
    for ids, confs, acc in prequential(steps_from_jsonl(path), model):
        for rid, c, a in zip(ids, confs, acc, strict=True):
            if len(c) < min_drafts:
                continue
            prefix, expected = 1.0, 0.0
            for j in range(len(c)):
                prefix *= model.predict_unseen(rid, j)
                expected += prefix
            err = expected - min(int(a), len(c))
            se, bias, n = se + err * err, bias + err, n + 1
    nan = float("nan")
    return {"request_steps": int(n), "mse": se / n if n else nan, "bias": bias / n if n else nan}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("telemetry", nargs="+")
    ap.add_argument("--decays", default="1.0,0.9,0.8,0.7,0.5")
    ap.add_argument("--min-drafts", type=int, default=3)
    a = ap.parse_args(argv)
    print("| telemetry | decay | request-steps | squared error | bias (tokens) |")
    print("|---|---|---|---|---|")
    for path in a.telemetry:
        for d in (float(x) for x in a.decays.split(",")):
            r = replay(path, AcceptanceModel(request_decay=d), a.min_drafts)
            print(f"| {path} | {d:g} | {r['request_steps']} | {r['mse']:.3f} | {r['bias']:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
