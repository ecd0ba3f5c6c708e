"""What a policy's decisions cost the step, forwards included: the policy computes, the engine runs a
baseline's shapes.

    python benchmarks/decision_cost.py --policy adaspec --baseline static:3 --concurrency 4,16 --repeats 4

Two engines run the same closed loop (built-in prompts, c requests in flight, 2 x c requests of
--max-tokens each), taking turns (order alternated per repeat). One runs the baseline policy. The
other runs a shadow: the policy under test makes every decision (plan, keep_drafting, prune,
observe) on the real batches, but the engine drafts and verifies what the baseline decides. Both
engines then run the same shapes, so the difference in step time is the decisions' whole cost:
their own Python time and what it does to the forwards around it (cache and thread effects that
`policy_overhead.py`, which times the calls alone, cannot see). Reported per level: medians over
repeats of the per-run median step, verify and draft time over decode steps at batch c with every
request at the baseline's depth, and the mean gap between consecutive decode steps (`observe` runs
there, after the engine has timed the step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from adaspec.bench import closed_loop
from adaspec.engine.sequence import SLO
from adaspec.llm import build_engine


class Shadow:
    """The policy under test decides; the baseline's decisions are what the engine runs."""

    def __init__(self, policy, baseline):
        self.policy, self.baseline = policy, baseline
        self.name = f"shadow({policy.name})"
        self.uses_draft = True

    def plan(self, batch):
        self.policy.plan(batch)
        return self.baseline.plan(batch)

    def keep_drafting(self, batch, active):
        self.policy.keep_drafting(batch, list(active))
        return self.baseline.keep_drafting(batch, active)

    def prune(self, batch):
        self.policy.prune(batch)
        return self.baseline.prune(batch)

    def observe(self, outcome):
        self.policy.observe(outcome)
        self.baseline.observe(outcome)


def step_figures(telemetry, batch_size: int) -> dict | None:
    """Medians over the decode steps at `batch_size` where every request verified the same number of
    drafts (the baseline's depth), and the mean gap between consecutive decode steps (ms)."""
    recs = [r for r in telemetry if r.kind == "decode"]
    uniform = [r for r in recs if r.batch_size == batch_size and r.drafted and len(set(r.drafted)) == 1
               and r.drafted[0] > 0]
    if not uniform:
        return None
    gaps = [b.start - a.start - a.step_time for a, b in zip(recs, recs[1:], strict=False)]
    gaps = [g for g in gaps if 0 <= g < 0.05]  # a prefill or an idle wait is not a decision's gap
    ms = lambda v: round(1e3 * v, 3)  # noqa: E731
    return {"steps": len(uniform), "step_ms": ms(statistics.median(r.step_time for r in uniform)),
            "verify_ms": ms(statistics.median(r.verify_time for r in uniform)),
            "draft_ms": ms(statistics.median(r.draft_time for r in uniform)),
            "gap_ms": ms(statistics.mean(gaps)) if gaps else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="adaspec")
    ap.add_argument("--baseline", default="static:3")
    ap.add_argument("--concurrency", default="4,16")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    closed_loop.add_pair_args(ap)
    ap.add_argument("--out", type=Path, help="also write OUT.json")
    a = ap.parse_args(argv)
    levels = [int(c) for c in a.concurrency.split(",")]
    engines = {}
    for role in ("baseline", "shadow"):
        engine = build_engine(a.model, a.draft_model, policy=a.baseline, slo_tpot_ms=100,
                              max_num_seqs=max(levels))
        if role == "shadow":
            tested = build_engine(a.model, a.draft_model, policy=a.policy, slo_tpot_ms=100,
                                  max_num_seqs=max(levels)).policy  # with its profiled cost model
            engine.policy = Shadow(tested, engine.policy)
        engines[role] = engine
    text = closed_loop.load_prompts(a.prompts, None)
    limit = min(a.max_prompt_tokens, engines["baseline"].max_model_len - a.max_tokens - 1)
    prompts = [engines["baseline"].tokenizer(p)["input_ids"][:limit] for p in text]
    slo = SLO(tpot=0.1)
    results = []
    for c in levels:
        for engine in engines.values():  # warm-up: compiled paths, the policy's first observations
            closed_loop.run_level(engine, prompts[-16:], c, max(8, c), min(32, a.max_tokens), 0.0, slo)
        runs = {role: [] for role in engines}
        for rep in range(a.repeats):
            for role in (list(engines) if rep % 2 == 0 else list(engines)[::-1]):
                engine = engines[role]
                engine.telemetry.clear()
                closed_loop.run_level(engine, prompts, c, 2 * c, a.max_tokens, 0.0, slo)
                fig = step_figures(engine.telemetry, c)
                if fig is not None:
                    runs[role].append(fig)
        row = {"concurrency": c}
        for role, figs in runs.items():
            row[role] = {k: round(statistics.median(f[k] for f in figs), 3)
                         if figs and all(f[k] is not None for f in figs) else None
                         for k in ("step_ms", "verify_ms", "draft_ms", "gap_ms")}
            row[role]["runs"] = len(figs)
        base, shadow = row["baseline"], row["shadow"]
        if base["step_ms"] and shadow["step_ms"]:
            row["step_ratio"] = round(shadow["step_ms"] / base["step_ms"], 4)
        results.append(row)
        print(f"c={c}: {a.baseline} step {base['step_ms']} ms (verify {base['verify_ms']}, draft "
              f"{base['draft_ms']}, gap {base['gap_ms']}); with {a.policy} deciding alongside: step "
              f"{shadow['step_ms']} ms (verify {shadow['verify_ms']}, draft {shadow['draft_ms']}, gap "
              f"{shadow['gap_ms']}); ratio {row.get('step_ratio')}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        args = sys.argv[1:] if argv is None else argv
        a.out.with_suffix(".json").write_text(json.dumps(
            {"command": "python benchmarks/decision_cost.py " + " ".join(args), "results": results},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
