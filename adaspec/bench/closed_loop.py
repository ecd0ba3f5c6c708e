"""An in-process closed loop: c requests in flight on an `LLMEngine`, a finished one replaced at once.

The engine-level load the closed-loop benchmarks share (`benchmarks/policies_closed_loop.py`,
`policy_overhead.py`, `plan_counterfactual.py`, `decision_cost.py`): no server, no client, so
what it measures is the engine and its policy alone. Metrics follow vLLM's benchmark (TPOT per
request = (E2E - TTFT) / (output tokens - 1)).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from adaspec.engine.sampling import SamplingParams
from adaspec.engine.sequence import SLO


def load_prompts(path: Path, n: int | None) -> list[str]:
    """First turn of each Spec-Bench-format JSONL row (also accepts a 'prompt' field)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts = [r["turns"][0] if "turns" in r else r["prompt"] for r in rows]
    return prompts[:n] if n else prompts


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_level(engine, prompts: list[list[int]], concurrency: int, num_requests: int, max_tokens: int,
              temperature: float, slo: SLO) -> dict:
    """Keep `concurrency` requests in flight until `num_requests` have finished."""
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)
    first_step = len(engine.telemetry)
    in_flight, done, sent, prompt_of = [], [], 0, {}
    t0 = time.perf_counter()
    while len(done) < num_requests:
        while len(in_flight) < concurrency and sent < num_requests:
            seq = engine.add_request(prompts[sent % len(prompts)], params, slo=slo)
            prompt_of[id(seq)] = sent % len(prompts)
            in_flight.append(seq)
            sent += 1
        engine.step()
        for s in [s for s in in_flight if s.finished]:
            in_flight.remove(s)
            done.append(s)
    duration = time.perf_counter() - t0
    failed = [s for s in done if s.finish_reason not in ("length", "stop")]
    ok = [s for s in done if s not in failed and s.num_output_tokens > 1]
    tpot = [(s.finish_time - s.first_token_time) / (s.num_output_tokens - 1) for s in ok]
    ttft = [s.first_token_time - s.arrival_time for s in done if s.first_token_time is not None]
    met = [s for s, t in zip(ok, tpot, strict=True) if (slo.tpot is None or t <= slo.tpot)
           and (slo.ttft is None or s.first_token_time - s.arrival_time <= slo.ttft)]
    drafted = sum(s.stats.drafted for s in done)
    accepted = sum(s.stats.accepted for s in done)
    steps = sum(s.stats.steps for s in done)
    return {
        "concurrency": concurrency, "requests": len(done), "failed": len(failed),
        "duration_s": duration, "output_tokens": sum(s.num_output_tokens for s in done),
        "throughput_tok_s": sum(s.num_output_tokens for s in done) / duration,
        "tpot_mean_ms": 1e3 * statistics.fmean(tpot) if tpot else float("nan"),
        "tpot_median_ms": 1e3 * statistics.median(tpot) if tpot else float("nan"),
        "tpot_p99_ms": 1e3 * percentile(tpot, 99),
        "ttft_mean_ms": 1e3 * statistics.fmean(ttft) if ttft else float("nan"),
        "ttft_p99_ms": 1e3 * percentile(ttft, 99),
        "slo_attainment": len(met) / len(done),  # failed requests count as misses
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_acceptance_length": 1 + accepted / steps if steps else 0.0,
        "mean_speculation_length": drafted / steps if steps else 0.0,
        "decode_steps": sum(1 for r in list(engine.telemetry)[first_step:] if r.kind == "decode"),
        "per_request": [request_record(s, prompt_of[id(s)], t0) for s in done],
    }


def request_record(s, prompt: int, t0: float) -> dict:
    """One finished request: which prompt, when it ran (seconds from the level's start), its TTFT,
    TPOT and speculation counts, so that who missed an SLO can be told apart (nan: not measurable)."""
    nan = float("nan")
    first = s.first_token_time
    n = s.num_output_tokens
    return {"prompt": prompt, "prompt_tokens": s.num_prompt_tokens, "output_tokens": n,
            "arrival_s": s.arrival_time - t0, "finish_reason": s.finish_reason,
            "ttft_ms": nan if first is None else 1e3 * (first - s.arrival_time),
            "tpot_ms": 1e3 * (s.finish_time - first) / (n - 1) if first is not None and n > 1 else nan,
            "drafted": s.stats.drafted, "accepted": s.stats.accepted, "steps": s.stats.steps}


def add_pair_args(ap, max_prompt_tokens: int = 400) -> None:
    """The model pair and prompt flags of the closed-loop benchmarks (default: the embedded pair and
    its held-out prompts)."""
    from adaspec.llm import DEFAULT_PAIR

    ap.add_argument("--model", default=str(DEFAULT_PAIR / "target"))
    ap.add_argument("--draft-model", default=str(DEFAULT_PAIR / "draft"))
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PAIR / "prompts.jsonl")
    ap.add_argument("--max-prompt-tokens", type=int, default=max_prompt_tokens)
