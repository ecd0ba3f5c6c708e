"""`adaspec demo`: the server under a bursty trace, with no speculation, a static k and adaspec.

Runs on the embedded pair with its built-in prompts and a synthetic arrival trace (a quiet phase,
then a burst), so it needs no external data: one `adaspec serve` process per policy, the same
requests at the same times, then the comparison table and the report folder (plots included).
The TPOT SLO is 1.5x the no-load TPOT measured on the first policy's warm-up requests, so it means
the same thing on any machine.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from adaspec.llm import DEFAULT_PAIR

DEMO_POLICIES = "none,static:3,adaspec"
# ~12 requests over 24 s, then ~28 in 8 s: light load, then a burst that builds a queue.
DEMO_ARRIVALS = "phases:0.5@24,3.5@8"


def builtin_prompts(n: int) -> list[str]:
    """Held-out prompts shipped with the embedded pair (Spec-Bench row format)."""
    rows = [json.loads(line) for line in (DEFAULT_PAIR / "prompts.jsonl").read_text().splitlines()]
    return [r["turns"][0] for r in rows[:n]]


def add_demo_args(d) -> None:
    from adaspec.bench.cli import tpot_slo

    d.add_argument("--model", help="target model directory (default: the embedded pair)")
    d.add_argument("--draft-model", help="draft model directory")
    d.add_argument("--policies", default=DEMO_POLICIES)
    d.add_argument("--arrivals", default=DEMO_ARRIVALS,
                   help="poisson:RATE, gamma:RATE:CV or phases:RATE@SECONDS,...[:CV]")
    d.add_argument("--num-requests", type=int, help="keep only the first N requests")
    d.add_argument("--output-len", default="fixed:48", help="eos:CAP, fixed:N or sampled:MEAN[:CV]")
    d.add_argument("--prompts", default="builtin", help="builtin, synthetic[:N] or a Spec-Bench JSONL path")
    d.add_argument("--slo-tpot-ms", default="auto:1.5", type=tpot_slo,
                   help="TPOT SLO in ms, or auto:F = F x the no-load TPOT of the first policy")
    d.add_argument("--num-speculative-tokens", type=int, default=8)
    d.add_argument("--max-model-len", type=int)
    d.add_argument("--threads", type=int, help="server threads (default: torch's)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--quiet", action="store_true")


def pair_missing(a) -> str | None:
    if a.model:
        return None if Path(a.model, "config.json").exists() else f"--model {a.model}: no config.json there"
    missing = [n for n in ("target", "draft") if not (DEFAULT_PAIR / n / "config.json").exists()]
    if missing:
        return (f"the embedded model pair is missing ({', '.join(str(DEFAULT_PAIR / n) for n in missing)}). "
                "Train it with `python -m adaspec.train`, or pass --model and --draft-model.")
    return None


def run_demo(a) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from adaspec.bench.sweep import Sweep, SweepConfig

    console = Console()
    problem = pair_missing(a)
    if problem:
        console.print(f"[red]adaspec demo: {problem}")
        return 1
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    cfg = SweepConfig(
        policies=policies, output_dir=a.output_dir, model=a.model, draft_model=a.draft_model,
        num_speculative_tokens=a.num_speculative_tokens, max_model_len=a.max_model_len, threads=a.threads,
        prompts=a.prompts, arrivals=a.arrivals, num_requests=a.num_requests, output_len=a.output_len,
        seed=a.seed, slo_tpot_ms=a.slo_tpot_ms, warmup=3, quiet=a.quiet,
        command=shlex.join(["adaspec", *sys.argv[1:]]))
    sweep = Sweep(cfg)
    w = sweep.workload.description
    console.print(f"[bold]adaspec demo[/]: {w['num_requests']} requests, {w['arrivals']}; "
                  f"{w['output_len']}; policies {', '.join(policies)}; one server per policy")
    try:
        report = sweep.run()
    except RuntimeError as exc:
        console.print(f"[red]adaspec demo: {exc}")
        return 1
    texts: dict[str, dict[int, str]] = {}
    for line in (sweep.out / "requests.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts.setdefault(row["policy"], {})[row["index"]] = row["text"]
    ref = texts.get(policies[0], {})

    slo = sweep.slo_tpot_ms
    title = "adaspec demo: quiet phase, then a burst" + (f"; TPOT SLO {slo:.1f} ms" if slo else "")
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for col in ("policy", "TPOT\nmean ms", "TPOT\np99 ms", "TTFT\np99 ms", "output\ntok/s", "SLO\nmet",
                "accept\nlength", "draft\nlength"):
        table.add_column(col, justify="right", min_width=max(map(len, policies)) if col == "policy" else None)

    def f(v, d=1):
        return "-" if v is None else f"{v:.{d}f}"

    same = []
    for r in sweep.runs:
        sp, t = r["spec"], texts.get(r["policy"], {})
        same.append(f"{r['policy']} {sum(1 for i, x in t.items() if ref.get(i) == x)}/{len(t)}")
        table.add_row(r["policy"], f(r["tpot_ms"]["mean"]), f(r["tpot_ms"]["p99"]), f(r["ttft_ms"]["p99"]),
                      f(r["output_throughput"]), f(r["slo"]["attainment"], 2), f(sp["acceptance_length"], 2),
                      f(sp["mean_spec_length"], 2))
    console.print(table)
    console.print(f"Requests with the same greedy output as {policies[0]}: " + ", ".join(same))
    failed = sum(r["failed"] for r in sweep.runs)
    if failed:
        console.print(f"[yellow]{failed} requests failed; see {sweep.out / 'requests.jsonl'}")
    console.print(f"Plots: {sweep.out / 'timeline.png'} (arrivals, throughput and draft length over "
                  f"time), {sweep.out / 'tpot_cdf.png'}, {sweep.out / 'slo_vs_level.png'}", soft_wrap=True)
    console.print(f"Report: {report}", soft_wrap=True)
    if sweep.failed_policies:
        console.print(f"[red]No results for {', '.join(sweep.failed_policies)}: the server did not start "
                      f"(see {sweep.out}/server-*.log)")
        return 1
    return 0
