"""A policy's own time per decode step, by method, inside the engine's closed loop.

    python benchmarks/policy_overhead.py --policies adaspec,static:3 --concurrency 1,4,32

The policy's decisions run on the same CPU cores as the forwards, between them, so every
millisecond here is a millisecond of every request's TPOT. Per policy and concurrency: a warm-up
level, then a measured one (3 x c requests, at least 8, of 96 tokens on the built-in prompts), with
the policy's `plan`, `keep_drafting`, `prune` and `observe` timed around each call, and for the
learning policies their main parts (the plan's grid, the acceptance model's learning and rank
weight scoring, the cost model's correction, the predictions `observe` logs and scores). `observe`
runs after the engine has measured the step (its time is not in the telemetry's step time, it is in
the gap before the next step). Small numpy and Python calls between large forwards run several
times slower than the same calls in a loop on their own (cold caches): measure them here, not in
isolation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

from adaspec.bench import closed_loop
from adaspec.engine.sequence import SLO
from adaspec.llm import build_engine
from adaspec.spec import acceptance, adaspec_policy, cost_model

DECISIONS = ("plan", "keep_drafting", "prune", "observe")
PARTS = ((adaspec_policy, "continuation_grid", "plan: continuation_grid"),
         (acceptance.AcceptanceModel, "unseen_table", "plan: unseen_table"),
         (acceptance.AcceptanceModel, "observe_step", "observe: AcceptanceModel.observe_step"),
         (acceptance.AcceptanceModel, "_score_rank_weights", "observe: ... of which _score_rank_weights"),
         (cost_model.CostModel, "observe", "observe: CostModel.observe"),
         (acceptance.AcceptanceModel, "predictions", "observe: predictions (logged and scored)"))


class Clock:
    """Seconds and calls per label, from wrappers put around functions and methods."""

    def __init__(self):
        self.seconds, self.calls = Counter(), Counter()

    def timed(self, fn, label: str):
        """`fn`, timed under `label`."""
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[label] += time.perf_counter() - t
                self.calls[label] += 1

        return timed

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="adaspec,static:3")
    ap.add_argument("--concurrency", default="1,4,32")
    ap.add_argument("--max-tokens", type=int, default=96)
    closed_loop.add_pair_args(ap)
    ap.add_argument("--out", type=Path, help="also write OUT.json")
    a = ap.parse_args(argv)
    clock = Clock()
    with ExitStack() as patches:  # class and module attributes, put back on the way out
        for owner, name, label in PARTS:
            patches.enter_context(mock.patch.object(owner, name, clock.timed(getattr(owner, name), label)))
        results = measure(a, clock)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        args = sys.argv[1:] if argv is None else argv
        command = "python benchmarks/policy_overhead.py " + " ".join(args)
        a.out.with_suffix(".json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    return 0


def measure(a: argparse.Namespace, clock: Clock) -> list[dict]:
    """Per policy and level: the closed loop's decode steps, and the clock's time per step."""
    prompts_text = closed_loop.load_prompts(a.prompts, None)
    slo = SLO(tpot=0.1)
    results = []
    for policy in a.policies.split(","):
        levels = [int(c) for c in a.concurrency.split(",")]
        engine = build_engine(a.model, a.draft_model, policy=policy, slo_tpot_ms=100,
                              max_num_seqs=max(levels))
        limit = min(a.max_prompt_tokens, engine.max_model_len - a.max_tokens - 1)
        prompts = [engine.tokenizer(p)["input_ids"][:limit] for p in prompts_text]
        for name in DECISIONS:  # the instance's bound methods
            setattr(engine.policy, name, clock.timed(getattr(engine.policy, name), name))
        for c in levels:
            # warm-up
            closed_loop.run_level(engine, prompts[-16:], c, max(8, c), min(32, a.max_tokens), 0.0, slo)
            clock.clear()
            run = closed_loop.run_level(engine, prompts, c, max(8, 3 * c), a.max_tokens, 0.0, slo)
            steps = max(run["decode_steps"], 1)
            per_step = {k: round(1e3 * v / steps, 3) for k, v in clock.seconds.items()}
            decisions = sum(per_step.get(k, 0.0) for k in DECISIONS)
            row = {"policy": policy, "concurrency": c, "decode_steps": steps,
                   "tpot_mean_ms": round(run["tpot_mean_ms"], 2),
                   "decisions_ms_per_step": round(decisions, 3), "ms_per_step": per_step,
                   "calls_per_step": {k: round(v / steps, 2) for k, v in clock.calls.items()}}
            results.append(row)
            print(f"{policy} c={c}: {decisions:.2f} ms a step in plan/keep_drafting/prune/observe "
                  f"(mean TPOT {run['tpot_mean_ms']:.1f} ms, {steps} decode steps)")
            for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]):
                print(f"    {k:40s} {v:7.3f} ms  ({row['calls_per_step'][k]:.2f} calls)")
    return results


if __name__ == "__main__":
    sys.exit(main())
