"""Does the look-ahead's sum of expected tokens run low or high, by how many drafts it sums over?

    python benchmarks/policies_closed_loop.py --policies static:5,static:8 --concurrency 4,16 \\
        --repeats 1 --export-telemetry runs/stel --out runs/stel
    python benchmarks/lookahead_bias.py runs/stel/static_8.jsonl --weights 4,8,16,32,64

Telemetry of a static policy (every request verifies the same k drafts, so what any n <= k of them
would have accepted is known: min(accepted, n)), replayed prequentially through a fresh
`AcceptanceModel` per prior weight: before each step is learned, each request's look-ahead
(`unseen_table` at that weight, what the plan sums) predicts the tokens its first n drafts will have
accepted, for every n. Printed per file, weight and n: request-steps, predicted and accepted tokens
per request-step, and accepted / predicted. The plan picks a depth from sums of these over the
batch, so a ratio above 1 that grows with n pushes it to draft too little (session 17:
`AcceptanceModel.sum_weight`). `benchmarks/lookahead_decay.py` scores the same predictions by
squared error, the criterion of the ranking weight. `--by-prediction` groups the request-steps by
what the look-ahead predicted instead (its calibration across requests; `by_prediction`).
"""

from __future__ import annotations

import argparse
import itertools
import operator
import sys
from collections import Counter, defaultdict

from adaspec.spec.acceptance import AcceptanceModel, prequential, steps_from_jsonl


def request_steps(path: str, weight: float):
    """Each request-step of the file that verified drafts: its drafts' confidences, the drafts it
    accepted, and the look-ahead (`unseen_table` at `weight`) from the model as it stood before."""
    model = AcceptanceModel()
    for ids, confs, acc in prequential(steps_from_jsonl(path), model):
        k = max((len(c) for c in confs), default=0)
        if k:
            yield from ((c, a, row) for c, a, row in zip(confs, acc, model.unseen_table(ids, k, weight),
                                                          strict=True) if c)


def bias_by_depth(path: str, weight: float) -> dict[int, dict]:
    """n -> request-steps, predicted and accepted tokens per request-step, their ratio."""
    pred: dict[int, float] = defaultdict(float)
    real: dict[int, float] = defaultdict(float)
    count: Counter = Counter()
    for c, a, row in request_steps(path, weight):
        prefixes = itertools.accumulate(row[:len(c)], operator.mul)  # P(first n accepted)
        for n, expected in enumerate(itertools.accumulate(prefixes), 1):
            pred[n] += expected
            real[n] += min(int(a), n)
            count[n] += 1
    return {n: {"request_steps": count[n], "predicted": pred[n] / count[n], "accepted": real[n] / count[n],
                "ratio": real[n] / pred[n] if pred[n] else float("nan")} for n in sorted(count)}


def by_prediction(path: str, weight: float, groups: int = 5) -> list[dict]:
    """Calibration of the look-ahead across requests: request-steps grouped by what it predicted
    per draft (groups of equal size, lowest first), each group's predicted and accepted tokens per
    request-step and accepted / predicted. A look-ahead shrunk too hard to the global rates
    predicts its lowest group high (ratio below 1) and its highest low (above 1): the SLO rule
    then takes requests that draft badly for on track (session 22, the simulator's synthetic
    acceptance). Grouping by the prediction, not by each request's realized rate, keeps the
    outcome being scored out of the grouping."""
    rows = []  # (predicted per draft, predicted, accepted)
    for c, a, row in request_steps(path, weight):
        expected = sum(itertools.accumulate(row[:len(c)], operator.mul))
        rows.append((expected / len(c), expected, min(int(a), len(c))))
    rows.sort()
    out = []
    for g in range(groups):
        part = rows[g * len(rows) // groups:(g + 1) * len(rows) // groups]
        if not part:
            continue
        pred, real = sum(r[1] for r in part), sum(r[2] for r in part)
        out.append({"group": g + 1, "request_steps": len(part), "predicted": pred / len(part),
                    "accepted": real / len(part), "ratio": real / pred if pred else float("nan")})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("telemetry", nargs="+")
    ap.add_argument("--weights", default="4,8,16,32")
    ap.add_argument("--by-prediction", action="store_true",
                    help="instead: accepted / predicted by fifth of the prediction per draft")
    a = ap.parse_args(argv)
    if a.by_prediction:
        print("| telemetry | weight | fifth (lowest prediction first) | request-steps | predicted | "
              "accepted | accepted / predicted |")
        print("|---|---|---|---|---|---|---|")
        for path in a.telemetry:
            for w in (float(x) for x in a.weights.split(",")):
                for row in by_prediction(path, w):
                    print(f"| {path} | {w:g} | {row['group']} | {row['request_steps']} | "
                          f"{row['predicted']:.3f} | {row['accepted']:.3f} | {row['ratio']:.3f} |")
        return 0
    print("| telemetry | weight | n | request-steps | predicted | accepted | accepted / predicted |")
    print("|---|---|---|---|---|---|---|")
    for path in a.telemetry:
        for w in (float(x) for x in a.weights.split(",")):
            for n, row in bias_by_depth(path, w).items():
                print(f"| {path} | {w:g} | {n} | {row['request_steps']} | {row['predicted']:.3f} | "
                      f"{row['accepted']:.3f} | {row['ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
