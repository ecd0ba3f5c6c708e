"""What the decision logs show about how a policy speculates: length vs load, length vs confidence.

    python benchmarks/policies_closed_loop.py --save-decisions runs/decisions ...
    python benchmarks/decision_mechanism.py runs/decisions --out docs/policies_mechanism

Reads the per-step decision logs written by `policies_closed_loop.py --save-decisions` (one JSONL per
policy) and reports, per policy:
- load: mean tokens drafted per request per step, and the share of steps that speculate at all,
  against the number of running requests in the step (the batch the policy planned for);
- confidence: in steps where several requests drafted, how a request's draft length relates to
  the draft's probability of its first token and to the request's own acceptance history, and how
  often the requests of one step got different lengths (ragged drafting).
Writes OUT.md (tables) and OUT.png (two panels). Only numbers computed from the logs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

BATCH_BINS = [(1, 1), (2, 4), (5, 8), (9, 16), (17, 24), (25, 32), (33, 10**6)]
CONF_BINS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0001]


def load(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def by_load(records: list[dict]) -> list[dict]:
    """Per batch-size bin: steps, share of steps that drafted, mean drafted tokens per request."""
    rows = []
    for lo, hi in BATCH_BINS:
        steps = [r for r in records if lo <= len(r["requests"]) <= hi]
        if not steps:
            continue
        drafted = [d for r in steps for d in r["outcome"]["drafted"]]
        rows.append({"batch": f"{lo}" if lo == hi else f"{lo}-{hi if hi < 10**6 else ''}",
                     "steps": len(steps),
                     "speculating_steps": sum(1 for r in steps if any(r["outcome"]["drafted"])) / len(steps),
                     "drafted_per_request": statistics.fmean(drafted),
                     "accepted_per_request": statistics.fmean(
                         a for r in steps for a in r["outcome"]["accepted"])})
    return rows


def _binned(pairs: list[tuple[float, int]]) -> list[dict]:
    out = []
    for lo, hi in zip(CONF_BINS, CONF_BINS[1:], strict=False):
        sel = [d for c, d in pairs if lo <= c < hi]
        if sel:
            out.append({"range": f"{lo:.1f}-{min(hi, 1.0):.1f}", "requests": len(sel),
                        "mean_drafted": statistics.fmean(sel)})
    return out


def _corr(pairs: list[tuple[float, int]]) -> float:
    if len(pairs) < 3 or len({c for c, _ in pairs}) < 2 or len({d for _, d in pairs}) < 2:
        return float("nan")
    return float(np.corrcoef(*zip(*pairs, strict=True))[0, 1])


def by_confidence(records: list[dict]) -> dict:
    """Requests in steps where at least two requests drafted: draft length against (a) the draft
    probability of the request's first drafted token and (b) the request's acceptance rate over
    its earlier steps (what the acceptance model learns per request); and how often one step's
    lengths differ."""
    first, history, ragged, multi = [], [], 0, 0
    seen: dict[str, list[int]] = {}  # request id -> [accepted, tested] before this step
    for r in records:
        o = r["outcome"]
        drafted, ids = o["drafted"], o["request_ids"]
        confs = r.get("drafted_confidences") or o["confidences"]
        active = [i for i, d in enumerate(drafted) if d > 0]
        if len(active) >= 2:
            multi += 1
            ragged += len({drafted[i] for i in active}) > 1
            for i in active:
                if i < len(confs) and confs[i]:
                    first.append((confs[i][0], drafted[i]))
                acc, tested = seen.get(ids[i], (0, 0))
                if tested >= 4:
                    history.append((acc / tested, drafted[i]))
        for rid, d, a in zip(ids, drafted, o["accepted"], strict=True):
            acc, tested = seen.get(rid, (0, 0))
            seen[rid] = (acc + a, tested + min(d, a + 1))
    return {"multi_request_steps": multi, "ragged_share": ragged / multi if multi else float("nan"),
            "first_token": {"bins": _binned(first), "corr": _corr(first), "n": len(first)},
            "history": {"bins": _binned(history), "corr": _corr(history), "n": len(history)}}


def render(summary: dict, logs: Path, png: str | None) -> str:
    lines = ["# Speculation decisions: length vs load and vs confidence", "",
             f"From the decision logs in `{logs}` (written by `benchmarks/policies_closed_loop.py "
             "--save-decisions`); command: `python benchmarks/decision_mechanism.py "
             f"{logs} --out OUT`.", ""]
    if png:
        lines += [f"![mechanism]({png})", ""]
    for name, s in summary.items():
        lines += [f"## {name}", "", "| running requests | steps | steps that speculate | drafted per request "
                  "| accepted per request |", "|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['steps']} | {r['speculating_steps']:.2f} | "
                  f"{r['drafted_per_request']:.2f} | {r['accepted_per_request']:.2f} |" for r in s["load"]]
        c = s["confidence"]
        lines += ["", f"Steps where two or more requests drafted: {c['multi_request_steps']}; in "
                  f"{100 * c['ragged_share']:.0f}% of them the requests got different lengths.", ""]
        for key, what in (("first_token", "draft probability of the request's first drafted token"),
                          ("history", "the request's acceptance rate over its earlier steps (>= 4 "
                                      "verified tokens)")):
            v = c[key]
            if not v["bins"]:
                continue
            lines += [f"Draft length by {what}: correlation {v['corr']:.2f} over {v['n']} request-steps.",
                      "", "| value | request-steps | mean draft length |", "|---|---|---|"]
            lines += [f"| {b['range']} | {b['requests']} | {b['mean_drafted']:.2f} |" for b in v["bins"]]
            lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in summary.items():
        a.plot([r["batch"] for r in s["load"]], [r["drafted_per_request"] for r in s["load"]], "o-",
               label=name)
        bins = s["confidence"]["history"]["bins"]
        if bins:
            b.plot([x["range"] for x in bins], [x["mean_drafted"] for x in bins], "o-", label=name)
    a.set(xlabel="running requests in the step", ylabel="tokens drafted per request per step",
          title="speculation length vs load")
    b.set(xlabel="request's acceptance rate over its earlier steps",
          ylabel="draft length (steps with >= 2 drafting requests)", title="length vs request history")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", type=Path, help="directory of <policy>.jsonl decision logs")
    ap.add_argument("--policies", help="comma list (default: every log in the directory)")
    ap.add_argument("--out", type=Path, default=Path("docs/policies_mechanism"))
    a = ap.parse_args(argv)
    names = a.policies.split(",") if a.policies else sorted(p.stem for p in a.logs.glob("*.jsonl"))
    summary = {}
    for name in names:
        path = a.logs / f"{name.replace(':', '_')}.jsonl"
        if not path.exists():
            ap.error(f"no decision log {path}")
        recs = load(path)
        if recs:
            summary[name] = {"load": by_load(recs), "confidence": by_confidence(recs)}
    if not summary:
        ap.error(f"no decision records under {a.logs}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    png = a.out.with_suffix(".png")
    plot(summary, png)
    a.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    a.out.with_suffix(".md").write_text(render(summary, a.logs, png.name))
    print(a.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
