"""`adaspec` command line: generate, demo (and, from their modules, serve, bench, simulate, profile)."""

from __future__ import annotations

import argparse
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds an engine; names follow vLLM's."""
    p.add_argument("--model", help="target model: local Hugging Face directory (default: embedded pair)")
    p.add_argument("--draft-model", help="draft model directory (same tokenizer as the target)")
    p.add_argument("--policy", help="speculation policy: none, static:K, threshold, smartspec, adaspec; "
                   "adaspec's ablations: adaspec-drafter, adaspec-noslo, adaspec-always, adaspec-tpot, "
                   "adaspec-meantpot, adaspec-everystep, adaspec-uniformreuse, adaspec-late, "
                   "adaspec-uniform, adaspec-steady, adaspec-ragged, adaspec-strict "
                   "(default: static:4 with a draft)")
    p.add_argument("--num-speculative-tokens", type=int, default=8, help="K, the most a step may draft")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-tpot-ms", type=float,
                   help="default TPOT SLO per request (ms); requests may override")
    p.add_argument("--slo-ttft-ms", type=float, help="default TTFT SLO per request (ms)")
    p.add_argument("--reprofile", action="store_true",
                   help="measure step times anew instead of using the cached start-up profile")


def engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(model=a.model, draft_model=a.draft_model, policy=a.policy,
                num_speculative_tokens=a.num_speculative_tokens, max_num_seqs=a.max_num_seqs,
                max_model_len=a.max_model_len, max_num_batched_tokens=a.max_num_batched_tokens,
                device=a.device, dtype=a.dtype, seed=a.seed, slo_tpot_ms=a.slo_tpot_ms,
                slo_ttft_ms=a.slo_ttft_ms, reprofile=a.reprofile)


def cmd_generate(a: argparse.Namespace) -> int:
    from adaspec import LLM, SamplingParams

    llm = LLM(**engine_kwargs(a))
    params = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            max_tokens=a.max_tokens, stop=a.stop, seed=a.sampling_seed,
                            ignore_eos=a.ignore_eos)
    for out in llm.generate(a.prompts, params):
        print(out.prompt + out.text if a.echo else out.text)
        s = out.spec_stats
        print(f"[{out.finish_reason}; {len(out.token_ids)} tokens; drafted {s['drafted']}, accepted "
              f"{s['accepted']}, acceptance length {s['acceptance_length']:.2f}]", file=sys.stderr)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from adaspec.demo import run_demo

    return run_demo(a)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adaspec", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for prompts")
    add_engine_args(g)
    g.add_argument("prompts", nargs="+")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--stop", action="append")
    g.add_argument("--sampling-seed", type=int)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    g.set_defaults(fn=cmd_generate)

    from adaspec.demo import add_demo_args

    d = sub.add_parser("demo", help="the server under a bursty trace: no speculation, static k, adaspec")
    add_demo_args(d)
    d.set_defaults(fn=cmd_demo)

    from adaspec.server.serve import add_parser as add_serve_parser

    add_serve_parser(sub)
    from adaspec.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    from adaspec.sim.cli import add_parser as add_sim_parser

    add_sim_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
