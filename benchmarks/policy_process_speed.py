"""Does an engine process run its forwards slower under one policy than under another?

    python benchmarks/policy_process_speed.py static:3      # then: adaspec, static:3, adaspec

One engine process per policy (run them alternately, one after another): a closed loop at
concurrency 16 on the built-in prompts (32 warm-up requests, then 64 measured, 96 tokens each),
then 30 fixed forwards of 16 rows x 4 tokens (and x 1) through the target and the draft. Prints one
JSON line: wall time of the measured requests, garbage collection time and counts, prefill compute
per 100 prompt tokens, median verification time of the batch-14+ steps by verify width, and the
fixed forwards' median times. Written when the code-trace replay's adaspec servers ran slower
forwards than the others (docs/trace_replay.md, session 6): a policy that slowed its own process
(garbage, threads) would show here; the machine's drift shows as runs of either policy moving.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import torch

from adaspec.engine.runner import Row
from adaspec.engine.sampling import SamplingParams
from adaspec.engine.sequence import SLO
from adaspec.llm import build_engine

CONCURRENCY = 16


class GCClock:
    """Time spent in garbage collection, and collections per generation."""

    def __init__(self):
        self.seconds, self.counts, self._start = 0.0, [0, 0, 0], 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.counts[info["generation"]] += 1


def closed_loop(eng, prompts: list[list[int]], n: int) -> None:
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    inflight, done, sent = [], 0, 0
    while done < n:
        while len(inflight) < CONCURRENCY and sent < n:
            inflight.append(eng.add_request(prompts[sent % len(prompts)], params, slo=SLO(0.02)))
            sent += 1
        eng.step()
        for s in [s for s in inflight if s.finished]:
            inflight.remove(s)
            done += 1


def fixed_forward_ms(runner, width: int, reps: int = 30) -> float:
    rows = [Row(slot=i, tokens=[5] * width, start=150, want=width) for i in range(CONCURRENCY)]
    times = []
    for _ in range(reps):
        runner.run(rows)
        times.append(runner.last_time)
    return round(1e3 * statistics.median(times), 2)


def main() -> None:
    torch.set_num_threads(2)
    policy = sys.argv[1]
    gc_clock = GCClock()
    eng = build_engine(policy=policy, slo_tpot_ms=20.0, max_num_seqs=32, num_speculative_tokens=8)
    texts = [json.loads(line)["turns"][0] for line in open("adaspec/models/default/prompts.jsonl")]
    prompts = [eng.tokenizer(t)["input_ids"][:200] for t in texts]
    closed_loop(eng, prompts, 32)
    gc_clock.seconds, gc_clock.counts = 0.0, [0, 0, 0]
    first = len(eng.telemetry)
    t = time.perf_counter()
    closed_loop(eng, prompts, 64)
    wall = time.perf_counter() - t
    records = list(eng.telemetry)[first:]
    decode = [r for r in records if r.kind == "decode" and r.batch_size >= 14]
    prefill = [r for r in records if r.kind == "prefill"]
    by_width = {}
    for w in (3, 4, 5):
        v = [r.verify_time for r in decode if max(r.drafted) + 1 == w]
        if v:
            by_width[w] = round(1e3 * statistics.median(v), 1)
    prompt_tokens = max(1, sum(sum(r.context_lens) for r in prefill))
    print(json.dumps({
        "policy": policy, "wall": round(wall, 2), "gc_ms": round(1e3 * gc_clock.seconds, 1),
        "gc_n": gc_clock.counts,
        "prefill_ms_per_100tok": round(1e5 * sum(r.verify_time for r in prefill) / prompt_tokens, 2),
        "verify_ms_b16plus_by_maxwidth": by_width,
        "fixed_target_w4": fixed_forward_ms(eng.target, 4),
        "fixed_target_w1": fixed_forward_ms(eng.target, 1),
        "fixed_draft_w1": fixed_forward_ms(eng.draft, 1)}))


if __name__ == "__main__":
    main()
