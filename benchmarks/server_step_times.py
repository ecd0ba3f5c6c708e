"""Step times inside `adaspec serve` against the same requests run in-process: does serving cost the
engine speed?

    python benchmarks/server_step_times.py --policies none,static:3 --threads 2 --out docs/server_threads
    (another checkout: PYTHONPATH=OLD python benchmarks/server_step_times.py ...; the server child
    inherits PYTHONPATH, so it runs OLD's code)

Per policy: a server in a child process (`ServerProcess`, as `adaspec bench sweep` starts it, with
OMP_NUM_THREADS=--threads), `--requests` streamed one after another (batch 1), and its telemetry's
median verification forward, draft forward and step time; then the same prompts through an
in-process engine on this process's main thread (`LLM.generate`, the same thread count). Session 15
found the server's engine thread 3-4x slower than the in-process engine: the model was built on
one thread and stepped on another, and OpenMP keeps a thread team per calling thread
(`docs/server_threads.md`).

With `--concurrency N` the requests go to the server in closed loop, N at a time (the project's
bench client), and the report adds the median gap between consecutive steps (engine-thread work
outside `LLMEngine.step`) and the requests done per second; the in-process run is skipped then:

    python benchmarks/server_step_times.py --policies static:3 --concurrency 8 --requests 160 --out OUT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from adaspec.bench.client import run_requests
from adaspec.bench.sweep import ServerProcess, SweepConfig, file_stem
from adaspec.bench.workload import BenchRequest

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):",
           "import os\nimport sys\n\ndef main():", "for i in range(10):",
           "def quicksort(items):", "class Point:"]


def medians(records: list[dict]) -> dict:
    """Median ms of a decode step's verification forward, draft forward and whole step, and of the
    gap between consecutive steps (gaps over 20 ms are idle time, not counted)."""
    dec = [r for r in records if r["kind"] == "decode"]
    drafts = [r["draft_time"] / r["draft_steps"] for r in dec if r["draft_steps"]]
    gaps = [b["start"] - a["start"] - a["step_time"] for a, b in zip(records, records[1:], strict=False)]
    ms = lambda v: round(1e3 * statistics.median(v), 3) if v else None  # noqa: E731
    return {"steps": len(dec), "verify_ms": ms([r["verify_time"] for r in dec]),
            "draft_forward_ms": ms(drafts), "step_ms": ms([r["step_time"] for r in dec]),
            "gap_ms": ms([g for g in gaps if g < 0.02])}


def served(pair: tuple[str | None, str | None], policy: str, threads: int, requests: int, max_tokens: int,
           concurrency: int, workdir: Path) -> dict:
    cfg = SweepConfig(policies=[policy], model=pair[0], draft_model=pair[1], threads=threads, quiet=True)
    reqs = [BenchRequest(i, PROMPTS[i % len(PROMPTS)], "builtin", max_tokens, True, 0.0)
            for i in range(requests)]
    with ServerProcess(cfg, policy, workdir / f"server-{file_stem(policy)}.log") as url:
        run = asyncio.run(run_requests(url, reqs, mode="closed", concurrency=concurrency, scrape=False))
    path = workdir / f"telemetry-{file_stem(policy)}.jsonl"
    return {**medians([json.loads(line) for line in path.read_text().splitlines()]),
            "requests_per_s": round(requests / run["duration"], 2)}


def in_process(pair: tuple[str | None, str | None], policy: str, requests: int, max_tokens: int) -> dict:
    from adaspec.engine.sampling import SamplingParams
    from adaspec.llm import LLM

    llm = LLM(*pair, policy=policy)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(requests):  # one at a time, as the server saw them
        llm.generate([PROMPTS[i % len(PROMPTS)]], params)
    return medians([asdict(r) for r in llm.engine.telemetry])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="target directory (default: the embedded pair)")
    ap.add_argument("--draft-model")
    ap.add_argument("--policies", default="none,static:3")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=1, help="requests in flight (closed loop)")
    ap.add_argument("--skip-in-process", action="store_true", help="(always skipped with --concurrency > 1)")
    ap.add_argument("--out", help="write OUT.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    args = sys.argv[1:] if argv is None else argv
    out = {"command": "python benchmarks/server_step_times.py " + " ".join(args), "threads": a.threads,
           "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in a.policies.split(","):
            pair = (a.model, a.draft_model)
            row = {"server": served(pair, policy, a.threads, a.requests, a.max_tokens, a.concurrency,
                                    Path(tmp))}
            if not a.skip_in_process and a.concurrency == 1:
                row["in_process"] = in_process(pair, policy, a.requests, a.max_tokens)
            out["results"][policy] = row
            for where, m in row.items():
                print(f"{policy:10s} {where:10s} steps {m['steps']:4d}  verify {m['verify_ms']} ms  "
                      f"draft forward {m['draft_forward_ms']} ms  step {m['step_ms']} ms  "
                      f"gap {m['gap_ms']} ms  requests/s {m.get('requests_per_s', '-')}", flush=True)
    if a.out:
        Path(f"{a.out}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
