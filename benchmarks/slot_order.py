"""What a forward pays when its rows' cache slots are not a contiguous run in row order.

    python benchmarks/slot_order.py --batch 16 --context 500 --widths 1,4,6

The model reads each row's KV cache through a view when the rows hold slots s0, s0+1, ... in
order, and gathers (copies) every row's cache, in every layer, otherwise. Before session 13 the
engine kept running requests in admission order and handed freed slots out last-in first-out, so
after the first request finished a full batch was out of order and every forward gathered; now
running requests hold slots 0..n-1 in order (`Scheduler.compact`). A draft forward of only the
requests still drafting has rows in slot order with gaps: those attend over a view of the slots'
span when it is at most `SPAN_READ_MAX` times the rows (`llama.py`), else gather.

Per model and width, the median forward time of the same B rows on: slots 0..B-1 (contiguous); a
shuffled permutation of them (shuffled: gathered); slots with every `--gap-every`-th left out
(4: 0, 1, 2, 4, 5, 6, 8, .., a span of 4B/3; 2: every other slot, a span of 2B) read through the
span view (spread, when the span is within `SPAN_READ_MAX`) and the same gathered (spread,
gathered), all alternating so that the host's drift falls on each alike.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys

import torch

from adaspec.engine.runner import Row
from adaspec.llm import build_engine
from adaspec.model import llama


def measure(runner, batch: int, width: int, context: int, repeats: int, seed: int = 0,
            gap_every: int = 4) -> dict:
    """Median ms of one forward on contiguous and on shuffled slots (same tokens, same positions)."""
    g = torch.Generator().manual_seed(seed)
    vocab = runner.model.config.vocab_size
    tokens = [torch.randint(vocab, (width,), generator=g).tolist() for _ in range(batch)]
    perm = list(range(batch))
    random.Random(seed + 1).shuffle(perm)
    spread = [Row(i + i // (gap_every - 1), tokens[i], context - width, width) for i in range(batch)]
    rows = {"contiguous": ([Row(i, tokens[i], context - width, width) for i in range(batch)], None),
            "shuffled": ([Row(perm[i], tokens[i], context - width, width) for i in range(batch)], None),
            "spread": (spread, None), "spread, gathered": (spread, 0)}
    times = {k: [] for k in rows}
    span_max = llama.SPAN_READ_MAX
    try:
        for _ in range(repeats):
            for k, (r, limit) in rows.items():  # the span read is forced for "spread" (any span)
                llama.SPAN_READ_MAX = max(span_max, 2.0) if limit is None else limit
                runner.run(r)
                times[k].append(runner.last_time)
    finally:
        llama.SPAN_READ_MAX = span_max
    out = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    out["ratio"] = out["shuffled"] / out["contiguous"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=500)
    ap.add_argument("--widths", default="1,4,6", help="tokens per row (1: decode or draft, k+1: verify)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--gap-every", type=int, default=4,
                    help="spread layout: leave out every n-th slot (n >= 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gap_every < 2:
        raise ValueError("--gap-every must be at least 2")
    engine = build_engine(policy="static:3", max_num_seqs=2 * args.batch)
    results = []
    for name, runner in (("target", engine.target), ("draft", engine.draft)):
        for w in (int(x) for x in args.widths.split(",")):
            r = measure(runner, args.batch, w, args.context, args.repeats, gap_every=args.gap_every)
            results.append({"model": name, "width": w, **r})
            print(f"{name:6s} batch {args.batch} width {w} context {args.context}: contiguous "
                  f"{r['contiguous']:.2f} ms, shuffled {r['shuffled']:.2f} ms ({r['ratio']:.2f}x), spread "
                  f"{r['spread']:.2f} ms, spread gathered {r['spread, gathered']:.2f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
