"""Benchmark building blocks: traces and workloads, metric formulas against hand-computed values, and
the client's send times against a fake server (httpx MockTransport, no sockets)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest

from adaspec.bench.client import chunk_token_counts, run_requests
from adaspec.bench.metrics import RequestResult, meets_slo, summarize, timeline
from adaspec.bench.workload import BenchRequest, LengthRule, build_workload, load_trace, parse_arrivals

# ------------------------------------------------------------------------------------ traces


def write(tmp_path, text: str, name: str = "t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_trace_loads_and_replays_shifted_scaled_and_cut(tmp_path):
    p = write(tmp_path, "Timestamp\n10.0\n10.5\n12\n\n14.0\n")
    assert load_trace(p) == [10.0, 10.5, 12.0, 14.0]
    w = build_workload("synthetic:4", trace=str(p), time_scale=2.0, duration=5.0)
    assert [r.arrival for r in w.requests] == [0.0, 1.0, 4.0]  # (t - 10) * 2, cut before 5 s
    assert [r.arrival for r in w.at_rate_scale(2.0)] == [0.0, 0.5, 2.0]
    raw = build_workload("synthetic:4", trace=str(p), shift_trace=False)
    assert raw.requests[0].arrival == 10.0 and "shifted by -0" in raw.description["arrivals"]


@pytest.mark.parametrize("text, where, what", [
    ("Timestamp\n1.0\n2.0\nabc\n3.0\n", "line 4", "'abc' is not a number"),
    ("Timestamp\n1.0\n0.5\n", "line 3", "earlier than the previous"),
    ("time\n1.0\n", "line 1", "'Timestamp' column"),
    ("Timestamp\n1.0\n-2\n", "line 3", ">= 0"),
    ("Timestamp\n1.0\nnan\n", "line 3", "finite"),
    ("Timestamp,x\n1.0,a\n,b\n", "line 3", "is not a number"),
    ("Timestamp\n", "no arrivals", ""),
])
def test_bad_trace_names_the_line(tmp_path, text, where, what):
    p = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        load_trace(p)
    assert str(p) in str(e.value) and where in str(e.value) and what in str(e.value)


# ----------------------------------------------------------------------------------- workload


def test_workload_is_seeded_and_same_across_rate_scales():
    kw = dict(prompts="synthetic:16", arrivals="gamma:4:2", num_requests=30, output_len="sampled:40")
    a, b, c = build_workload(**kw, seed=1), build_workload(**kw, seed=1), build_workload(**kw, seed=2)
    assert [r.as_dict() for r in a.requests] == [r.as_dict() for r in b.requests]
    assert [r.arrival for r in a.requests] != [r.arrival for r in c.requests]
    fast = a.at_rate_scale(4.0)
    assert [r.prompt for r in fast] == [r.prompt for r in a.requests]
    assert [r.arrival * 4 for r in fast] == pytest.approx([r.arrival for r in a.requests])
    assert all(r.ignore_eos for r in a.requests) and a.description["num_requests"] == 30


def test_generated_arrivals_rates_and_burstiness():
    rng = np.random.default_rng(0)
    t, _ = parse_arrivals("poisson:5", rng, 4000, None)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.2, rel=0.08)
    assert gaps.std() / gaps.mean() == pytest.approx(1, abs=0.1)
    t, _ = parse_arrivals("gamma:5:3", rng, 4000, None)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.2, rel=0.25) and gaps.std() / gaps.mean() > 2
    t, desc = parse_arrivals("phases:1@20,10@5", rng, None, None)
    quiet, burst = [x for x in t if x < 20], [x for x in t if x >= 20]
    assert 10 < len(quiet) < 35 and 30 < len(burst) < 75 and max(t) < 25 and "then" in desc
    for bad in ("poisson:0", "gamma:1", "phases:1@", "uniform:3", "poisson:x"):
        with pytest.raises(ValueError, match="arrivals must be"):
            parse_arrivals(bad, rng, 10, None)


def test_output_length_rules():
    rng = np.random.default_rng(0)
    assert LengthRule.parse("eos:256").ignore_eos is False
    assert LengthRule.parse("fixed:32").sample(["qa", "writing"], rng) == [32, 32]
    rule = LengthRule.parse("sampled:100:0.3")
    writing = rule.sample(["writing"] * 400, rng)
    qa = rule.sample(["qa"] * 400, rng)
    assert np.mean(writing) == pytest.approx(150, rel=0.1) and np.mean(qa) == pytest.approx(50, rel=0.1)
    assert min(qa) >= 1 and max(writing) <= 400 and "ignore_eos=true" in rule.describe()
    for bad in ("fixed", "fixed:0", "eos:x", "sampled:10:-1", "natural"):
        with pytest.raises(ValueError, match="output length rule"):
            LengthRule.parse(bad)


def test_spec_bench_prompts_with_categories(tmp_path):
    rows = [{"question_id": 1, "category": "qa", "turns": ["Who?"]},
            {"question_id": 2, "category": "writing", "turns": ["Write.", "More."]}]
    p = write(tmp_path, "\n".join(json.dumps(r) for r in rows) + "\n", "q.jsonl")
    w = build_workload(str(p), arrivals="poisson:10", num_requests=6, output_len="sampled:20")
    assert {r.prompt for r in w.requests} == {"Who?", "Write."}
    assert {r.category for r in w.requests} == {"qa", "writing"}
    bad = write(tmp_path, json.dumps(rows[0]) + "\n{\"turns\": []}\n", "bad.jsonl")
    with pytest.raises(ValueError, match="line 2"):
        build_workload(str(bad))


# ------------------------------------------------------------------------------------ metrics


def hand_results() -> list[RequestResult]:
    r1 = RequestResult(0, 0.0, 0.0, success=True, output_tokens=5, prompt_tokens=7, ttft=0.1, e2e=0.5,
                       chunk_times=[0.1, 0.2, 0.5], chunk_tokens=[1, 2, 2],
                       spec_stats={"drafted": 6, "accepted": 3, "steps": 3, "drafted_per_position": [3, 3],
                                   "accepted_per_position": [2, 1]})
    r2 = RequestResult(1, 0.5, 0.5, success=True, output_tokens=1, prompt_tokens=3, ttft=0.2, e2e=0.25,
                       chunk_times=[0.2], chunk_tokens=[1],
                       spec_stats={"drafted": 0, "accepted": 0, "steps": 1, "drafted_per_position": [],
                                   "accepted_per_position": []})
    r3 = RequestResult(2, 1.0, 1.01, success=False, error="HTTP 503: overloaded")
    return [r1, r2, r3]


def test_metric_formulas_hand_computed():
    r1, r2, r3 = hand_results()
    assert r1.tpot == pytest.approx(0.1)  # (0.5 - 0.1) / (5 - 1)
    assert r2.tpot is None and r3.tpot is None  # 1 token; failed
    assert r1.itl == pytest.approx([0.1, 0.3])
    assert r1.itl_per_token == pytest.approx([0.05, 0.05, 0.15, 0.15])
    s = summarize([r1, r2, r3], duration=2.0, ttft_slo_ms=150, tpot_slo_ms=150)
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (2, 1, 6)
    assert s["output_throughput"] == pytest.approx(3.0) and s["request_throughput"] == pytest.approx(1.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(150) and s["ttft_ms"]["p99"] == pytest.approx(199)
    assert s["tpot_ms"] == pytest.approx({"mean": 100, "median": 100, "p90": 100, "p99": 100})
    assert s["e2e_ms"]["mean"] == pytest.approx(375) and s["e2e_ms"]["median"] == pytest.approx(375)
    assert s["itl_ms"]["mean"] == pytest.approx(200) and s["itl_per_token_ms"]["mean"] == pytest.approx(100)
    # r1 meets both; r2's TTFT 200 ms misses; the failed r3 misses
    assert s["slo"]["attainment"] == pytest.approx(1 / 3) and s["slo"]["goodput"] == pytest.approx(0.5)
    assert s["send_lag_ms"]["max"] == pytest.approx(10)
    sp = s["spec"]
    assert sp["acceptance_rate"] == pytest.approx(0.5) and sp["acceptance_length"] == pytest.approx(1.75)
    assert sp["acceptance_rate_per_request"] == pytest.approx(0.5)  # r2 drafted nothing: no rate
    assert sp["acceptance_length_per_request"] == pytest.approx(1.5)  # mean of 2.0 and 1.0
    assert sp["mean_spec_length"] == pytest.approx(1.5)
    assert sp["acceptance_per_position"] == pytest.approx([2 / 3, 1 / 3])


def test_slo_one_token_outputs_and_failures():
    r1, r2, r3 = hand_results()
    # TPOT-only SLO of 50 ms: r1 (100 ms) misses, the 1-token r2 counts as TPOT 0 and meets it
    assert [meets_slo(r, None, 0.05) for r in (r1, r2, r3)] == [False, True, False]
    s = summarize([r1, r2, r3], 2.0, tpot_slo_ms=50)
    assert s["slo"]["attainment"] == pytest.approx(1 / 3) and s["slo"]["met"] == 1
    nos = summarize([r1, r2, r3], 2.0)
    assert nos["slo"]["attainment"] is None and nos["slo"]["goodput"] is None
    only_failed = summarize([r3], 1.0, tpot_slo_ms=1000)
    assert only_failed["slo"]["attainment"] == 0 and only_failed["tpot_ms"]["mean"] is None


def test_timeline_and_chunk_token_estimates():
    r1, r2, r3 = hand_results()
    tl = timeline([r1, r2, r3], duration=2.0, bin_s=1.0)
    assert tl["arrival_rate"] == [2.0, 1.0]  # scheduled at 0, 0.5 | 1.0
    assert tl["output_throughput"] == [6.0, 0.0]  # all chunks land before 1 s
    assert chunk_token_counts(["ab", "c", "def"], 12) == pytest.approx([4, 2, 6])
    assert chunk_token_counts([], 0) == []


# ------------------------------------------------------------------------- client vs fake server


def fake_server(log: list, stream_s: float = 0.4, fail_index: int | None = None):
    """An OpenAI-style streaming endpoint: records when each request arrived (perf_counter) and
    streams 'a', 'bc' then a finish chunk with spec_stats, usage and [DONE] over `stream_s`."""

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake", "max_model_len": 512, "policy": "p"}]})
        if request.url.path != "/v1/completions":
            return httpx.Response(404, json={"error": {"message": "no"}})
        body = json.loads(request.content)
        log.append((time.perf_counter(), body))
        if body["prompt"] == f"p{fail_index}":
            return httpx.Response(503, json={"error": {"message": "overloaded"}})

        async def events():
            def ev(d):
                return f"data: {json.dumps(d)}\n\n".encode()
            await asyncio.sleep(stream_s / 4)
            yield ev({"choices": [{"text": "a", "finish_reason": None}]})
            await asyncio.sleep(stream_s / 4)
            yield ev({"choices": [{"text": "bc", "finish_reason": None}]})
            await asyncio.sleep(stream_s / 2)
            yield ev({"choices": [{"text": "", "finish_reason": "length"}],
                      "spec_stats": {"drafted": 2, "accepted": 1, "steps": 2}, "slo": {"met": True}})
            yield ev({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}})
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    return httpx.MockTransport(handler)


def reqs(arrivals):
    return [BenchRequest(i, f"p{i}", "c", 3, True, t) for i, t in enumerate(arrivals)]


def test_open_loop_sends_at_arrival_times_regardless_of_earlier_requests():
    log: list = []
    arrivals = [0.0, 0.15, 0.15, 0.4, 0.7]  # every response takes 0.4 s: several overlap
    t0 = time.perf_counter()
    out = asyncio.run(run_requests("http://fake", reqs(arrivals), tpot_slo_ms=80, scrape=False,
                                   transport=fake_server(log, fail_index=3)))
    start = log[0][0]
    sent = sorted(t - start for t, _ in log)
    assert sent == pytest.approx(arrivals, abs=0.05)
    assert start - t0 < 0.5
    assert all(b["stream"] and b["ignore_eos"] and b["slo"] == {"tpot_ms": 80} for _, b in log)
    res = out["results"]
    assert [r.success for r in res] == [True, True, True, False, True]
    assert "HTTP 503" in res[3].error
    ok = res[0]
    assert ok.output_tokens == 3 and ok.text == "abc" and ok.spec_stats["drafted"] == 2
    assert ok.ttft == pytest.approx(0.1, abs=0.05) and ok.e2e == pytest.approx(0.4, abs=0.08)
    assert ok.tpot == pytest.approx((ok.e2e - ok.ttft) / 2)
    assert ok.chunk_tokens == pytest.approx([1, 2])
    assert max(r.sent - r.scheduled for r in res) < 0.05
    s = summarize(res, out["duration"], tpot_slo_ms=1000)
    assert s["failed"] == 1 and s["slo"]["attainment"] == pytest.approx(0.8)
    assert out["duration"] == pytest.approx(0.7 + 0.4, abs=0.15)


def test_closed_loop_keeps_concurrency():
    log: list = []
    out = asyncio.run(run_requests("http://fake", reqs([5.0] * 4), mode="closed", concurrency=2,
                                   scrape=False, transport=fake_server(log, stream_s=0.3)))
    sent = sorted(t - log[0][0] for t, _ in log)
    # arrival times are ignored; two at once, the next two when those finish
    assert sent[:2] == pytest.approx([0, 0], abs=0.05) and sent[2:] == pytest.approx([0.3, 0.3], abs=0.08)
    assert all(r.success for r in out["results"])
    with pytest.raises(ValueError):
        asyncio.run(run_requests("http://fake", reqs([0]), mode="closed", concurrency=0, scrape=False,
                                 transport=fake_server([])))


def test_demo_reports_a_missing_pair(monkeypatch, tmp_path, capsys):
    import adaspec.demo as demo
    from adaspec.cli import build_parser

    assert len(demo.builtin_prompts(3)) == 3 and all(isinstance(p, str) for p in demo.builtin_prompts(3))
    monkeypatch.setattr(demo, "DEFAULT_PAIR", tmp_path)
    args = build_parser().parse_args(["demo"])
    assert demo.run_demo(args) == 1
    assert "embedded model pair is missing" in capsys.readouterr().out


def test_bench_cli_rejects_bad_levels_and_slo(capsys):
    from adaspec.cli import build_parser

    p = build_parser()
    for argv in (["bench", "sweep", "--rate-scale", "0,1"], ["bench", "sweep", "--slo-tpot-ms", "auto:x"],
                 ["bench", "sweep", "--concurrency", "1.5"], ["bench", "run"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
    a = p.parse_args(["bench", "sweep", "--rate-scale", "0.5,1,2", "--slo-tpot-ms", "auto:2"])
    assert a.rate_scale == [0.5, 1.0, 2.0] and a.slo_tpot_ms == "auto:2"


def _fake_sweep(d, tpot: dict[str, float]):
    d.mkdir(parents=True)
    runs = [{"policy": p, "level": 1.0, "tpot_ms": {"mean": t, "p99": 2 * t}, "ttft_ms": {"mean": 50.0},
             "slo": {"attainment": 1.0 if t < 20 else 0.5}, "output_throughput": 100.0}
            for p, t in tpot.items()]
    (d / "summary.json").write_text(json.dumps({"meta": {}, "runs": runs}))
    return d


def test_repeats_pool_sweeps_and_rotate_policy_order(tmp_path):
    """Repeats are pooled per policy and level (mean, min-max) and adaspec's distance from the best
    is stated; the policy order rotates by one each repeat; a folder that is not a sweep is named."""
    from adaspec.bench.repeats import rotated, write

    orders = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert [rotated(["a", "b", "c"], k) for k in range(4)] == orders
    dirs = [_fake_sweep(tmp_path / "r1", {"static:3": 18.0, "adaspec": 20.0}),
            _fake_sweep(tmp_path / "r2", {"adaspec": 22.0, "static:3": 20.0})]
    text = write(dirs, tmp_path / "out" / "repeats")
    assert "| adaspec | 21.00 (20.00-22.00) |" in text and "| static:3 | 19.00 (18.00-20.00) |" in text
    assert "mean TPOT (ms): `adaspec` 10.5% behind static:3 (over the 5% bar)" in text
    rows = json.loads((tmp_path / "out" / "repeats.json").read_text())
    assert {(r["policy"], r["repeats"]) for r in rows} == {("adaspec", 2), ("static:3", 2)}
    with pytest.raises(ValueError, match="nosweep"):
        write([tmp_path / "nosweep"], tmp_path / "x")


def test_host_speed_compares_the_same_prompts_across_runs():
    """Each run's prefill times against every prompt's median over the runs: a run on a machine 30%
    slower reads 1.3 whatever its prompt mix; too few prompts in common give None."""
    from adaspec.bench.metrics import host_speed

    base = {i: 0.01 * (1 + i % 7) for i in range(20)}  # prompts of different lengths
    runs = {"a": dict(base), "b": {i: 1.3 * t for i, t in base.items()},
            "c": {i: t for i, t in base.items() if i % 2},  # half the prompts (others were batched)
            "d": {0: 0.01, 1: 0.02}}
    h = host_speed(runs)
    assert h["a"]["relative"] == pytest.approx(1.0) and h["a"]["prompts"] == 20
    assert h["b"]["relative"] == pytest.approx(1.3) and h["c"]["relative"] == pytest.approx(1.0)
    assert h["d"] is None


def test_repeats_report_the_machine_speed_of_each_run(tmp_path):
    """Pooled over the repeats' requests.jsonl: the runs whose prefills of the same prompts were slow
    are named with their slowdown."""
    from adaspec.bench.repeats import write

    dirs = []
    for k, slow in enumerate(("adaspec", "static:3")):
        d = _fake_sweep(tmp_path / f"r{k + 1}", {"static:3": 18.0, "adaspec": 20.0})
        rows = [{"policy": p, "level": 1.0, "index": i,
                 "prefill_s": 0.01 * (1 + i % 5) * (1.2 if p == slow else 1)}
                for p in ("static:3", "adaspec") for i in range(12)]
        (d / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(d)
    text = write(dirs, tmp_path / "out" / "repeats")
    rows = {r["policy"]: r for r in json.loads((tmp_path / "out" / "repeats.json").read_text())}
    # per prompt the median of (1, 1.2, 1, 1.2) is 1.1: the slow runs read 1.2 / 1.1, the others 1 / 1.1
    assert rows["adaspec"]["machine speed"] == pytest.approx([1.2 / 1.1, 1 / 1.1])
    assert rows["static:3"]["machine speed"] == pytest.approx([1 / 1.1, 1.2 / 1.1])
    assert "| machine speed |" in text and "1.00 (0.91-1.09) |" in text


def test_report_names_the_weights_it_measured(tmp_path):
    """Two checkpoints at one path are told apart by the weights' digest in the report's meta."""
    from adaspec.bench.report import model_info

    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"first weights")
    first = model_info(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    second = model_info(tmp_path)
    assert first["hidden_size"] == 8 and len(first["weights_sha256"]) == 16
    assert first["weights_sha256"] != second["weights_sha256"]


def test_full_batch_steps_summarises_telemetry_and_plans(tmp_path):
    """Only steps of exactly the batch size count; tokens per ms are emitted tokens over step time;
    the plan's curve averages each depth's logged candidate."""
    from conftest import load_benchmark

    mod = load_benchmark("full_batch_steps")
    step = {"kind": "decode", "batch_size": 2, "draft_steps": 3, "drafted": [3, 3], "accepted": [2, 0],
            "draft_time": 0.002, "verify_time": 0.006, "step_time": 0.010}
    other = {**step, "batch_size": 1, "drafted": [3], "accepted": [3]}
    tel = tmp_path / "static_3.jsonl"
    tel.write_text("\n".join(json.dumps(r) for r in (step, step, other)))
    row = mod.step_rows(tel, 2)
    assert row["steps"] == 2 and row["accepted_per_request"] == 1.0
    assert abs(row["tokens_per_ms"] - 0.4) < 1e-12 and abs(row["outside_ms"] - 2.0) < 1e-9  # 4 / 10 ms
    plan = {"phase": "plan", "choice": {"h": 1}, "candidates": [
        {"h": 0, "tokens": 2.0, "time": 0.004}, {"h": 1, "tokens": 3.0, "time": 0.006}]}
    dec = tmp_path / "adaspec.jsonl"
    dec.write_text(json.dumps({"requests": [{}, {}], "phases": [plan]}))
    curve = mod.plan_curve(dec, 2)
    assert curve[1]["tokens"] == 3.0 and abs(curve[1]["tokens_per_ms"] - 0.5) < 1e-12


def test_slot_order_times_both_layouts(tiny_pair):
    """Every layout runs the same rows (shuffled through the gather path, spread through the span
    view and then gathered) and is timed."""
    from conftest import load_benchmark

    from adaspec import LLM

    mod = load_benchmark("slot_order")
    target, draft, _ = tiny_pair
    engine = LLM(model=target, draft_model=draft, policy="static:2", max_model_len=64, max_num_seqs=8).engine
    gathers = []
    run = engine.target.run
    engine.target.run = lambda rows: (gathers.append([r.slot for r in rows]), run(rows))[1]
    r = mod.measure(engine.target, batch=4, width=2, context=20, repeats=2)
    assert all(r[k] > 0 for k in ("contiguous", "shuffled", "spread", "spread, gathered"))
    assert r["ratio"] == r["shuffled"] / r["contiguous"]
    assert gathers[0] == [0, 1, 2, 3] and sorted(gathers[1]) == [0, 1, 2, 3] and gathers[1] != [0, 1, 2, 3]
    assert gathers[2] == gathers[3] == [0, 1, 2, 4]


def test_attention_layout_times_both_calls_on_the_same_inputs():
    """The folded call is the GQA call rearranged: outputs agree to float rounding, for grouped heads
    and for one KV head per query head; both are timed."""
    from conftest import load_benchmark

    mod = load_benchmark("attention_layout")
    for heads, kv in ((4, 2), (3, 3)):
        r = mod.measure(B=3, T=4, L=24, heads=heads, kv=kv, d=8, repeats=2)
        assert r["gqa_bool_mask_ms"] > 0 and r["folded_additive_mask_ms"] > 0
        assert r["max_abs_diff"] < 1e-5


def test_lookahead_decay_replays_telemetry_prequentially(tmp_path):
    """Every request-step with enough drafts is scored once per decay, and the decays differ once a
    request's outcomes change (no decay counts its whole history alike)."""
    from conftest import load_benchmark

    from adaspec.spec.acceptance import AcceptanceModel

    mod = load_benchmark("lookahead_decay")
    steps = [{"kind": "decode", "request_ids": ["a"], "confidences": [[0.9, 0.9, 0.9]], "accepted": [a]}
             for a in [3] * 10 + [0] * 5]
    path = tmp_path / "telemetry.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in [{"kind": "prefill"}, *steps]))
    plain, decayed = (mod.replay(str(path), AcceptanceModel(request_decay=d)) for d in (1.0, 0.9))
    assert plain["request_steps"] == decayed["request_steps"] == 15
    assert decayed["mse"] < plain["mse"]  # it follows the switch to rejections sooner


def test_forward_times_measures_every_point(tiny_pair):
    from conftest import load_benchmark

    from adaspec import LLM

    mod = load_benchmark("forward_times")
    target, draft, _ = tiny_pair
    engine = LLM(model=target, draft_model=draft, policy="static:2", max_model_len=64, max_num_seqs=4).engine
    points = [(1, 1, 8), (2, 3, 16)]
    r = mod.measure(engine.target, points, True, repeats=2)
    assert set(r) == set(points) and all(v > 0 for v in r.values())


def test_server_step_times_reads_server_and_in_process_telemetry(tiny_pair, tmp_path):
    from conftest import load_benchmark

    mod = load_benchmark("server_step_times")
    target, draft, _ = tiny_pair
    out = tmp_path / "steps"
    assert mod.main(["--model", str(target), "--draft-model", str(draft), "--policies", "none,static:2",
                     "--threads", "1", "--requests", "2", "--max-tokens", "5", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())["results"]
    for policy in ("none", "static:2"):
        for where in ("server", "in_process"):
            m = res[policy][where]
            # 2 requests of 5 tokens, the first from the prefill: 8 decode steps without drafts
            assert (m["steps"] == 8) if policy == "none" else (2 <= m["steps"] <= 8)
            assert 0 < m["verify_ms"] <= m["step_ms"]
            assert (m["draft_forward_ms"] is None) == (policy == "none")


def test_cost_replay_prices_telemetry_prequentially(tmp_path):
    from conftest import load_benchmark

    from adaspec.spec.cost_model import CostModel

    mod = load_benchmark("cost_replay")
    cm = CostModel.linear(draft_step=1e-3, verify_step=2e-3, window=20)
    cm.save(tmp_path / "profile.json")

    def record(batch, k, m):  # the first m rows draft k tokens, all accepted
        d = [k] * m + [0] * (batch - m)
        outside = 2e-4 * (1 + batch) + 1e-4 * k + 2e-5 * sum(d)  # per request, forward and drafted token
        draft, verify = 1e-3 * k, 2e-3
        return {"kind": "decode", "request_ids": [f"r{i}" for i in range(batch)], "batch_size": batch,
                "draft_steps": k, "context_lens": [10] * batch, "drafted": d, "accepted": d,
                "draft_time": draft, "verify_time": verify, "step_time": draft + verify + outside}

    recs = [record(2, 0, 0)] + [record(1, 3, 1), record(8, 3, 8), record(8, 5, 2), record(4, 2, 4)] * 6
    recs += [record(16, 5, 16)] * 3
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "replay"
    assert mod.main([str(tmp_path / "t.jsonl"), "--profile", str(tmp_path / "profile.json"),
                     "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["steps"] == len(recs)
    assert set(res["cells"]) >= {"batch>=1 depth=3", "batch>=6 depth=3", "batch>=6 depth=5"}
    # the cost model prices the outside time per request and per draft forward: a per-token part,
    # learned as a per-forward rate from a mix of batch sizes, is priced low at a larger batch
    cell = res["cells"]["batch>=16 depth=5"]  # a shape first seen here, priced from the others
    assert cell["steps"] == 3 and cell["outside_pred_over_real"] < 0.9
    fit = res["outside_fit_ms"]  # the records' outside time: 0.2 + 0.2 b + 0.1 forwards + 0.02 drafted
    assert [fit[k] for k in ("const", "batch", "draft_forwards", "drafted_tokens")] == pytest.approx(
        [0.2, 0.2, 0.1, 0.02], abs=1e-6)


def test_telemetry_totals_adds_up_a_runs_time_and_tokens(tmp_path):
    from conftest import load_benchmark

    mod = load_benchmark("telemetry_totals")

    def rec(kind, start, step, batch, drafted=0, accepted=0, draft=0.0, verify=0.0):
        return {"kind": kind, "start": start, "step_time": step,
                "request_ids": [f"r{i}" for i in range(batch)], "drafted": [drafted] * batch,
                "accepted": [accepted] * batch, "draft_time": draft,
                "verify_time": verify}

    recs = [rec("prefill", 0.0, 0.010, 2), rec("decode", 0.011, 0.020, 2, 3, 2, 0.006, 0.012),
            rec("decode", 0.033, 0.010, 1, 0, 0, 0.0, 0.008)]
    t = mod.totals(recs)
    assert t["span_s"] == pytest.approx(0.043) and t["decode_s"] == pytest.approx(0.030)
    assert t["prefill_s"] == pytest.approx(0.010) and t["gaps_s"] == pytest.approx(0.003)
    assert t["outside_s"] == pytest.approx(0.004)
    assert t["tokens"] == 7 and t["row_steps"] == 3 and t["drafted"] == 6
    assert t["tokens_per_ms"] == pytest.approx(7 / 30) and t["acceptance"] == pytest.approx(4 / 6)
    assert t["time_weighted_batch"] == pytest.approx((0.020 * 2 + 0.010) / 0.030)
    d = mod.by_depth(recs, min_batch=2)
    assert list(d) == [3] and d[3]["step_ms"] == pytest.approx(20) and d[3]["outside_ms"] == pytest.approx(2)
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    assert mod.main([str(path), "--min-batch", "1", "--out", str(tmp_path / "o")]) == 0
    assert set(json.loads((tmp_path / "o.json").read_text())[str(path)]["by_depth"]) == {"0", "3"}
    b = mod.by_batch(recs)  # the batch-2 step waits 2 ms for the batch-1 step; the last waits for none
    assert set(b) == {"1", "2-3"} and b["2-3"]["steps"] == 1 and b["1"]["steps"] == 1
    assert b["2-3"]["tokens_per_ms"] == pytest.approx(6 / 20)
    assert b["1"]["tokens_per_ms"] == pytest.approx(1 / 10)
    assert b["2-3"]["drafts_per_row"] == 3 and b["2-3"]["wait_ms"] == pytest.approx(2.0)
    assert b["1"]["wait_ms"] is None
    wide = mod.by_batch([rec("decode", 0.0, 0.010, 40)])
    assert list(wide) == ["32+"]


def test_lookahead_bias_counts_what_each_depth_accepted(tmp_path):
    """Static telemetry: what the first n of k drafts accepted is min(accepted, n). Drafts accepted
    all or none, half the time: a request's rate per tested position is 0.8 (4 of 5), its first
    position's 0.5, so the look-ahead over-predicts the first draft, less so the heavier its
    shrinkage to the global rate by position."""
    import random

    from conftest import load_benchmark

    mod = load_benchmark("lookahead_bias")
    rng = random.Random(0)
    recs = []
    for t in range(300):
        ids = [f"r{i}-{t // 25}" for i in range(4)]
        acc = [4 if rng.random() < 0.5 else 0 for _ in ids]
        recs.append({"kind": "decode", "request_ids": ids, "confidences": [[0.5] * 4] * 4, "accepted": acc})
    recs.insert(0, {"kind": "prefill", "request_ids": ["x"], "confidences": [[]], "accepted": [0]})
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    out = mod.bias_by_depth(str(path), 4.0)
    assert list(out) == [1, 2, 3, 4] and all(row["request_steps"] == 1200 for row in out.values())
    share = sum(a == 4 for r in recs[1:] for a in r["accepted"]) / 1200
    assert [out[n]["accepted"] for n in (1, 2, 3, 4)] == pytest.approx([share * n for n in (1, 2, 3, 4)])
    assert all(row["ratio"] == pytest.approx(row["accepted"] / row["predicted"]) for row in out.values())
    assert out[1]["ratio"] < 0.8 < mod.bias_by_depth(str(path), 32.0)[1]["ratio"] < 1
    assert mod.main([str(path), "--weights", "4"]) == 0


def test_lookahead_by_prediction_shows_shrinkage_across_requests(tmp_path):
    """Requests of two kinds for life, one accepting every draft, one none: the look-ahead, shrunk
    to the global rate, predicts the bad ones high and the good ones low, the more so the heavier
    the prior weight; groups are equal fifths ordered by the prediction."""
    from conftest import load_benchmark

    mod = load_benchmark("lookahead_bias")
    recs = []
    for t in range(200):
        ids = [f"g{t // 20}", f"b{t // 20}"]
        recs.append({"kind": "decode", "request_ids": ids, "confidences": [[0.5] * 4] * 2,
                     "accepted": [4, 0]})
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    light, heavy = mod.by_prediction(str(path), 4.0), mod.by_prediction(str(path), 32.0)
    assert [g["group"] for g in light] == [1, 2, 3, 4, 5] and sum(g["request_steps"] for g in light) == 400
    assert [g["predicted"] for g in light] == sorted(g["predicted"] for g in light)
    assert light[0]["ratio"] < 1 < light[-1]["ratio"]
    # the bad requests accept nothing (ratio 0 at any weight): the heavier prior predicts them higher
    assert heavy[0]["predicted"] > light[0]["predicted"] and heavy[-1]["ratio"] > light[-1]["ratio"]
    assert mod.main([str(path), "--weights", "4", "--by-prediction"]) == 0


def test_draft_price_by_depth_groups_predictions_by_batch_and_depth():
    from conftest import load_benchmark

    mod = load_benchmark("draft_price_by_depth")

    def rec(batch, depth, pred_draft, draft, pred_step, step):
        return {"predicted": {"draft": pred_draft, "step_time": pred_step},
                "outcome": {"request_ids": list(range(batch)), "draft_steps": depth,
                            "draft_time": draft, "step_time": step}}

    records = [rec(1, 8, 0.012, 0.010, 0.030, 0.025), rec(1, 8, 0.011, 0.010, 0.026, 0.026),
               rec(1, 8, 0.013, 0.010, 0.027, 0.030), rec(1, 1, 0.001, 0.002, 0.010, 0.010),
               rec(4, 0, 0.0, 0.0, 0.012, 0.010), {"predicted": None, "outcome": {}}]
    r = mod.price_by_depth(records)
    assert list(r) == [("1", 1), ("1", 8), ("2-5", 0)]  # batch bucket first, then depth
    assert r[("1", 8)] == {"steps": 3, "draft": pytest.approx(1.2), "step": pytest.approx(1.0)}
    assert r[("1", 1)]["draft"] == pytest.approx(0.5)
    assert r[("2-5", 0)]["draft"] is None and r[("2-5", 0)]["step"] == pytest.approx(1.2)


def test_depth_value_sets_measured_tokens_per_ms_by_depth_against_the_plans_prices(tmp_path):
    from conftest import load_benchmark

    mod = load_benchmark("depth_value")

    from dataclasses import asdict

    from adaspec.engine.engine import StepRecord

    def step(batch, drafted, accepted, t, kind="decode"):  # an engine step record, as the server saves it
        return asdict(StepRecord(kind, 0.0, batch, 0, [50] * batch, [f"r{i}" for i in range(batch)],
                                 drafted, drafted, accepted, step_time=t))

    tel = tmp_path / "telemetry-static_5.jsonl"
    tel.write_text("\n".join(json.dumps(r) for r in [
        step(9, [5] * 9, [3] * 9, 0.020), step(9, [5] * 9, [1] * 9, 0.016),  # 54 tokens in 36 ms
        step(9, [5] * 8 + [2], [2] * 9, 0.02),  # mixed depths: not a depth-for-all step
        step(1, [0], [0], 0.005), step(1, [], [], 0.01, kind="prefill")]) + "\n")
    m = mod.measured([str(tel)])
    assert set(m) == {("8-11", 5), ("1", 0)}
    assert m[("8-11", 5)]["tokens_per_ms"] == pytest.approx(54 / 36)
    assert m[("8-11", 5)]["tokens_per_row"] == pytest.approx(3.0)
    assert m[("8-11", 5)]["policies"] == ["static_5"]

    def plan(batch, h_chosen, effs):
        cands = [{"h": h, "m": 0 if h == 0 else batch, "efficiency": e} for h, e in enumerate(effs)]
        return {"requests": [{}] * batch, "phases": [
            {"phase": "plan", "candidates": cands, "choice": {"h": h_chosen, "m": batch if h_chosen else 0}}]}

    dec = tmp_path / "decisions-adaspec.jsonl"
    dec.write_text("\n".join(json.dumps(r) for r in [
        plan(9, 2, [1000, 1400, 1500, 1450]), plan(10, 2, [1000, 1300, 1700, 1600]),
        plan(10, 1, [1000, 1500, 1600, 1700]),
        {"requests": [{}] * 9, "phases": [{"phase": "plan", "candidates": [], "choice": "reused"}]}]) + "\n")
    p, chosen = mod.predicted([str(dec)])
    assert p[("8-11", 2)] == pytest.approx(1.6) and p[("8-11", 3)] == pytest.approx(1.6)
    assert p[("8-11", 0)] == pytest.approx(1.0)
    assert chosen == {("8-11", 2): 2, ("8-11", 1): 1}
