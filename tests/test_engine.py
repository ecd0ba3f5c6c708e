"""Speculation never changes outputs: greedy equality, continuous batching, stops, bad input."""

from __future__ import annotations

import random
import re

import pytest
import torch

from adaspec import LLM, SamplingParams
from adaspec.spec.policy import BatchView, Policy, StaticK

PROMPTS = ["def add(a, b):", "class Point:", "for i in range(10):", "import os\nimport sys",
           "    self.x = x", "print(", "if __name__ == '__main__':", "return a + b",
           "def __init__(self, x, y):", "x", "import", "class", "for", "main(sys.argv)", "y", "    "]


def llm(pair, policy="none", k=8, **kw):
    target, draft, _ = pair
    kw.setdefault("dtype", torch.float64)  # float64: argmax ties from reduction order cannot flip
    kw.setdefault("max_model_len", 128)
    return LLM(model=target, draft_model=draft, policy=policy, num_speculative_tokens=k, **kw)


def greedy(n=24, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def reference(tiny_pair):
    """Plain greedy decoding of every prompt, alone."""
    plain = llm(tiny_pair, "none")
    return {p: plain.generate(p, greedy())[0].token_ids for p in PROMPTS}


class RaggedPolicy(Policy):
    """Random per-request budgets, early stops and pruning: exercises every ragged path."""

    name = "ragged-test"
    uses_draft = True

    def __init__(self, seed=0):
        self.rng = random.Random(seed)

    def plan(self, batch: BatchView):
        return [self.rng.randint(0, batch.num_speculative_tokens) for _ in batch.requests]

    def keep_drafting(self, batch, active):
        return [a and self.rng.random() < 0.8 for a in active]

    def prune(self, batch):
        return [self.rng.randint(0, len(r.confidences)) for r in batch.requests]


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("bsz", [1, 5, 16])
def test_greedy_static_k_identical(tiny_pair, reference, k, bsz):
    spec = llm(tiny_pair, f"static:{k}", k=k)
    outs = spec.generate(PROMPTS[:bsz], greedy())
    for p, o in zip(PROMPTS[:bsz], outs, strict=True):
        assert o.token_ids == reference[p], p
    drafted = sum(o.spec_stats["drafted"] for o in outs)
    accepted = sum(o.spec_stats["accepted"] for o in outs)
    assert drafted > 0 and 0 < accepted < drafted  # both acceptance and rejection happened


def test_greedy_ragged_policy_identical(tiny_pair, reference):
    spec = llm(tiny_pair, RaggedPolicy(), k=6)
    outs = spec.generate(PROMPTS, greedy())
    assert [o.token_ids for o in outs] == [reference[p] for p in PROMPTS]


def test_greedy_small_unrelated_draft(tiny_pair, reference):
    target, _, small = tiny_pair
    spec = LLM(model=target, draft_model=small, policy="static:3", dtype=torch.float64, max_model_len=128)
    outs = spec.generate(PROMPTS[:6], greedy())
    assert [o.token_ids for o in outs] == [reference[p] for p in PROMPTS[:6]]


def test_requests_join_mid_run(tiny_pair, reference):
    """Continuous batching: requests arrive while others decode; each output equals its solo run."""
    engine = llm(tiny_pair, RaggedPolicy(1), k=5, max_num_seqs=4).engine
    seqs, queue, steps = [], list(PROMPTS), 0
    while queue or engine.has_unfinished():
        if queue and steps % 3 == 0:
            seqs.append((queue[0], engine.add_request(queue.pop(0), greedy())))
        engine.step()
        steps += 1
        assert engine.num_running <= 4
    for p, s in seqs:
        assert s.output_token_ids == reference[p], p


def test_draft_cache_consistent_after_nonspec_steps(tiny_pair, reference):
    """Steps without speculation leave the draft behind; it must catch up without holes, so
    acceptance afterwards matches a run that speculated every step."""

    class Alternate(StaticK):
        def __init__(self):
            super().__init__(4)
            self.t = 0

        def plan(self, batch):
            self.t += 1
            return [0] * len(batch.requests) if self.t % 3 else super().plan(batch)

    plain = llm(tiny_pair, "none").generate(PROMPTS[:4], greedy(40))
    outs = llm(tiny_pair, Alternate(), k=4).generate(PROMPTS[:4], greedy(40))
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    engine = llm(tiny_pair, Alternate(), k=4).engine
    seq = engine.add_request(PROMPTS[0], greedy(40))
    while engine.has_unfinished():
        engine.step()
        if not seq.finished:
            assert seq.draft_len <= seq.target_len == len(seq.tokens) - 1
    # Compare draft acceptance with an always-speculating run on the same request.
    always = llm(tiny_pair, "static:4", k=4).generate(PROMPTS[0], greedy(40))[0]
    rate_alt = seq.stats.acceptance_rate
    assert rate_alt > 0 and abs(rate_alt - always.spec_stats["acceptance_rate"]) < 0.35


def test_stop_string_same_with_and_without_speculation(tiny_pair, reference):
    plain = llm(tiny_pair, "none")
    text = plain.generate(PROMPTS[0], greedy(40))[0].text
    words = re.findall(r"[A-Za-z]{2,}", text[8:])  # a stop string of whole characters, mid-output
    assert words
    stop = words[0]
    a = plain.generate(PROMPTS[0], greedy(40, stop=[stop]))[0]
    b = llm(tiny_pair, "static:8").generate(PROMPTS[0], greedy(40, stop=[stop]))[0]
    assert a.finish_reason == b.finish_reason == "stop"
    assert a.text == b.text == text[: text.index(stop)]
    assert a.token_ids == b.token_ids


def test_eos_and_ignore_eos(tiny_pair, reference):
    for policy in ("none", "static:8"):
        engine_llm = llm(tiny_pair, policy)
        ref = reference[PROMPTS[0]]
        engine_llm.engine.eos_ids = {ref[5]}
        stop_at = ref.index(ref[5]) + 1
        out = engine_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24))[0]
        assert out.finish_reason == "stop" and out.token_ids == ref[:stop_at]
        out = engine_llm.generate(PROMPTS[0], greedy())[0]
        assert out.finish_reason == "length" and out.token_ids == ref


def test_max_model_len_and_max_tokens(tiny_pair):
    for policy in ("none", "static:8"):
        small = llm(tiny_pair, policy, max_model_len=20)
        out = small.generate(PROMPTS[0], greedy(100))[0]
        assert out.finish_reason == "length"
        assert len(out.prompt_token_ids) + len(out.token_ids) == 20
        out = llm(tiny_pair, policy).generate(PROMPTS[1], greedy(7))[0]
        assert len(out.token_ids) == 7 and out.finish_reason == "length"


@pytest.mark.parametrize("bad, field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-5), "top_k"), (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_params(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


def test_invalid_requests_do_not_disturb_others(tiny_pair, reference):
    spec = llm(tiny_pair, "static:3", max_model_len=64)
    engine = spec.engine
    good = [engine.add_request(p, greedy()) for p in PROMPTS[:3]]
    engine.step()
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("", greedy())
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("def add(a, b):\n" * 40, greedy())
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request([10**9], greedy())
    with pytest.raises(ValueError, match="prompt"):
        spec.generate(["x", ""], greedy())
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in good] == [reference[p] for p in PROMPTS[:3]]
    assert spec.generate(PROMPTS[3], greedy())[0].token_ids == reference[PROMPTS[3]]


def test_mismatched_tokenizer_rejected(tiny_pair, tmp_path):
    from conftest import make_tokenizer, save_llama

    target, _, _ = tiny_pair
    other = make_tokenizer(300, text="completely different text " * 50)
    save_llama(tmp_path / "d", len(other), other)
    with pytest.raises(ValueError, match="(?i)tokenizer|vocab"):
        LLM(model=target, draft_model=tmp_path / "d", policy="static:2")


def test_unknown_policy_and_missing_draft(tiny_pair):
    target, _, _ = tiny_pair
    with pytest.raises(ValueError, match="policy"):
        llm(tiny_pair, "sometimes")
    with pytest.raises(ValueError, match="draft_model"):
        LLM(model=target, policy="static:2")


def test_abort_frees_slot(tiny_pair):
    engine = llm(tiny_pair, "static:2", max_num_seqs=1).engine
    a = engine.add_request(PROMPTS[0], greedy(50))
    b = engine.add_request(PROMPTS[1], greedy(5))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    assert engine.abort_request(a.request_id)
    assert a.finish_reason == "abort" and engine.scheduler.free_slots == [0]
    while engine.has_unfinished():
        engine.step()
    assert b.finish_reason == "length" and b.num_output_tokens == 5


def test_telemetry_records_steps(tiny_pair, tmp_path):
    import json

    spec = llm(tiny_pair, "static:3", k=3)
    spec.generate(PROMPTS[:4], greedy(10))
    spec.engine.export_telemetry(tmp_path / "t.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(lines) == len(spec.engine.telemetry) and lines[0]["kind"] == "prefill"
    recs = [r for r in spec.engine.telemetry if r.kind == "decode"]
    assert recs and all(len(r.drafted) == r.batch_size == len(r.accepted) for r in recs)
    assert all(a <= d <= 3 for r in recs for a, d in zip(r.accepted, r.drafted, strict=True))
    assert all(r.verify_time > 0 and r.step_time >= r.verify_time + r.draft_time for r in recs)
    assert all(r.draft_time > 0 for r in recs if sum(r.drafted))
    # the first draft forward is timed apart (the cost model corrects it apart from the later ones)
    assert all(0 < r.draft_first_time < r.draft_time for r in recs if r.draft_steps > 1)
    assert all(r.draft_first_time == r.draft_time for r in recs if r.draft_steps == 1)


def test_half_precision_runs(tiny_pair):
    for dtype in ("bfloat16", "float16"):
        out = llm(tiny_pair, "static:3", dtype=dtype).generate(PROMPTS[:3], greedy(8))
        assert all(len(o.token_ids) == 8 for o in out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_identical_on_cuda(tiny_pair, reference):
    """Run on a GPU machine: the same equality as on the CPU, with the engine on CUDA."""
    spec = llm(tiny_pair, "static:3", k=3, device="cuda", dtype=torch.float32)
    plain = llm(tiny_pair, "none", device="cuda", dtype=torch.float32)
    a = spec.generate(PROMPTS[:8], greedy())
    b = plain.generate(PROMPTS[:8], greedy())
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert sum(o.spec_stats["accepted"] for o in a) > 0


def test_engine_freezes_its_start_up_heap_and_frees_a_dropped_engine(tiny_pair):
    """After start-up the heap is frozen (full GC passes skip it); a dropped engine is still freed,
    cycles included, by the time the next one is built (its KV cache would otherwise leak)."""
    import gc
    import weakref

    from adaspec.engine import host
    from adaspec.llm import build_engine

    target, draft, _ = tiny_pair
    first = build_engine(str(target), str(draft), "static:2", 4, max_num_seqs=2, max_model_len=64)
    assert gc.get_freeze_count() > 0
    first.engine_cycle = first  # a reference cycle through the engine
    ref = weakref.ref(first)
    del first
    gc.collect()
    second = build_engine(str(target), str(draft), "static:2", 4, max_num_seqs=2, max_model_len=64)
    assert ref() is None and second is not None
    assert host.tune_allocator() == host.tune_allocator()  # once per process, same answer


def test_scheduler_compacts_slots_lowest_first():
    """Running requests keep slots 0..n-1 in slot order: a freed slot takes the highest request."""
    from adaspec.engine.scheduler import Scheduler
    from adaspec.engine.sequence import Sequence

    sched = Scheduler(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=64)
    seqs = [Sequence(str(i), [1, 2], SamplingParams(), None, None, "cpu") for i in range(5)]
    for s in seqs:
        sched.add(s)
    assert [s.slot for s in sched.schedule_prefill()] == [0, 1, 2, 3]
    sched.finish(seqs[1], "stop")
    assert sched.compact() == [(seqs[3], 3, 1)]
    assert [(s.request_id, s.slot) for s in sched.running] == [("0", 0), ("3", 1), ("2", 2)]
    assert sched.compact() == []
    assert [s.slot for s in sched.schedule_prefill()] == [3]  # the waiting one gets the free slot
    sched.finish(seqs[0], "stop")
    sched.finish(seqs[2], "stop")
    assert [(s.request_id, old, new) for s, old, new in sched.compact()] == [("4", 3, 0)]
    assert [s.slot for s in sched.running] == [0, 1] and sorted(sched.free_slots) == [2, 3]


def test_compacted_slots_keep_outputs(tiny_pair, reference):
    """Requests finishing at different times free slots below running ones; their cache rows move
    down (target and draft), and every output is still its solo run's."""
    engine = llm(tiny_pair, RaggedPolicy(2), k=5, max_num_seqs=6).engine
    moves, verified = [], []
    for runner in (engine.target, engine.draft):
        move = runner.move_slot
        runner.move_slot = lambda src, dst, n, move=move: (moves.append((src, dst)), move(src, dst, n))
    run = engine.target.run
    engine.target.run = lambda rows: (verified.append([r.slot for r in rows]), run(rows))[1]
    lengths = [5, 24, 9, 24, 14, 24, 7, 24, 24, 3, 24, 18]
    queue, seqs, steps = list(zip(PROMPTS[:12], lengths, strict=True)), [], 0
    while queue or engine.has_unfinished():
        if queue and (steps % 4 == 0 or steps < 6):
            p, n = queue.pop(0)
            seqs.append((p, n, engine.add_request(p, greedy(n))))
        engine.step()
        steps += 1
    for slots in verified:  # every target forward (prefill, decode) reads a contiguous run of slots
        assert slots == list(range(slots[0], slots[0] + len(slots)))
    assert len(moves) >= 6  # both runners, at least three moves each
    for p, n, s in seqs:
        assert s.output_token_ids == reference[p][:n], p
