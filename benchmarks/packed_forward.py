"""Packed vs padded multi-token forwards of the shipped target model, one CPU thread.

    python benchmarks/packed_forward.py [--repeats 21] [--context 200] [--batches 16,32]
                                        [--pricing-contexts 200]

`ModelRunner(packed=True)` (the default) runs ragged rows with every per-token op on the real tokens
only and pads just inside attention, when more than `PACK_MIN_PADDING` of the grid is padding;
`packed=False` pads every op to the longest row (the layout before). Here "packed" packs whenever rows
are ragged (threshold 0), and the last column says which of the two the default runner runs.
Both run on one runner, each case timed by the runner's own clock (`last_time`, the whole `run`:
tensor building, forward, logits); medians over the repeats, every repeat running every case of a table
both ways (see `interleaved`).
Every row attends over about `context` cached positions; slots are 0..B-1; every token wants logits,
as in verification.

Prints markdown: the comparison table; what packing costs when it saves nothing (equal rows forced
packed); then, at batch 16, a grid of (sum of widths, max width) with least-squares fits of the time to
both, which says how a cost model should price a packed forward.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from adaspec.engine.runner import PACK_MIN_PADDING, ModelRunner, Row
from adaspec.llm import DEFAULT_PAIR
from adaspec.model import load_model

MIX = [8, 1, 2, 3, 4, 2, 1, 3, 5, 2, 3, 1, 4, 2, 3, 4]  # mean 3, max 8


def cases(batch: int) -> list[tuple[str, list[int]]]:
    """Uniform widths, ragged ones, and widths 4 with k rows of 3 (1.6% .. 12.5% of the grid padding)
    to place the runner's packing threshold."""
    out = [(f"uniform {w}", [w] * batch) for w in (2, 4, 6)]
    out += [("one 9, rest 2", [9] + [2] * (batch - 1)), ("one 8, rest 1", [8] + [1] * (batch - 1)),
            ("mean 3, max 8", MIX * (batch // len(MIX))), ("uniform 2, one 1", [2] * (batch - 1) + [1])]
    for k in (1, 2, 3, 4, 8):
        k = k * batch // 16
        out.append((f"uniform 4, {k} of 3", [4] * (batch - k) + [3] * k))
    return out


def pricing_grid(batch: int) -> list[tuple[str, list[int]]]:
    """One row of the max width W, the rest of width w <= W: sum and max vary independently."""
    out = []
    for top, rest in [(2, [1, 2]), (4, [1, 2, 4]), (6, [1, 3, 6]), (9, [1, 2, 4, 6, 9])]:
        out += [(f"{top} + {batch - 1}x{w}", [top] + [w] * (batch - 1)) for w in rest]
    return out


def make_rows(widths: list[int], context: int, vocab: int, seed: int) -> list[Row]:
    rng = random.Random(seed)
    return [Row(i, [rng.randrange(vocab) for _ in range(w)], context, w) for i, w in enumerate(widths)]


def interleaved(jobs: list[Callable[[bool], float]], repeats: int) -> list[tuple[float, float, float]]:
    """Per job: median seconds padded, median seconds packed, median of the paired ratios packed/padded.

    Every repeat runs every job both ways back to back (which way first alternates), the jobs in a fresh
    shuffled order: on a shared machine whose speed drifts by tens of percent over seconds, drift then
    hits both layouts of a pair alike and no job sits at a fixed phase of it."""
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in jobs]
    rng = random.Random(0)
    for i in range(repeats + 2):  # two warm-up rounds
        for j in rng.sample(range(len(jobs)), len(jobs)):
            for packed in (False, True) if i % 2 else (True, False):
                t = jobs[j](packed)
                if i >= 2:
                    times[j][packed].append(t)
    return [(statistics.median(pad), statistics.median(pack),
             statistics.median(b / a for a, b in zip(pad, pack, strict=True))) for pad, pack in times]


def runner_job(runner: ModelRunner, rows: list[Row]) -> Callable[[bool], float]:
    def job(packed: bool) -> float:
        runner.packed = packed
        runner.run(rows)
        return runner.last_time

    return job


def forced_job(runner: ModelRunner, batch: int, width: int, context: int) -> Callable[[bool], float]:
    """Equal rows through the model with ``valid`` all True, so ``packed=True`` gathers and scatters for
    nothing: what packing costs when it saves nothing (the runner never packs equal rows)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(runner.model.config.vocab_size, (batch, width), generator=g)
    pos = torch.arange(context, context + width).expand(batch, width)
    slots, valid = torch.arange(batch), torch.ones(batch, width, dtype=torch.bool)

    @torch.inference_mode()
    def job(packed: bool) -> float:
        t0 = time.perf_counter()
        runner.model(ids, pos, runner.cache, slots, valid, packed=packed)
        return time.perf_counter() - t0

    return job


def fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares with an intercept; returns (coefficients, max relative residual)."""
    a = np.column_stack([np.ones(len(y)), x])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return coef, float(np.max(np.abs(a @ coef - y) / y))


def pricing(runner: ModelRunner, batch: int, context: int, repeats: int) -> None:
    """Time the grid and fit the packed (and padded) time to the sum and the max of the widths."""
    print(f"\nPricing grid, batch {batch}, context {context}:\n")
    print("| widths | sum N | max W | padded (ms) | packed (ms) |")
    print("|---|---|---|---|---|")
    grid = pricing_grid(batch)
    vocab = runner.model.config.vocab_size
    timed = interleaved([runner_job(runner, make_rows(w, context, vocab, 7)) for _, w in grid], repeats)
    pts = []
    for (name, widths), (pad, pack, _) in zip(grid, timed, strict=True):
        pts.append((sum(widths), max(widths), pad, pack))
        print(f"| {name} | {sum(widths)} | {max(widths)} | {1e3 * pad:.2f} | {1e3 * pack:.2f} |")
    n, w, pad, pack = (np.array(c, dtype=float) for c in zip(*pts, strict=True))
    print("\n| time | fitted model | intercept (ms) | per token of N (ms) | per grid cell B*W (ms) "
          "| max rel. residual |")
    print("|---|---|---|---|---|---|")
    for label, y in (("packed", pack), ("padded", pad)):
        for model_name, x, cols in (("a + b*N + c*B*W", np.column_stack([n, batch * w]), (1, 2)),
                                    ("a + b*N", n[:, None], (1,)), ("a + c*B*W", batch * w[:, None], (2,))):
            coef, res = fit(x, y)
            per = {c: f"{1e3 * v:.3f}" for c, v in zip(cols, coef[1:], strict=True)}
            print(f"| {label} | {model_name} | {1e3 * coef[0]:.2f} | {per.get(1, '-')} | {per.get(2, '-')} "
                  f"| {res:.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--batches", default="16,32")
    ap.add_argument("--pricing-contexts", default="200",
                    help="contexts of the batch-16 pricing grid ('' skips it)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = load_model(DEFAULT_PAIR / "target", dtype=torch.float32)
    batches = [int(b) for b in a.batches.split(",")]
    contexts = [int(c) for c in a.pricing_contexts.split(",") if c]
    runner = ModelRunner(model, max(batches), max([a.context, *contexts]) + 16, torch.float32,
                         torch.device("cpu"))
    runner.pack_min_padding = 0.0  # "packed" below means packed whenever ragged
    vocab = model.config.vocab_size
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    print(f"machine: {cpu.split(':', 1)[-1].strip() or platform.processor()}; torch {torch.__version__}; "
          f"1 thread; target {DEFAULT_PAIR / 'target'}; context {a.context}; medians of {a.repeats} repeats "
          "(ratios: median of the per-repeat pairs)\n")

    print("| batch | widths | tokens N | grid B x max | padding | padded (ms) | packed (ms) "
          "| packed / padded | default runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in batches:
        named = cases(batch)
        jobs = [runner_job(runner, make_rows(w, a.context, vocab, batch)) for _, w in named]
        for (name, widths), (pad, pack, ratio) in zip(named, interleaved(jobs, a.repeats), strict=True):
            grid = batch * max(widths)
            share = 1 - sum(widths) / grid
            default = "packed" if share > PACK_MIN_PADDING else "padded"
            print(f"| {batch} | {name} | {sum(widths)} | {grid} | {100 * share:.1f}% | {1e3 * pad:.2f} | "
                  f"{1e3 * pack:.2f} | {ratio:.3f} | {default} |", flush=True)

    print("\nPacking when it saves nothing (equal rows forced through the packed layout):\n")
    print("| batch | width | padded (ms) | forced packed (ms) | packed / padded |")
    print("|---|---|---|---|---|")
    shapes = [(batch, width) for batch in batches for width in (2, 4, 8)]
    timed = interleaved([forced_job(runner, b, w, a.context) for b, w in shapes], a.repeats)
    for (batch, width), (pad, pack, ratio) in zip(shapes, timed, strict=True):
        print(f"| {batch} | {width} | {1e3 * pad:.2f} | {1e3 * pack:.2f} | {ratio:.3f} |")

    for context in contexts:
        pricing(runner, 16, context, a.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
