"""`adaspec bench run` (one running server) and `adaspec bench sweep` (a fresh server per policy).

    adaspec bench sweep --policies none,static:3,adaspec --model T --draft-model D \\
        --trace ../shared/data/traces/code.csv --time-scale 4 --rate-scale 0.5,1,2 --duration 300 \\
        --prompts ../shared/data/spec-bench/origin-spec-bench.jsonl --output-len fixed:128 \\
        --slo-tpot-ms auto:1.5 --output-dir runs/bench-code
    adaspec bench run --base-url http://127.0.0.1:8000 --arrivals gamma:2:3 --num-requests 100
"""

from __future__ import annotations

import argparse
import shlex
import sys


def floats(s: str) -> list[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return vals


def ints(s: str) -> list[int]:
    vals = floats(s)
    if any(v != int(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return [int(v) for v in vals]


def positive_int(s: str) -> int:
    vals = ints(s)
    if len(vals) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {s!r}")
    return vals[0]


def tpot_slo(s: str) -> float | str:
    if s.startswith("auto"):
        factor = s.partition(":")[2]
        try:
            if not factor or float(factor) > 0:
                return s
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected auto or auto:FACTOR (> 0), got {s!r}")
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError("the TPOT SLO must be > 0 ms")
    return v


def add_workload_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--prompts", default="builtin",
                   help="Spec-Bench JSONL path (turns[0], category), 'builtin' (the embedded pair's) or "
                        "'synthetic[:N]' (default builtin)")
    w.add_argument("--trace", help="arrival trace CSV with a Timestamp column (seconds)")
    w.add_argument("--arrivals", help="generated arrivals when no --trace: poisson:RATE, gamma:RATE:CV or "
                                      "phases:RATE@SECONDS,...[:CV] (default poisson:1)")
    w.add_argument("--no-trace-shift", dest="shift_trace", action="store_false",
                   help="replay trace times as they are (default: the first request leaves at 0)")
    w.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (2 = half the rate)")
    w.add_argument("--rate-scale", type=floats, default=[1.0],
                   help="divide arrival times; a comma list runs each level (default 1)")
    w.add_argument("--duration", type=float, help="keep arrivals before this time (s, after --time-scale)")
    w.add_argument("--num-requests", type=int, help="keep the first N requests (default 100 when generated)")
    w.add_argument("--output-len", default="fixed:64",
                   help="eos:CAP (natural EOS), fixed:N or sampled:MEAN[:CV] (per category)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--mode", choices=["open", "closed"], default="open",
                   help="open loop (arrival times) or closed loop (--concurrency in flight)")
    w.add_argument("--concurrency", type=ints, default=[1], help="closed loop: comma list of levels")
    w.add_argument("--slo-ttft-ms", type=float, help="TTFT SLO (ms), sent with each request and measured")
    w.add_argument("--slo-tpot-ms", type=tpot_slo,
                   help="TPOT SLO (ms), or auto[:F] = F x median warm-up TPOT of the first policy")
    w.add_argument("--warmup", type=int, default=3, help="sequential warm-up requests per server")
    w.add_argument("--max-prompt-tokens", type=int, help="cut longer prompts (first tokens kept)")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--request-timeout", type=float, default=600.0)
    w.add_argument("--output-dir", default="runs/bench")
    w.add_argument("--quiet", action="store_true", help="no progress display")


def config(a: argparse.Namespace, policies: list[str], **kw):
    from adaspec.bench.sweep import SweepConfig

    return SweepConfig(
        policies=policies, output_dir=a.output_dir, prompts=a.prompts, arrivals=a.arrivals, trace=a.trace,
        num_requests=a.num_requests, duration=a.duration, time_scale=a.time_scale, shift_trace=a.shift_trace,
        output_len=a.output_len, seed=a.seed, mode=a.mode, rate_scales=a.rate_scale,
        concurrencies=a.concurrency, slo_ttft_ms=a.slo_ttft_ms, slo_tpot_ms=a.slo_tpot_ms, warmup=a.warmup,
        max_prompt_tokens=a.max_prompt_tokens, temperature=a.temperature, request_timeout=a.request_timeout,
        quiet=a.quiet, command=shlex.join(["adaspec", *sys.argv[1:]]), **kw)


def finish(cfg) -> int:
    return run_sweep(cfg)[0]


def run_sweep(cfg):
    """Run the sweep and report on it; returns the exit status and the `Sweep` (its resolved SLO)."""
    from adaspec.bench.sweep import Sweep

    sweep = Sweep(cfg)
    try:
        path = sweep.run()
    except RuntimeError as exc:  # a server that would not start: its log tail is in the message
        print(f"error: {exc}", file=sys.stderr)
        return 1, sweep
    print(f"report: {path}")
    failed = sum(r["failed"] for r in sweep.runs)
    if failed:
        print(f"warning: {failed} requests failed (see requests.jsonl)", file=sys.stderr)
    if sweep.failed_policies:
        print(f"error: no results for {', '.join(sweep.failed_policies)}: the server did not start "
              "(see server-*.log)", file=sys.stderr)
        return 1, sweep
    return 0, sweep


def cmd_sweep(a: argparse.Namespace) -> int:
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    if not policies:
        raise ValueError("--policies is empty")
    cfg = config(a, policies, model=a.model, draft_model=a.draft_model,
                 num_speculative_tokens=a.num_speculative_tokens, max_num_seqs=a.max_num_seqs,
                 max_model_len=a.max_model_len, dtype=a.dtype, threads=a.threads,
                 server_args=shlex.split(" ".join(a.server_arg or [])), startup_timeout=a.startup_timeout)
    if a.repeats == 1:
        return finish(cfg)
    return repeat_sweep(cfg, a.repeats)


def repeat_sweep(cfg, repeats: int) -> int:
    """The sweep `repeats` times, into OUTPUT_DIR/r1..rN, the policy order rotated by one each time
    (on this project's CPU one policy's mean TPOT moved by up to 1.9x between repeats, and a slow
    stretch within a sweep hits whichever policies run then), then OUTPUT_DIR/repeats.md pooling them.
    An auto TPOT SLO is resolved by the first repeat and kept, so that all share one bar."""
    from dataclasses import replace
    from pathlib import Path

    from adaspec.bench.repeats import rotated, write

    out, rc, dirs = Path(cfg.output_dir), 0, []
    for k in range(repeats):
        d = out / f"r{k + 1}"
        print(f"repeat {k + 1} of {repeats}: {', '.join(rotated(cfg.policies, k))}")
        status, sweep = run_sweep(replace(cfg, policies=rotated(cfg.policies, k), output_dir=str(d)))
        rc = max(rc, status)
        if (d / "summary.json").exists():
            dirs.append(d)
        if isinstance(cfg.slo_tpot_ms, str) and sweep.slo_tpot_ms is not None:
            cfg = replace(cfg, slo_tpot_ms=sweep.slo_tpot_ms)
    if dirs:
        write(dirs, out / "repeats")
        print(f"repeats: {out / 'repeats.md'}")
    return rc


def cmd_run(a: argparse.Namespace) -> int:
    import httpx

    url = a.base_url.rstrip("/")
    label = a.label
    if label is None:
        try:
            label = httpx.get(url + "/v1/models", timeout=10).json()["data"][0].get("policy") or "server"
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"cannot reach {url}/v1/models: {exc}") from None
    cfg = config(a, [label], base_url=url, model=a.model)
    return finish(cfg)


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="benchmark the server: trace replay, policy sweeps, reports")
    bsub = b.add_subparsers(dest="bench_command", required=True)

    r = bsub.add_parser("run", help="one workload against a running server")
    r.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    r.add_argument("--label", help="name of this run in the report (default: the server's policy)")
    r.add_argument("--model", help="the served target's directory, for client-side tokenization")
    add_workload_args(r)
    r.set_defaults(fn=cmd_run)

    s = bsub.add_parser("sweep", help="the same workload against a fresh server per policy")
    s.add_argument("--policies", default="none,static:1,static:3,static:5,threshold,smartspec,adaspec")
    s.add_argument("--model", help="target directory (default: the embedded pair)")
    s.add_argument("--draft-model", help="draft directory")
    s.add_argument("--num-speculative-tokens", type=int, default=8)
    s.add_argument("--max-num-seqs", type=int, default=32)
    s.add_argument("--max-model-len", type=int)
    s.add_argument("--dtype", default="auto")
    s.add_argument("--threads", type=int, help="server threads (OMP_NUM_THREADS); default torch's")
    s.add_argument("--server-arg", action="append",
                   help="extra `adaspec serve` arguments, e.g. --server-arg='--slo-ttft-ms 2000'")
    s.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds a server may take to load (and profile) before /health is 200")
    s.add_argument("--repeats", type=positive_int, default=1,
                   help="run the sweep N times into OUTPUT_DIR/r1..rN, the policy order rotated each time, "
                        "and pool them in OUTPUT_DIR/repeats.md (mean, min-max)")
    add_workload_args(s)
    s.set_defaults(fn=cmd_sweep)
    return b
