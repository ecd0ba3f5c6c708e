"""Engine throughput: tokens/s by batch size and static k, and adaspec vs transformers' assisted
generation at batch 1. Results go to docs/ (JSON + Markdown) with the command and machine.

    python benchmarks/engine_throughput.py                # embedded pair, full grid
    python benchmarks/engine_throughput.py --quick        # smaller grid for a smoke run

Greedy decoding with ignore_eos, so every configuration emits the same number of tokens; the
same prompts for every cell; configurations interleaved over repeats (medians reported) so drift
on this noisy machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from adaspec import LLM, SamplingParams, __version__
from adaspec.bench.report import git_commit
from adaspec.demo import builtin_prompts
from adaspec.llm import DEFAULT_PAIR

ROOT = Path(__file__).resolve().parent.parent


def adaspec_tok_s(llm: LLM, prompts: list[str], max_tokens: int) -> tuple[float, float]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    steps = sum(o.spec_stats["steps"] for o in outs)
    acc = sum(o.spec_stats["accepted"] for o in outs)
    return sum(len(o.token_ids) for o in outs) / dt, (1 + acc / steps) if steps else 1.0


def hf_assisted_tok_s(target, draft, tok, prompt: str, k: int | None, max_tokens: int) -> float:
    """transformers' generate at batch 1: plain greedy (k None) or assisted with a constant k."""
    ids = tok(prompt, return_tensors="pt")
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
              pad_token_id=tok.eos_token_id)
    if k is not None:
        draft.generation_config.num_assistant_tokens = k
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0
        kw["assistant_model"] = draft
    t0 = time.perf_counter()
    out = target.generate(**ids, **kw)
    dt = time.perf_counter() - t0
    return (out.shape[1] - ids["input_ids"].shape[1]) / dt



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_PAIR / "target"))
    ap.add_argument("--draft-model", default=str(DEFAULT_PAIR / "draft"))
    ap.add_argument("--batch-sizes", default="1,4,16,32")
    ap.add_argument("--ks", default="1,3,5,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-prompts", type=int, default=4, help="prompts for the batch-1 HF comparison")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmark_engine"))
    a = ap.parse_args(argv)
    if a.quick:
        a.batch_sizes, a.ks, a.repeats, a.max_tokens, a.hf_prompts = "1,4", "1,3", 1, 32, 2
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    ks = [int(x) for x in a.ks.split(",")]
    prompts = builtin_prompts(max(sizes))
    policies = ["none"] + [f"static:{k}" for k in ks]
    llms = {p: LLM(model=a.model, draft_model=a.draft_model, policy=p, num_speculative_tokens=max(ks),
                   max_num_seqs=max(sizes)) for p in policies}
    for llm in llms.values():  # warm-up
        llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8))
    grid: dict = {p: {b: [] for b in sizes} for p in policies}
    accept: dict = {p: {} for p in policies}
    for r in range(a.repeats):
        for b in sizes:
            for p in policies:
                tps, al = adaspec_tok_s(llms[p], prompts[:b], a.max_tokens)
                grid[p][b].append(tps)
                accept[p][b] = al
                print(f"repeat {r} batch {b:>2} {p:>9}: {tps:8.1f} tok/s  acceptance length {al:.2f}",
                      flush=True)
    med = {p: {b: statistics.median(v) for b, v in d.items()} for p, d in grid.items()}

    # Batch 1 against transformers (same pair, same k, same prompts, greedy).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    hf_t = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    hf_d = AutoModelForCausalLM.from_pretrained(a.draft_model, dtype=torch.float32).eval()
    hf_prompts = prompts[: a.hf_prompts]
    hf_assisted_tok_s(hf_t, hf_d, tok, hf_prompts[0], ks[0], 8)  # warm-up
    hf: dict = {}
    ours_b1: dict = {}
    for k in [None, *ks]:
        name = "none" if k is None else f"static:{k}"
        hf_runs, our_runs = [], []
        for _ in range(a.repeats):
            for pr in hf_prompts:
                hf_runs.append(hf_assisted_tok_s(hf_t, hf_d, tok, pr, k, a.max_tokens))
                our_runs.append(adaspec_tok_s(llms[name], [pr], a.max_tokens)[0])
        hf[name], ours_b1[name] = statistics.median(hf_runs), statistics.median(our_runs)
        print(f"batch 1 {name:>9}: adaspec {ours_b1[name]:.1f} tok/s, transformers {hf[name]:.1f} tok/s",
              flush=True)

    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                       f"{platform.python_version()}, torch {torch.__version__}",
            "adaspec": __version__, "commit": git_commit() or "unknown", "max_tokens": a.max_tokens,
            "repeats": a.repeats, "model": a.model, "draft_model": a.draft_model}
    res = {"meta": meta, "tok_per_s": med, "acceptance_length": accept, "batch1_adaspec": ours_b1,
           "batch1_transformers": hf}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(render(res, sizes, policies))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


def render(res: dict, sizes: list[int], policies: list[str]) -> str:
    m, med = res["meta"], res["tok_per_s"]
    lines = ["# Engine throughput (embedded pair)", "", f"Command: `{m['command']}`  ",
             f"Machine: {m['machine']}; adaspec {m['adaspec']} ({m['commit']}); greedy, "
             f"{m['max_tokens']} tokens per request, ignore_eos; median of {m['repeats']} interleaved "
             "repeats.", "", "## Output tokens/s by batch size (speedup over no speculation)", "",
             "| policy | " + " | ".join(f"batch {b}" for b in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for p in policies:
        cells = [f"{med[p][b]:.1f} ({med[p][b] / med['none'][b]:.2f}x, AL "
                 f"{res['acceptance_length'][p][b]:.2f})" for b in sizes]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", "AL: mean acceptance length (tokens per verification step).", "",
              "## Batch 1: adaspec vs transformers assisted generation (same pair, same k)", "",
              "| k | adaspec tok/s | transformers tok/s | ratio |", "|---|---|---|---|"]
    for name, ours in res["batch1_adaspec"].items():
        hf = res["batch1_transformers"][name]
        lines.append(f"| {name} | {ours:.1f} | {hf:.1f} | {ours / hf:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
