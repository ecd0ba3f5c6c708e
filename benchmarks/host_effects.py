"""What the host settings of `adaspec.engine.host` change: GC pauses and page faults per step.

    python benchmarks/host_effects.py --out docs/host_effects

Each configuration runs in a fresh process (the allocator setting is process-wide and cannot be
undone): closed-loop load at one concurrency on the embedded pair, greedy, fixed output length.
Reported per run: minor page faults per decode step, median target-forward time of decode steps
without speculation, decode tokens per second of step time; and, once, how long a full garbage
collection takes with the start-up heap tracked vs frozen.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(policy: str, concurrency: int, requests: int, threads: int) -> dict:
    import gc
    import resource

    import torch

    from adaspec import SamplingParams
    from adaspec.engine import host
    from adaspec.llm import DEFAULT_PAIR, build_engine

    torch.set_num_threads(threads)
    eng = build_engine(policy=policy, max_num_seqs=concurrency, num_speculative_tokens=8)
    prompts = [json.loads(line)["turns"][0] for line in open(DEFAULT_PAIR / "prompts.jsonl")]
    ids = [eng.tokenizer(p)["input_ids"][:200] for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)

    def run(n: int) -> None:
        in_flight, done, sent = [], 0, 0
        while done < n:
            while len(in_flight) < concurrency and sent < n:
                in_flight.append(eng.add_request(ids[sent % len(ids)], params))
                sent += 1
            eng.step()
            for s in [s for s in in_flight if s.finished]:
                in_flight.remove(s)
                done += 1

    run(concurrency)  # warm-up
    first = len(eng.telemetry)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(requests)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    dec = [r for r in list(eng.telemetry)[first:] if r.kind == "decode"]
    plain = [r.verify_time for r in dec if not sum(r.drafted)]
    t = time.perf_counter()
    gc.collect()
    frozen_ms = 1e3 * (time.perf_counter() - t)
    tracked = len(gc.get_objects())
    gc.unfreeze()
    t = time.perf_counter()
    gc.collect()
    full_ms = 1e3 * (time.perf_counter() - t)
    return {"policy": policy, "malloc_tuned": host.tune_allocator(), "decode_steps": len(dec),
            "faults_per_step": faults / len(dec),
            "plain_forward_ms": 1e3 * statistics.median(plain) if plain else None,
            "plain_steps": len(plain),
            "tok_per_s": sum(len(r.drafted) + sum(r.accepted) for r in dec) / sum(r.step_time for r in dec),
            "gc_full_ms_frozen": frozen_ms, "gc_full_ms_unfrozen": full_ms,
            "objects_tracked_after_freeze": tracked, "objects_total": len(gc.get_objects())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="none,adaspec")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.concurrency, a.requests, a.threads)))
        return 0
    rows = []
    for rep in range(a.repeats):
        for tuned in (True, False):
            for policy in a.policies.split(","):
                env = dict(os.environ, ADASPEC_TUNE_MALLOC="1" if tuned else "0")
                out = subprocess.run([sys.executable, __file__, "--child", policy, "--concurrency",
                                      str(a.concurrency), "--requests", str(a.requests), "--threads",
                                      str(a.threads)], env=env, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1]) | {"repeat": rep}
                rows.append(row)
                print(json.dumps(row), flush=True)
    cmd = "python benchmarks/host_effects.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Host settings: GC freeze and allocator tuning", "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {a.threads} torch thread(s), Python "
        f"{platform.python_version()}. Closed loop, concurrency {a.concurrency}, {a.requests} requests of "
        "96 tokens (greedy, ignore_eos) after a warm-up; every row is a fresh process.", "",
        "| repeat | policy | malloc tuned | decode steps | page faults / step | plain forward (ms, median) "
        "| decode tok/s | full GC, heap frozen (ms) | full GC, unfrozen (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fwd = "-" if r["plain_forward_ms"] is None else \
            f"{r['plain_forward_ms']:.1f} ({r['plain_steps']} steps)"
        lines.append(f"| {r['repeat']} | {r['policy']} | {r['malloc_tuned']} | {r['decode_steps']} | "
                     f"{r['faults_per_step']:.0f} | {fwd} | {r['tok_per_s']:.0f} | "
                     f"{r['gc_full_ms_frozen']:.1f} | {r['gc_full_ms_unfrozen']:.1f} |")
    last = rows[-1]
    lines += ["", f"Objects the collector tracks after the freeze: {last['objects_tracked_after_freeze']:,}"
              f" of {last['objects_total']:,}."]
    if a.out:
        a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
