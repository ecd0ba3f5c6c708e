"""Do engine instances alive side by side run the same forward at the same speed?

    python benchmarks/engine_instances.py

Why this exists: the first version of `policies_closed_loop.py` kept one engine per policy alive
for the whole run, and the policies built last looked slower per forward. This builds engines in a
given order (each with its own copy of the embedded pair and its own KV cache), runs the same
batch-4 greedy requests through each in turn, and prints the median verify time of the steps that
verified width 4 (3 drafts + 1) and the median draft-forward time, per engine. Then it does the
same with one engine at a time, the previous one freed first (what the benchmark does now).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics

from adaspec import LLM, SamplingParams
from adaspec.llm import DEFAULT_PAIR


def measure(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[list[float], list[float]]:
    n0 = len(llm.engine.telemetry)
    llm.generate(prompts, params)
    steps = [r for r in list(llm.engine.telemetry)[n0:] if r.kind == "decode" and r.batch_size == 4
             and r.draft_steps]
    return ([r.verify_time for r in steps if max(r.drafted) == 3],
            [r.draft_time / r.draft_steps for r in steps])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--order", default="static:3,adaspec-drafter,static:3,adaspec-drafter",
                    help="policies of the engines, in the order they are built")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    lines = (DEFAULT_PAIR / "prompts.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["turns"][0] for line in lines]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    batches = [prompts[4 * i: 4 * i + 4] for i in range(a.repeats)]

    def report(label: str, v: list[float], d: list[float]) -> None:
        print(f"{label:40s} verify@width4 {1e3 * statistics.median(v):6.2f} ms (n={len(v)})  "
              f"draft forward {1e3 * statistics.median(d):5.2f} ms")

    names = a.order.split(",")
    engines = [LLM(policy=p, max_num_seqs=4) for p in names]  # alive side by side
    for llm in engines:
        llm.generate(prompts[-4:], params)
    res = [([], []) for _ in engines]
    for batch in batches:
        for llm, (v, d) in zip(engines, res, strict=True):
            mv, md = measure(llm, batch, params)
            v += mv
            d += md
    for i, (name, (v, d)) in enumerate(zip(names, res, strict=True)):
        report(f"alive together, built #{i + 1}: {name}", v, d)
    del engines
    gc.collect()
    fresh = {p: ([], []) for p in dict.fromkeys(names)}
    for batch in batches:
        for name, (v, d) in fresh.items():
            llm = LLM(policy=name, max_num_seqs=4)
            llm.generate(prompts[-1:], SamplingParams(temperature=0, max_tokens=4))
            mv, md = measure(llm, batch, params)
            v += mv
            d += md
            del llm
            gc.collect()
    for name, (v, d) in fresh.items():
        report(f"one at a time: {name}", v, d)


if __name__ == "__main__":
    main()
