"""Start-up profiling: time the real draft and target forwards, fit a `CostModel`, cache it on disk.

The grid spans batch size (1 .. max_num_seqs), tokens per row (1 for decode and draft steps, up to
K+1 for verification, a few for the draft's catch-up) and attended context (16 .. max_model_len).
Points are measured corners first, then in a fixed shuffled order, until the grid or the time
budget runs out, so a slow device still gets a profile that spans the whole range; then every
sample far over a first fit is timed again and keeps the lower time (`retime_spikes`).

Profiles are cached under $ADASPEC_CACHE_DIR/profiles (default ~/.cache/adaspec/profiles), keyed
by both models (name and architecture), device, dtype, thread count, adaspec version, and the
versions of the fit and of the model forward (FIT_VERSION, FORWARD_VERSION); a cached profile is
reused only if it covers the requested ranges. `reprofile=True` measures anew.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch

from adaspec.engine.runner import ModelRunner, Row
from adaspec.model.llama import FORWARD_VERSION
from adaspec.spec.cost_model import FIT_VERSION, CostModel, ForwardTimeModel

log = logging.getLogger(__name__)

ARCH_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def cache_dir() -> Path:
    return Path(os.environ.get("ADASPEC_CACHE_DIR", "~/.cache/adaspec")).expanduser() / "profiles"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile_key(target: ModelRunner, draft: ModelRunner,
                names: tuple[str, str] = ("target", "draft")) -> dict:
    """What a profile depends on; anything else (weights, prompts) does not change step times."""
    from adaspec import __version__

    def model(runner: ModelRunner, name: str) -> dict:
        cfg = asdict(runner.model.config)
        return {"name": name, **{k: cfg[k] for k in ARCH_FIELDS}}

    return {"target": model(target, names[0]), "draft": model(draft, names[1]),
            "device": device_name(target.device), "dtype": str(target.cache.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "adaspec": __version__, "fit": FIT_VERSION,
            "forward": FORWARD_VERSION}


def profile_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = f"{Path(key['target']['name']).name}-{Path(key['draft']['name']).name}"
    return cache_dir() / f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in stem)}-{digest}.json"


def _geometric(lo: int, hi: int) -> list[int]:
    out, v = [], lo
    while v < hi:
        out.append(v)
        v *= 2
    return sorted(set(out + [hi]))


def grid(max_batch: int, max_tokens: int, max_context: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(batch, tokens per row, context) points: the 8 corners first, then the rest shuffled."""
    bs = _geometric(1, max_batch)
    ts = sorted({1, 2, 3, 5, max_tokens} & set(range(1, max_tokens + 1)))
    ls = _geometric(min(16, max_context), max_context)
    points = [(b, t, max(c, t)) for b in bs for t in ts for c in ls]
    corners = {(b, t, max(c, t)) for b in (bs[0], bs[-1]) for t in (ts[0], ts[-1]) for c in (ls[0], ls[-1])}
    rest = [p for p in points if p not in corners]
    random.Random(seed).shuffle(rest)
    return sorted(corners) + rest


Sample = tuple[int, int, int, float]  # (batch, tokens per row, context, seconds)


def time_forwards(runner: ModelRunner, points: list[tuple[int, int, int]], all_logits: bool,
                  budget_s: float, reps: int = 3) -> list[Sample]:
    """Median forward time at each point (rows of random tokens written at the context's end).
    Writes garbage into the cache rows it uses: run before serving, then clear."""
    g = torch.Generator().manual_seed(0)
    vocab = runner.model.config.vocab_size
    samples, deadline = [], time.perf_counter() + budget_s
    runner.run([Row(0, [1], 0, 1)])  # warm-up: first-call allocations are not a step's cost
    for b, t, ctx in points:
        if len(samples) >= 4 and time.perf_counter() > deadline:
            log.warning("profiling stopped at its %.0fs budget after %d of %d points", budget_s,
                        len(samples), len(points))
            break
        rows = [Row(i, torch.randint(vocab, (t,), generator=g).tolist(), ctx - t, t if all_logits else 1)
                for i in range(b)]
        times = []
        for _ in range(reps):
            runner.run(rows)
            times.append(runner.last_time)
        samples.append((b, t, ctx, sorted(times)[len(times) // 2]))
    return samples


RETIME_ABOVE = 1.3  # a sample this far over a first fit is timed again (`retime_spikes`)


def retime_spikes(runner: ModelRunner, samples: list[Sample], all_logits: bool, budget_s: float,
                  above: float = RETIME_ABOVE) -> tuple[list[Sample], int]:
    """Time again every sample more than `above` x a first fit's value, keeping the lower of its
    two medians; returns the samples and how many were timed again.

    On a shared CPU a forward's time comes with spikes (another process, a page fault) that a
    median of three does not always remove: in session 20's profile of the embedded pair on a
    2-core host, 36 of 210 target samples and 64 of 168 draft samples were over 1.4x the fit, one
    draft sample 77x, and they bend the fitted shape (the cost of deeper drafts relative to
    shallow ones), which the online correction, one factor per range, cannot undo. Interference
    only ever adds time, so the lower median is the closer one; a point slow twice is taken as it
    is (a real cost of that shape). Samples under the fit are left alone for the same reason."""
    if len(samples) < 2:
        return samples, 0
    fit = ForwardTimeModel.fit(samples)
    spiked = [i for i, (b, t, c, y) in enumerate(samples) if y > above * fit.predict(b, t, c)]
    again = time_forwards(runner, [samples[i][:3] for i in spiked], all_logits, budget_s) if spiked else []
    out = list(samples)
    for i, (b, t, c, y) in zip(spiked, again, strict=False):  # the budget may stop it early
        out[i] = (b, t, c, min(out[i][3], y))
    return out, len(again)


def profile(target: ModelRunner, draft: ModelRunner, max_batch: int, max_tokens: int, max_context: int,
            budget_s: float = 40.0, meta: dict | None = None) -> CostModel:
    """Measure and fit both models; the draft gets 40% of the budget (it is the cheaper model),
    and each model up to a tenth more to time its spiked samples again (`retime_spikes`)."""
    max_batch = min(max_batch, target.cache.num_slots, draft.cache.num_slots)
    max_context = min(max_context, target.cache.max_len, draft.cache.max_len)
    t0 = time.perf_counter()
    d = time_forwards(draft, grid(max_batch, min(4, max_tokens), max_context), False, 0.4 * budget_s)
    d, d_again = retime_spikes(draft, d, False, 0.1 * budget_s)
    v = time_forwards(target, grid(max_batch, max_tokens, max_context, seed=1), True,
                      max(1.1 * budget_s - (time.perf_counter() - t0), 0.0))
    v, v_again = retime_spikes(target, v, True, 0.1 * budget_s)
    for runner in (target, draft):  # leave the caches as allocated: zeros
        for tensor in (*runner.cache.k, *runner.cache.v):
            tensor.zero_()
    meta = {**(meta or {}), "max_batch": max_batch, "max_tokens": max_tokens, "max_context": max_context,
            "profile_seconds": round(time.perf_counter() - t0, 2),
            "retimed": {"draft": d_again, "verify": v_again},
            "draft_samples": [list(s) for s in d], "verify_samples": [list(s) for s in v]}
    return CostModel(ForwardTimeModel.fit(d), ForwardTimeModel.fit(v), 0.0, True, meta)


def load_or_profile(target: ModelRunner, draft: ModelRunner, max_batch: int, max_tokens: int,
                    max_context: int, names: tuple[str, str] = ("target", "draft"),
                    reprofile: bool = False, budget_s: float = 40.0) -> CostModel:
    """The cached profile for this setup if it covers the ranges asked for, else a fresh one."""
    key = profile_key(target, draft, names)
    path = profile_path(key)
    if path.exists() and not reprofile:
        try:
            cm = CostModel.load(path)
            m = cm.meta
            if (m.get("key") == key and m["max_batch"] >= min(max_batch, target.cache.num_slots)
                    and m["max_tokens"] >= max_tokens
                    and m["max_context"] >= min(max_context, target.cache.max_len)):
                log.info("using cached step-time profile %s", path)
                return cm
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable profile %s: %s", path, exc)
    log.info("profiling draft and target step times (up to %.0fs)", budget_s)
    cm = profile(target, draft, max_batch, max_tokens, max_context, budget_s, {"key": key})
    cm.save(path)
    return cm


def profile_engine(engine, names: tuple[str, str] = ("target", "draft"), reprofile: bool = False,
                   budget_s: float = 40.0) -> CostModel:
    """Profile (or load) the cost model of an engine's model pair, before it serves anything."""
    if engine.draft is None:
        raise ValueError("profiling step times needs a draft model")
    cm = load_or_profile(engine.target, engine.draft, engine.scheduler.max_num_seqs, engine.K + 1,
                         engine.max_model_len, names, reprofile, budget_s)
    # The profile times equal-length rows; how a ragged forward costs depends on the runner's layout.
    cm.layout = "packed" if engine.target.packed else "padded"
    return cm
