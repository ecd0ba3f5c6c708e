"""Speculation policies under closed-loop load: TPOT, SLO attainment, acceptance, draft length.

    python benchmarks/policies_closed_loop.py                       # embedded pair, built-in prompts
    python benchmarks/policies_closed_loop.py \\
        --prompts ../shared/data/spec-bench/origin-spec-bench.jsonl --tpot-slo-ms 60

Closed loop: at concurrency c, c requests are in flight at every moment; when one finishes the next
prompt is sent. Every policy sees the same prompts in the same order at every level. Output length
rule: a fixed --max-tokens per request, greedy, ignore_eos (Spec-Bench carries no lengths). Prompts
longer than --max-prompt-tokens keep their first tokens. Each policy is warmed up on
--warmup-requests requests and keeps what it learned across levels (as a server would); every
measured run gets a freshly built engine around it (engine instances alive side by side ran
same-shape forwards at different speeds).
Levels run in order, and within a level the policies take turns (order rotated per --repeats), so
slow phases of a shared machine fall on all policies alike; the report quotes the per-repeat
spread and, per level, adaspec's mean TPOT over each other policy's repeat by repeat (geometric mean
with a 95% bootstrap interval: the comparison that drift across repeats does not swamp; pool several
reports with benchmarks/paired_ratios.py).

Metrics follow vLLM's benchmark: TPOT per request = (E2E - TTFT) / (output tokens - 1); SLO
attainment = share of requests whose TPOT is within the TPOT SLO (and TTFT within --ttft-slo-ms if
given). Acceptance rate = accepted / drafted; mean speculation length = drafted tokens per
verification step per request. The TPOT SLO defaults to --slo-factor (1.5) x the median TPOT of no
speculation at concurrency 1 (measured first). Also reported: each model-based policy's
predicted-vs-measured step time error, and the acceptance model's calibration (ECE, Brier) against
the raw draft probability, replayed from engine telemetry. Writes docs/policies_closed_loop.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from adaspec import SamplingParams, __version__
from adaspec.bench.closed_loop import load_prompts, run_level
from adaspec.bench.metrics import paired_ratio
from adaspec.bench.report import git_commit
from adaspec.engine.sequence import SLO
from adaspec.llm import DEFAULT_PAIR, build_engine
from adaspec.spec.acceptance import (
    RANK_WEIGHTS,
    lookahead_by_rank,
    measure_calibration,
    outcomes_from_telemetry,
)
from adaspec.spec.decisions import compact

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("none,static:1,static:3,static:5,threshold,smartspec,adaspec-drafter,adaspec-noslo,"
            "adaspec-always,adaspec")


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (policy, concurrency): request-weighted means over the repeats, the worst P99,
    and the per-repeat mean TPOTs (their min-max range is the spread the report quotes)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["policy"], r["concurrency"]), []).append(r)
    out = []
    for (policy, c), rs in groups.items():
        n = sum(r["requests"] for r in rs)
        row = {**rs[-1], "policy": policy, "concurrency": c, "requests": n,
               "failed": sum(r["failed"] for r in rs), "duration_s": sum(r["duration_s"] for r in rs),
               "output_tokens": sum(r["output_tokens"] for r in rs)}
        row["throughput_tok_s"] = row["output_tokens"] / row["duration_s"]
        for key in ("tpot_mean_ms", "ttft_mean_ms", "slo_attainment", "acceptance_rate",
                    "mean_acceptance_length", "mean_speculation_length"):
            row[key] = sum(r[key] * r["requests"] for r in rs) / n
        row["tpot_median_ms"] = statistics.median(r["tpot_median_ms"] for r in rs)
        row["tpot_p99_ms"] = max(r["tpot_p99_ms"] for r in rs)
        row["ttft_p99_ms"] = max(r["ttft_p99_ms"] for r in rs)
        row["tpot_mean_by_repeat_ms"] = [r["tpot_mean_ms"] for r in rs]
        row["repeats"] = len(rs)
        row.pop("repeat", None)
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_PAIR / "target"))
    ap.add_argument("--draft-model", default=str(DEFAULT_PAIR / "draft"))
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PAIR / "prompts.jsonl",
                    help="Spec-Bench JSONL (read in place, never copied); default: built-in held-out prompts")
    ap.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--requests-per-level", type=int, help="default: max(8, 2 x concurrency)")
    ap.add_argument("--max-tokens", type=int, default=128, help="fixed output length per request")
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--tpot-slo-ms", type=float, help="default: --slo-factor x median TPOT of 'none' at c=1")
    ap.add_argument("--slo-factor", type=float, default=1.5)
    ap.add_argument("--ttft-slo-ms", type=float)
    ap.add_argument("--num-speculative-tokens", type=int, default=8)
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--reprofile", action="store_true")
    ap.add_argument("--save-decisions", type=Path, help="directory for each policy's decision log (JSONL)")
    ap.add_argument("--export-telemetry", type=Path,
                    help="directory for each engine's step telemetry (JSONL)")
    ap.add_argument("--warmup-requests", type=int, default=8,
                    help="requests each engine serves (all at once) before measuring: compiled paths "
                         "and, for learning policies, first acceptance and step-time observations")
    ap.add_argument("--warmup-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every level this many times (policy order rotated); the report gives the "
                         "pooled figures and the spread of the per-repeat mean TPOT")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "policies_closed_loop")
    a = ap.parse_args(argv)
    if not a.prompts.exists():
        ap.error(f"no prompt file at {a.prompts}; pass --prompts PATH (Spec-Bench JSONL)")
    commit = git_commit() or "unknown"  # the code this run loads (the tree may change while it runs)
    levels = [int(c) for c in a.concurrency.split(",")]
    policies = a.policies.split(",")
    kw = dict(model=a.model, draft_model=a.draft_model, num_speculative_tokens=a.num_speculative_tokens,
              max_num_seqs=max(levels), max_model_len=a.max_model_len, dtype=a.dtype)

    def engine_for(policy, slo_ms: float | None):
        return build_engine(policy=policy, slo_tpot_ms=slo_ms, slo_ttft_ms=a.ttft_slo_ms,
                            reprofile=a.reprofile, **kw)

    slo_ms = a.tpot_slo_ms
    limit = None
    prompt_ids: list[list[int]] = []

    def prepare(engine, requests: int, tokens: int) -> None:
        nonlocal limit, prompt_ids
        if not prompt_ids:
            limit = min(a.max_prompt_tokens, engine.max_model_len - a.max_tokens - 1)
            tok = engine.tokenizer
            prompt_ids = [tok(p)["input_ids"][:limit] for p in load_prompts(a.prompts, a.num_prompts)]
        warm = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        for p in prompt_ids[-requests:]:  # the last prompts: the first ones are measured first
            engine.add_request(p, warm)
        while engine.has_unfinished():
            engine.step()

    results = []
    if slo_ms is None:  # the SLO is relative to plain decoding on this machine
        engine = engine_for("none", None)
        prepare(engine, a.warmup_requests, a.warmup_tokens)
        base = run_level(engine, prompt_ids, 1, a.requests_per_level or 8, a.max_tokens,
                         a.temperature, SLO())
        slo_ms = a.slo_factor * base["tpot_median_ms"]
        print(f"TPOT SLO: {slo_ms:.1f} ms ({a.slo_factor}x the median TPOT of 'none' at concurrency 1)",
              flush=True)
        del engine
        gc.collect()
    slo = SLO(slo_ms / 1e3, None if a.ttft_slo_ms is None else a.ttft_slo_ms / 1e3)
    # Every policy keeps its own policy object for the whole run (it learns across levels, as a
    # server would), but each measured run gets a freshly built engine, the previous one freed
    # first: with nine engines alive at once, measured forwards of the same shape differed by up to
    # ~20% between engine instances (memory placement), which would have been charged to policies.
    # Levels are the outer loop and the policies take turns within a level, in an order rotated
    # per repeat, so a slow phase of a shared machine hits them alike, not one policy.
    policy_objs: dict = {}
    telemetry: dict = {name: [] for name in policies}
    per_request: list[dict] = []

    def fresh_engine(name: str):
        engine = engine_for(policy_objs.get(name, name), slo_ms)
        if name not in policy_objs:
            policy_objs[name] = engine.policy
            prepare(engine, a.warmup_requests, a.warmup_tokens)
        else:
            prepare(engine, 1, 4)  # first-call work of the new engine, outside the measurement
        return engine

    for name in policies:  # profile (if needed) and warm every policy up once
        del_engine = fresh_engine(name)
        del del_engine
        gc.collect()
    if a.save_decisions is not None:
        a.save_decisions.mkdir(parents=True, exist_ok=True)
        for name in policies:
            (a.save_decisions / f"{name.replace(':', '_')}.jsonl").unlink(missing_ok=True)
    for rep in range(a.repeats):
        for c in levels:
            for k in range(len(policies)):
                name = policies[(k + rep) % len(policies)]
                engine = fresh_engine(name)
                cm = getattr(engine.policy, "cost_model", None)
                seen = cm.observed_steps if cm is not None else 0
                first_step = len(engine.telemetry)
                row = {"policy": name, "repeat": rep,
                       **run_level(engine, prompt_ids, c, a.requests_per_level or max(8, 2 * c),
                                   a.max_tokens, a.temperature, slo)}
                per_request += [{"policy": name, "concurrency": c, "repeat": rep, **r}
                                for r in row.pop("per_request")]
                if cm is not None:
                    row["step_time_error"] = cm.error_report(last=cm.observed_steps - seen)
                results.append(row)
                telemetry[name] += list(engine.telemetry)[first_step:]
                print(f"[{rep}] {name:>15} c={c:>2}: TPOT mean {row['tpot_mean_ms']:7.1f} ms, "
                      f"p99 {row['tpot_p99_ms']:7.1f}, SLO {row['slo_attainment']:.2f}, "
                      f"acceptance {row['acceptance_rate']:.2f}, "
                      f"spec length {row['mean_speculation_length']:.2f}", flush=True)
                log = getattr(engine.policy, "log", None)
                if a.save_decisions is not None and log is not None:
                    with open(a.save_decisions / f"{name.replace(':', '_')}.jsonl", "a") as f:
                        for rec in log.records:
                            f.write(json.dumps({**compact(rec), "concurrency": c, "repeat": rep}) + "\n")
                    log.records.clear()
                del engine
                gc.collect()
    if a.export_telemetry is not None:  # e.g. for `adaspec simulate --acceptance empirical:FILE`
        a.export_telemetry.mkdir(parents=True, exist_ok=True)
        for name, records in telemetry.items():
            with open(a.export_telemetry / f"{name.replace(':', '_')}.jsonl", "w") as f:
                for rec in records:
                    f.write(json.dumps(asdict(rec)) + "\n")
    extra: dict = {}
    for name, policy in policy_objs.items():
        cm = getattr(policy, "cost_model", None)
        outcomes = outcomes_from_telemetry(telemetry[name])
        extra[name] = {"calibration_from_telemetry": measure_calibration(outcomes)}
        if name.startswith("static:"):  # every request verifies drafts in every step: the look-ahead's test
            extra[name]["lookahead_by_rank"] = {
                f"{w:g}": lookahead_by_rank(outcomes, min_batch=8, weight=w) for w in RANK_WEIGHTS}
        if hasattr(policy, "describe"):
            extra[name]["policy"] = {k: v for k, v in policy.describe().items() if k != "cost_model"}
        if cm is not None:
            extra[name]["step_time_error"] = cm.error_report()
    results = aggregate(results)

    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                       f"{platform.python_version()}, torch {torch.__version__}",
            "adaspec": __version__, "commit": commit, "model": a.model,
            "draft_model": a.draft_model,
            "prompts": str(a.prompts), "num_prompts": len(prompt_ids), "max_prompt_tokens": limit,
            "output_length_rule": f"fixed {a.max_tokens} tokens, ignore_eos", "temperature": a.temperature,
            "tpot_slo_ms": slo_ms, "ttft_slo_ms": a.ttft_slo_ms, "K": a.num_speculative_tokens,
            "closed_loop": "concurrency c: c requests in flight; a finished request is replaced at once",
            "repeats": a.repeats, "warmup": f"{a.warmup_requests} requests x {a.warmup_tokens} tokens",
            "requests_file": a.out.with_suffix(".requests.jsonl").name}
    res = {"meta": meta, "results": results, "per_policy": extra,
           "attainment_by_slo": attainment_by_slo(per_request, slo_ms)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out.with_suffix(".requests.jsonl"), "w") as f:  # who missed, and with what acceptance
        for r in per_request:
            f.write(json.dumps(r) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    a.out.with_suffix(".md").write_text(render(res, levels, policies))
    print(f"wrote {a.out.with_suffix('.md')}")
    return 0


SLO_SCALES = (0.8, 0.9, 1.0, 1.2, 1.5)


def attainment_by_slo(per_request: list[dict], slo_ms: float) -> dict:
    """Per policy and level: the share of requests whose TPOT is within each of a few multiples of
    the run's SLO. Only the 1.0 column is what adaspec aimed at (it was told that SLO); the others say
    how far a ranking holds for the baselines, whose choices do not depend on the SLO. Failed or
    unmeasurable requests count as misses."""
    out: dict = {}
    for r in per_request:
        out.setdefault(r["policy"], {}).setdefault(str(r["concurrency"]), []).append(r["tpot_ms"])
    return {p: {c: {f"{m:g}": sum(1 for t in v if t <= m * slo_ms) / len(v) for m in SLO_SCALES}
                for c, v in by_c.items()} for p, by_c in out.items()}


def paired_lines(by: dict, c: int, policies: list[str], reference: str = "adaspec") -> list[str]:
    """The reference policy against each other one, repeat by repeat (`paired_ratio`): the policies
    take turns within a repeat, so each pair shares the machine's state of those minutes."""
    ref = by.get((reference, c))
    if ref is None or len(ref.get("tpot_mean_by_repeat_ms", [])) < 2:
        return []
    cells = []
    for p in policies:
        other = by.get((p, c))
        if p == reference or other is None:
            continue
        r = paired_ratio(ref["tpot_mean_by_repeat_ms"], other["tpot_mean_by_repeat_ms"])
        if r is not None:
            lo, hi = r["ci95"]
            cells.append(f"{p} {r['geomean']:.2f} ({lo:.2f}-{hi:.2f}; lower in {r['lower']} of {r['pairs']})")
    return [f"Paired mean TPOT, {reference} / each policy (geometric mean over repeats, 95% bootstrap "
            f"interval; {reference} lower in w of n repeats): " + "; ".join(cells) + ".", ""] if cells else []


def render(res: dict, levels: list[int], policies: list[str]) -> str:
    m = res["meta"]
    lines = ["# Speculation policies under closed-loop load", "", f"Command: `{m['command']}`  ",
             f"Machine: {m['machine']}; adaspec {m['adaspec']} ({m['commit']}).  ",
             f"Prompts: {m['prompts']} ({m['num_prompts']}, at most {m['max_prompt_tokens']} tokens); "
             f"output: {m['output_length_rule']}; temperature {m['temperature']}; K={m['K']}.  ",
             f"TPOT SLO {m['tpot_slo_ms']:.1f} ms" + (f", TTFT SLO {m['ttft_slo_ms']} ms" if m["ttft_slo_ms"]
                                                     else "") + f". {m['closed_loop']}.", ""]
    by = {(r["policy"], r["concurrency"]): r for r in res["results"]}
    for c in levels:
        base = by.get(("none", c))
        lines += [f"## Concurrency {c}", "",
                  "| policy | TPOT mean (ms) (range over repeats) | median | P99 | speedup | SLO att. | "
                  "accept. rate | spec. length | tok/s | step-time error |", "|---|" + "---|" * 9]
        for p in policies:
            r = by.get((p, c))
            if r is None:
                continue
            speed = f"{base['tpot_mean_ms'] / r['tpot_mean_ms']:.2f}x" if base else "-"
            err = r.get("step_time_error", {})
            err_s = f"{100 * err['mape']:.0f}%" if err.get("steps") else "-"
            by_rep = r.get("tpot_mean_by_repeat_ms", [])
            spread = f" ({min(by_rep):.1f}-{max(by_rep):.1f})" if len(by_rep) > 1 else ""
            lines.append(f"| {p} | {r['tpot_mean_ms']:.1f}{spread} | {r['tpot_median_ms']:.1f} | "
                         f"{r['tpot_p99_ms']:.1f} | {speed} | {r['slo_attainment']:.2f} | "
                         f"{r['acceptance_rate']:.2f} | "
                         f"{r['mean_speculation_length']:.2f} | {r['throughput_tok_s']:.1f} | {err_s} |")
        lines.append("")
        lines += paired_lines(by, c, policies)
    att = res.get("attainment_by_slo") or {}
    if att:
        lines += ["## SLO attainment at multiples of the SLO", "",
                  f"From the per-request TPOTs (`{Path(m.get('requests_file', 'requests.jsonl')).name}`). "
                  "Only the 1.0 column is the SLO adaspec was told; the baselines do not depend on it.", "",
                  "| c | policy | " + " | ".join(f"{x:g} x" for x in SLO_SCALES) + " |",
                  "|---|---|" + "---|" * len(SLO_SCALES)]
        for c in levels:
            for p in policies:
                row = att.get(p, {}).get(str(c))
                if row:
                    lines.append(f"| {c} | {p} | " + " | ".join(f"{row[f'{x:g}']:.2f}" for x in SLO_SCALES)
                                 + " |")
        lines.append("")
    lines += ["## Acceptance-model calibration (replayed from engine telemetry)", "",
              "| run | verified positions | ECE ours | ECE raw q | Brier ours | Brier raw q |",
              "|---|---|---|---|---|---|"]
    for p in policies:
        cal = res["per_policy"].get(p, {}).get("calibration_from_telemetry")
        if cal and cal["ours"]["n"]:
            o, r = cal["ours"], cal["raw_draft_probability"]
            lines.append(f"| {p} | {o['n']} | {o['ece']:.3f} | {r['ece']:.3f} | {o['brier']:.3f} | "
                         f"{r['brier']:.3f} |")
    ranks = {(p, w): gs for p in policies
             for w, gs in (res["per_policy"].get(p, {}).get("lookahead_by_rank") or {}).items() if gs}
    if ranks:
        lines += ["", "Look-ahead acceptance by rank (`adaspec.spec.acceptance.lookahead_by_rank`): steps at "
                  "batch >= 8 of a static policy, requests ranked within each step by the accepted tokens "
                  "the look-ahead predicts for their drafts, in fifths (0: most confident); predicted / "
                  "accepted per request-step, for each prior weight the plan's look-ahead may learn to use "
                  "(`AcceptanceModel.rank_weight`). The plan leaves out the bottom of this ranking.", "",
                  "| run | weight | " + " | ".join(f"group {g['group']}" for g in next(iter(ranks.values())))
                  + " |", "|---|---|" + "---|" * len(next(iter(ranks.values())))]
        for (p, w), gs in ranks.items():
            cells = " | ".join(f"{g['predicted']:.2f} / {g['accepted']:.2f}" for g in gs)
            lines.append(f"| {p} | {w} | {cells} |")
    lines += ["", "Step-time error: mean absolute relative error of the online cost model's predicted "
              "step time against the measured one, over that level's steps. Speedup: TPOT of no "
              "speculation over the policy's, at the same concurrency.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
