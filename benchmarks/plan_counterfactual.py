"""adaspec's plan against a fixed depth for all, on the same batches, step by step.

    python benchmarks/plan_counterfactual.py --concurrency 16,32 --repeats 2    # built-in prompts

Closed loop as `policies_closed_loop.py`, with one policy: `adaspec`, except that on every other
decode step its plan is replaced by static:k's (depth --depth for every request, drafted and
verified without per-token questions). Every step records what the plan's grid predicted for
adaspec's own choice, for depth k for all, and for the most efficient candidate (the SLO-aware rule
may give efficiency up), then what the step measured. Both kinds of step share the machine's
state of the moment and the batches the same policy left behind, so their tokens per second
compare without the drift between runs that swamps whole-run comparisons on this machine.

What it answers: whether adaspec's own choices, on its own batches, emit fewer tokens per second
than depth k for all would, and whether the grid saw that (a biased prediction) or chose so anyway
(the SLO rule). What it does not: the batches each policy would leave behind on its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from adaspec import SamplingParams
from adaspec.bench import closed_loop
from adaspec.engine.sequence import SLO
from adaspec.llm import DEFAULT_PAIR, build_engine
from adaspec.spec.adaspec_policy import AdaSpecPolicy


class AlternatingPlan(AdaSpecPolicy):
    """`adaspec` whose plan is static:k's on every other step; records each step (see module doc)."""

    def __init__(self, depth: int = 3, **kw):
        super().__init__(name="adaspec-alternating", **kw)
        self.depth = depth
        self.records: list[dict] = []
        self._plans = 0
        self._rec: dict | None = None
        self._in_plan = False

    def plan(self, batch):
        self._in_plan, self._rec = True, None
        planned = super().plan(batch)
        self._in_plan = False
        if self._rec is not None and self._rec["forced"] and self._fixed is not None:
            self._adapting = False  # static:k's step: its depth for all, no questions
            self._planned = list(self._fixed)
            return self._planned
        return planned

    def _choose(self, T, E, tokens_of, uniform=False):
        choice, checks = super()._choose(T, E, tokens_of, uniform)
        if not self._in_plan or not isinstance(T, np.ndarray) or T.ndim != 2:
            return choice, checks
        self._in_plan = False  # the plan's grid: depth h x top-m requests
        width = T.shape[1]
        fixed = min(self.depth, T.shape[0] - 1) * width + width - 1
        eff = np.asarray(E, dtype=float) / np.asarray(T, dtype=float)
        best = int(np.argmax(eff))
        self._plans += 1
        forced = self._plans % 2 == 0
        self._rec = {"batch": width - 1, "forced": forced, "choice": list(divmod(choice, width)),
                     "best": list(divmod(best, width)),
                     **{f"{k}_{v}": float(a.flat[i])
                        for k, i in (("own", choice), ("fixed", fixed), ("best", best))
                        for v, a in (("tokens", E), ("time", T))}}
        return (fixed, checks) if forced else (choice, checks)

    def observe(self, outcome):
        if self._rec is not None:
            self._rec.update(emitted=sum(outcome.accepted) + len(outcome.accepted),
                             verified=sum(outcome.drafted), step_time=outcome.step_time,
                             draft_time=outcome.draft_time, verify_time=outcome.verify_time,
                             adapting=self._adapting, drafted=list(outcome.drafted),
                             accepted=list(outcome.accepted), draft_steps=outcome.draft_steps)
            self.records.append(self._rec)
            self._rec = None
        super().observe(outcome)


def summarize(records: list[dict], lo: int, hi: int) -> dict:
    """Per kind of step (own / forced) at lo <= batch <= hi: measured and predicted tokens/s."""
    out = {}
    for kind, forced in (("own", False), ("forced", True)):
        rs = [r for r in records if r["forced"] == forced and lo <= r["batch"] <= hi]
        if not rs:
            continue
        ran = "fixed" if forced else "own"
        def tot(key: str, rs=rs) -> float:
            return sum(r[key] for r in rs)

        out[kind] = {
            "steps": len(rs),
            "measured_tok_s": tot("emitted") / tot("step_time"),
            "tokens_per_step": tot("emitted") / len(rs), "step_ms": 1e3 * tot("step_time") / len(rs),
            "draft_ms": 1e3 * tot("draft_time") / len(rs), "verify_ms": 1e3 * tot("verify_time") / len(rs),
            "predicted_tok_s": tot(f"{ran}_tokens") / tot(f"{ran}_time"),
            "grid_own_tok_s": tot("own_tokens") / tot("own_time"),
            "grid_fixed_tok_s": tot("fixed_tokens") / tot("fixed_time"),
            "grid_best_tok_s": tot("best_tokens") / tot("best_time"),
            "own_choice_is_best": sum(r["choice"] == r["best"] for r in rs),
            "own_requests_left_out": Counter(r["batch"] - r["choice"][1]
                                             for r in rs if r["choice"][0]).most_common(5),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_PAIR / "target"))
    ap.add_argument("--draft-model", default=str(DEFAULT_PAIR / "draft"))
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PAIR / "prompts.jsonl",
                    help="Spec-Bench JSONL (read in place); default: built-in held-out prompts")
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--concurrency", default="16,32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--depth", type=int, default=3, help="the forced plan's depth for every request")
    ap.add_argument("--tpot-slo-ms", type=float, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/plan_counterfactual"))
    a = ap.parse_args(argv)
    levels = [int(c) for c in a.concurrency.split(",")]
    policy = AlternatingPlan(a.depth)
    slo = SLO(a.tpot_slo_ms / 1e3)
    prompts: list[list[int]] = []
    for rep in range(a.repeats):
        for c in levels:
            engine = build_engine(a.model, a.draft_model, policy=policy, max_num_seqs=max(levels),
                                  num_speculative_tokens=a.num_speculative_tokens,
                                  max_model_len=a.max_model_len, slo_tpot_ms=a.tpot_slo_ms)
            if not prompts:
                tok = engine.tokenizer
                limit = min(a.max_prompt_tokens, engine.max_model_len - a.max_tokens - 1)
                prompts = [tok(p)["input_ids"][:limit] for p in closed_loop.load_prompts(a.prompts, None)]
            first = len(policy.records)
            for p in prompts[-8:]:  # warm-up (first-call work, first observations), not measured
                engine.add_request(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
            while engine.has_unfinished():
                engine.step()
            del policy.records[first:]
            row = closed_loop.run_level(engine, prompts, c, max(8, 2 * c), a.max_tokens, 0.0, slo)
            for r in policy.records[first:]:
                r.update(level=c, repeat=rep)
            print(f"[{rep}] c={c}: TPOT mean {row['tpot_mean_ms']:.1f} ms, "
                  f"steps {len(policy.records) - first}",
                  flush=True)
            del engine
            gc.collect()
    summary = {c: summarize([r for r in policy.records if r["level"] == c], max(1, c * 3 // 4), c)
               for c in levels}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    a.out.with_suffix(".json").write_text(json.dumps({"command": cmd, "summary": summary,
                                                      "records": policy.records}, indent=1))
    lines = [f"# adaspec's plan vs depth {a.depth} for all, alternating steps", "", f"    {cmd}", "",
             "Decode steps at batch >= 3/4 of the level. Grid: the plan's predictions on those steps.", "",
             "| c | steps | kind | measured tok/s | predicted tok/s | tokens/step | step ms | draft ms | "
             "verify ms | grid: own | grid: fixed | grid: best | own = best |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, s in summary.items():
        for kind, v in s.items():
            lines.append(f"| {c} | {v['steps']} | {kind} | {v['measured_tok_s']:.0f} | "
                         f"{v['predicted_tok_s']:.0f} | "
                         f"{v['tokens_per_step']:.1f} | {v['step_ms']:.1f} | {v['draft_ms']:.1f} | "
                         f"{v['verify_ms']:.1f} | {v['grid_own_tok_s']:.0f} | {v['grid_fixed_tok_s']:.0f} | "
                         f"{v['grid_best_tok_s']:.0f} | {v['own_choice_is_best']}/{v['steps']} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
