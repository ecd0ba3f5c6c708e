"""Measure the shipped pair and write its model card (every number with the command behind it).

All measurements load the exported checkpoints with our own forward, in float32, on held-out text
from the deterministic split, so anyone with the same Python version reproduces them exactly.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adaspec.train import corpus

CARD_COMMAND = "python -m adaspec.train card"


def heldout_stream(tokenizer) -> np.ndarray:
    return corpus.encode_files(tokenizer, corpus.build_split().heldout)


@torch.no_grad()
def teacher_forced(target, draft, stream: np.ndarray, seq_len: int = 256, windows: int = 64) -> dict:
    """Loss of each model and top-1 agreement of draft with target, on the same held-out windows.

    Teacher forcing scores every position on real text, so a pair cannot look good by both falling
    into the same repetition loop (which free-running acceptance would reward)."""
    n = min(windows, stream.size // (seq_len + 1))
    xs = torch.from_numpy(stream[: n * (seq_len + 1)].astype(np.int64)).view(n, seq_len + 1)
    pos = torch.arange(seq_len)
    agree, loss_t, loss_d = 0, 0.0, 0.0
    for x in xs.split(8):
        inp, nxt = x[:, :-1], x[:, 1:].flatten()
        p = pos.expand(len(x), -1)
        lt = target.compute_logits(target(inp, p)).flatten(0, 1)
        ld = draft.compute_logits(draft(inp, p)).flatten(0, 1)
        loss_t += F.cross_entropy(lt, nxt, reduction="sum").item()
        loss_d += F.cross_entropy(ld, nxt, reduction="sum").item()
        agree += (lt.argmax(-1) == ld.argmax(-1)).sum().item()
    tokens = n * seq_len
    return {"tokens": tokens, "target_loss": round(loss_t / tokens, 4),
            "draft_loss": round(loss_d / tokens, 4), "top1_agreement": round(agree / tokens, 4)}


def acceptance_by_k(pair: Path, prompts: list[str], max_tokens: int = 64) -> dict:
    """Greedy speculative decoding with static k = 1..8 on held-out prompts: per-position
    acceptance (accepted / drafted at that position) and mean acceptance length."""
    from adaspec import LLM, SamplingParams

    out = {}
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for k in range(1, 9):
        llm = LLM(model=pair / "target", draft_model=pair / "draft", policy=f"static:{k}",
                  num_speculative_tokens=k, max_num_seqs=len(prompts))
        res = llm.generate(prompts, params)
        acc = np.sum([_pad(r.spec_stats["accepted_per_position"], k) for r in res], axis=0)
        dra = np.sum([_pad(r.spec_stats["drafted_per_position"], k) for r in res], axis=0)
        steps = sum(r.spec_stats["steps"] for r in res)
        out[k] = {"per_position": [round(float(a / d), 3) if d else None for a, d in zip(acc, dra,
                                                                                         strict=True)],
                  "acceptance_length": round(1 + float(acc.sum()) / steps, 3)}
    return out


def _pad(xs: list[int], k: int) -> list[int]:
    return list(xs) + [0] * (k - len(xs))


@torch.inference_mode()
def step_time_ratio(pair: Path, context: int = 128, repeats: int = 320, block: int = 8) -> dict:
    """Median decode-step time at batch 1 of target and draft (our forward, KV cache, float32), in
    alternating blocks of `block` steps of each model: this host's speed drifts by up to 1.5x
    within a minute (measured: the same target 3.65 ms, then 2.48 ms, timed one model after the
    other), and alternating puts the same drift into both medians; blocks, as drafting runs the
    draft several steps in a row (alternating single steps evicts each model's weights from the
    caches: the draft's step then took 0.74 ms where it takes 0.63 in a row)."""
    from adaspec.engine.runner import ModelRunner, Row
    from adaspec.model import load_model

    runners = {}
    for which in ("target", "draft"):
        runners[which] = ModelRunner(load_model(pair / which), 1, context + 8, torch.float32,
                                     torch.device("cpu"))
        runners[which].run([Row(0, list(range(1, context + 1)), 0, want=1)])
    samples: dict[str, list[float]] = {"target": [], "draft": []}
    for _ in range(repeats // block):
        for which, runner in runners.items():
            for _ in range(block):
                t0 = time.perf_counter()
                runner.run([Row(0, [7], context, want=1)])
                samples[which].append(time.perf_counter() - t0)
    times = {k: statistics.median(v) for k, v in samples.items()}
    return {"target_ms": round(times["target"] * 1e3, 3), "draft_ms": round(times["draft"] * 1e3, 3),
            "ratio": round(times["target"] / times["draft"], 2), "threads": torch.get_num_threads(),
            "context": context}


def greedy_samples(pair: Path, prompts: list[str], max_tokens: int = 64) -> list[dict]:
    from adaspec import LLM, SamplingParams

    llm = LLM(model=pair / "target", policy="none")
    res = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    return [{"prompt": p, "completion": r.text} for p, r in zip(prompts, res, strict=True)]


def measure(pair: Path) -> dict:
    from adaspec.model import load_model, load_tokenizer

    tok = load_tokenizer(pair / "target")
    target, draft = load_model(pair / "target"), load_model(pair / "draft")
    rows = [json.loads(x) for x in (pair / "prompts.jsonl").read_text().splitlines()]
    prompts = [r["turns"][0] for r in rows]
    return {
        "python": platform.python_version(),
        "params": {"target": sum(p.numel() for p in target.parameters()),
                   "draft": sum(p.numel() for p in draft.parameters())},
        "heldout": teacher_forced(target, draft, heldout_stream(tok)),
        "acceptance_by_k": acceptance_by_k(pair, prompts[:16]),
        "step_time": step_time_ratio(pair),
        "samples": greedy_samples(pair, prompts[:3]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
    }


def training_summary(workdir: Path, cfg) -> dict:
    """Steps and tokens seen per model: this work directory's run (from its log and config) plus,
    when it continued from an exported pair, that pair's own training (recorded in the log when
    training started from it)."""
    steps = {"target": 0, "draft": 0}
    prior = {"target": {"steps": 0, "tokens": 0}, "draft": {"steps": 0, "tokens": 0}}
    for line in (workdir / "train.log").read_text().splitlines():
        rec = json.loads(line)
        name = rec.get("phase")
        if name not in steps:
            continue
        if "step" in rec:
            steps[name] = max(steps[name], rec["step"])
        if "prior" in rec:
            prior[name] = rec["prior"]
    batch = {"target": cfg.target_batch, "draft": cfg.draft_batch}
    out = {}
    for name in steps:
        out[f"{name}_steps"] = prior[name]["steps"] + steps[name]
        out[f"{name}_tokens"] = prior[name]["tokens"] + steps[name] * batch[name] * cfg.seq_len
        if prior[name]["steps"]:
            out[f"{name}_stages"] = [prior[name]["steps"], steps[name]]
    return out


def _training_cell(train: dict, name: str) -> str:
    stages = train.get(f"{name}_stages")
    steps = " + ".join(f"{s:,}" for s in stages) if stages else f"{train[f'{name}_steps']:,}"
    return f"{steps} steps, {train[f'{name}_tokens']:,} tokens"


def _reproduce(train: dict, cfg) -> list[str]:
    """The commands that rebuild this pair: one run, or a first run and its continuation (the
    exported pair's own training counts as one run: a pair continued twice needs its history)."""
    t, d = train.get("target_stages"), train.get("draft_stages")
    if not (t or d):
        return ["Reproduce: `python -m adaspec.train all` (prepare, target, draft, eval, export; resumable),",
                f"then `{CARD_COMMAND}` re-measures every number below and rewrites this card."]
    t = t or [0, train.get("target_steps", 0)]
    d = d or [0, train.get("draft_steps", 0)]
    return [f"Reproduce: `python -m adaspec.train all --target-steps {t[0]} --draft-steps {d[0]} "
            "--workdir runs/pair` (prepare, target,",
            "draft, eval, export into adaspec/models/default; resumable), then continue from that export:",
            f"`python -m adaspec.train all --workdir runs/pair2 --init-from adaspec/models/default "
            f"--target-steps {t[1]} --draft-steps {d[1]}"
            + (f" --top1-weight {cfg.top1_weight}" if cfg.top1_weight else "") + "`,",
            f"which ends with `{CARD_COMMAND}` re-measuring every number below and rewriting this card."]


def render(res: dict, train: dict, valid: dict, cfg) -> str:
    """The model card in Markdown."""
    acc = res["acceptance_by_k"]
    st = res["step_time"]
    lines = [
        "# adaspec embedded default pair",
        "",
        "A target and a draft model in the Llama architecture (Hugging Face layout), trained by this",
        "project on the CPython standard library so that the demo, the benchmarks and `LLM()` have a",
        "real pair without any download. They are small and weak: useful to exercise speculative",
        "decoding end to end, not to write code.",
        "",
        *_reproduce(train, cfg),
        "",
        "## Corpus and split",
        f"- Python {res['python']} standard library `.py` files (tests excluded), split by file with",
        "  a hash of the relative path: 90% train, 5% validation, 5% held-out (prompts and the figures",
        "  below). See `adaspec/train/corpus.py`.",
        f"- Byte-level BPE tokenizer, vocabulary {cfg.vocab_size}, trained on the train split.",
        "",
        "## Models",
        "| | target | draft |",
        "|---|---|---|",
        f"| parameters | {res['params']['target']:,} | {res['params']['draft']:,} |",
        f"| layers / hidden / heads (kv) | {cfg.target.num_hidden_layers} / {cfg.target.hidden_size} / "
        f"{cfg.target.num_attention_heads} ({cfg.target.num_key_value_heads}) | "
        f"{cfg.draft.num_hidden_layers} / {cfg.draft.hidden_size} / {cfg.draft.num_attention_heads} "
        f"({cfg.draft.num_key_value_heads}) |",
        f"| training | {_training_cell(train, 'target')}, data loss | "
        f"{_training_cell(train, 'draft')}, distilled: "
        f"{cfg.kd_weight} KL(target‖draft) + {1 - cfg.kd_weight:.1f} data loss"
        + (f" + {cfg.top1_weight} CE to the target's top token" if cfg.top1_weight else "") + " |",
        f"| validation loss (nats/token, training checkpoint) | {valid.get('target_loss')} | "
        f"{valid.get('draft_loss')} |",
        f"| held-out loss (exported weights) | {res['heldout']['target_loss']} | "
        f"{res['heldout']['draft_loss']} |",
        "",
        "Weights are stored in float16 and loaded in float32 on the CPU.",
        "",
        "## Agreement and speculation (held-out)",
        f"- Teacher-forced top-1 agreement of draft with target: **{res['heldout']['top1_agreement']}**",
        f"  over {res['heldout']['tokens']:,} held-out tokens (bar: >= 0.65).",
        f"- Decode step time at batch 1, context {st['context']}, our forward with KV cache: target "
        f"{st['target_ms']} ms, draft {st['draft_ms']} ms, ratio **{st['ratio']}** (bar: >= 5;",
        f"  {res['machine']}).",
        "- Greedy speculative decoding with static k on 16 held-out prompts, 64 tokens each:",
        "",
        "| k | mean acceptance length | acceptance at positions 1..k |",
        "|---|---|---|",
    ]
    for k, row in acc.items():
        lines.append(f"| {k} | {row['acceptance_length']} | "
                     + ", ".join("-" if x is None else f"{x:.2f}" for x in row["per_position"]) + " |")
    lines += ["", "Position j's figure is accepted / drafted at j (conditional on reaching j). Free-running",
              "greedy acceptance flatters a weak pair (both models fall into the same repetition, see the",
              "samples below); the teacher-forced agreement above is the figure to judge the pair by.", "",
              "## Greedy samples from the target", "",
              f"The target saw {train.get('target_tokens', 0) / 1e6:.1f}M tokens on two CPU cores "
              "(the train split holds about 3.2M).",
              *(["Steps written a + b: trained a steps, then continued b more from the exported weights",
                 "with a fresh learning-rate schedule (warm-up, cosine decay)."]
                if train.get("target_stages") or train.get("draft_stages") else []),
              "For a stronger pair, continue with",
              "`python -m adaspec.train all --target-steps N --draft-steps M` (resumes from the work",
              "directory's checkpoints; on a machine without them add `--init-from adaspec/models/default`",
              "to start from the shipped weights and tokenizer).", ""]
    for s in res["samples"]:
        lines += ["```python", s["prompt"] + s["completion"], "```", ""]
    return "\n".join(lines) + "\n"
