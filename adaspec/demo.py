"""`adaspec demo`: the same batch of prompts through each policy, side by side.

Runs on the embedded pair with its built-in held-out prompts, so it needs no external data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from adaspec.llm import DEFAULT_PAIR


def builtin_prompts(n: int) -> list[str]:
    """Held-out prompts shipped with the embedded pair (Spec-Bench row format)."""
    rows = [json.loads(line) for line in (DEFAULT_PAIR / "prompts.jsonl").read_text().splitlines()]
    return [r["turns"][0] for r in rows[:n]]


def run_policies(policies: list[str], prompts: list[str], max_tokens: int, engine_kwargs: dict,
                 progress=None) -> list[dict]:
    """Greedy generation of all prompts per policy; returns one summary row per policy."""
    from adaspec import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    rows, reference = [], None
    for name in policies:
        llm = LLM(**{**engine_kwargs, "policy": name})
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4))  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for o in outs)
        steps = sum(o.spec_stats["steps"] for o in outs)
        drafted = sum(o.spec_stats["drafted"] for o in outs)
        accepted = sum(o.spec_stats["accepted"] for o in outs)
        ids = [o.token_ids for o in outs]
        reference = reference or ids
        rows.append({
            "policy": name, "tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed,
            "acceptance_length": 1 + accepted / steps if steps else 1.0,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "identical_to_first": ids == reference,
        })
        if progress:
            progress(rows[-1])
    base = rows[0]["tok_per_s"]
    for r in rows:
        r["speedup"] = r["tok_per_s"] / base
    return rows


def run_demo(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from adaspec.cli import engine_kwargs

    console = Console()
    kw = engine_kwargs(args)
    if kw["model"] is None and not (Path(DEFAULT_PAIR) / "target").exists():
        console.print("[red]The embedded pair is missing; train it with `python -m adaspec.train`.")
        return 1
    prompts = builtin_prompts(args.num_prompts)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    console.print(f"{len(prompts)} held-out prompts, {args.max_tokens} tokens each (greedy), "
                  f"batch of {len(prompts)}; policies: {', '.join(policies)}")
    rows = run_policies(policies, prompts, args.max_tokens, kw,
                        progress=lambda r: console.print(f"  {r['policy']}: {r['tok_per_s']:.1f} tok/s"))
    table = Table(title="adaspec demo (embedded pair, this machine)")
    for col in ("policy", "tokens/s", "acceptance length", "acceptance rate", "speedup vs first",
                "same tokens"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["policy"], f"{r['tok_per_s']:.1f}", f"{r['acceptance_length']:.2f}",
                      f"{r['acceptance_rate']:.2f}", f"{r['speedup']:.2f}x",
                      "yes" if r["identical_to_first"] else "NO")
    console.print(table)
    return 0 if all(r["identical_to_first"] for r in rows) else 1
