"""The simulator: event ordering and time accounting, closed-form throughput, the oracle bound,
acceptance draws and fitting, cost-model files, and the CLI end to end (tiny workloads)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from adaspec.bench.metrics import summarize
from adaspec.bench.workload import BenchRequest, build_workload
from adaspec.sim.acceptance_sim import AcceptanceSpec, Draws, markov_bits
from adaspec.sim.hardware import a100_7b_decode_step, load_cost_model, pair_cost_model, resolve_cost_model
from adaspec.sim.simulator import SimConfig, Simulator
from adaspec.spec.cost_model import CostModel


class AllMatch:
    """Every draft token is accepted; confidence 0.9."""

    def draw(self, key, category, n, seed=0):
        return Draws(1.0, np.ones(n, dtype=bool), np.full(n, 0.9))


def req(i, arrival, max_tokens=7, category="qa", prompt="x" * 40):
    return BenchRequest(i, prompt, category, max_tokens, True, arrival)


def test_event_ordering_and_time_accounting():
    """Prefill 11 ms (verify 10 + draft 1), decode with static:2 = 2 draft + 10 verify = 12 ms.
    r1 arrives during r0's first decode step and is prefilled at the next step boundary."""
    cm = CostModel.linear(draft_step=0.001, verify_step=0.010)
    sim = Simulator(cm, AllMatch(), SimConfig(num_speculative_tokens=8))
    res = sim.run("static:2", [req(0, 0.0), req(1, 0.015)])
    r0, r1 = res.results
    assert [s.kind for s in res.steps] == ["prefill", "decode", "prefill", "decode", "decode"]
    assert [round(s.start, 6) for s in res.steps] == [0.0, 0.011, 0.023, 0.034, 0.046]
    assert r0.ttft == pytest.approx(0.011) and r1.ttft == pytest.approx(0.034 - 0.015)
    assert r0.e2e == pytest.approx(0.046) and r1.e2e == pytest.approx(0.058 - 0.015)
    assert r0.chunk_tokens == [1, 3, 3] and r1.chunk_tokens == [1, 3, 3]
    assert r0.output_tokens == r1.output_tokens == 7 and r0.finish_reason == "length"
    assert res.duration == pytest.approx(0.058)
    assert r0.spec_stats["drafted"] == 4 and r0.spec_stats["accepted"] == 4
    assert r1.tpot == pytest.approx((0.058 - 0.034) / 6)


def test_idle_gap_jumps_to_next_arrival_and_slots_limit_admission():
    cm = CostModel.linear(draft_step=0.001, verify_step=0.010)
    sim = Simulator(cm, AllMatch(), SimConfig(max_num_seqs=1))
    res = sim.run("none", [req(0, 0.0, 3), req(1, 0.0, 3), req(2, 5.0, 3)])
    r0, r1, r2 = res.results
    assert r0.e2e == pytest.approx(0.03)  # prefill + 2 decode steps, 10 ms each, no draft
    assert r1.ttft == pytest.approx(0.04)  # waits for r0's slot
    assert r2.ttft == pytest.approx(0.01) and res.duration == pytest.approx(5.03)


@pytest.mark.parametrize("policy,k", [("none", 0), ("static:1", 1), ("static:3", 3), ("static:5", 5)])
def test_constant_costs_match_closed_form_throughput(policy, k):
    """Decode throughput = B (1 - a^(k+1)) / (1 - a) / (k d + v) with i.i.d. acceptance a."""
    a, d, v, batch = 0.6, 0.002, 0.020, 4
    cm = CostModel.linear(draft_step=d, verify_step=v)
    acc = AcceptanceSpec(mean=a, concentration=1e7, correlation=0.0, per_category=False)
    sim = Simulator(cm, acc, SimConfig(num_speculative_tokens=5, max_model_len=4096, max_prompt_tokens=16))
    res = sim.run(policy, [req(i, 0.0, 3000) for i in range(batch)])
    full = [s for s in res.steps if s.kind == "decode" and s.batch_size == batch
            and all(p == k for p in s.planned)]
    tokens = sum(sum(s.accepted) + s.batch_size for s in full)
    rate = tokens / sum(s.step_time for s in full)
    expected = batch * (1 - a ** (k + 1)) / (1 - a) / (k * d + v)
    assert rate == pytest.approx(expected, rel=0.03)


@pytest.mark.slow
def test_oracle_is_never_beaten_on_the_same_draws():
    cm = pair_cost_model("A100-80GB", "vicuna-7b/vicuna-68m")
    reqs = [req(i, 0.0, 40 + 7 * i, prompt="y" * (100 + 37 * i)) for i in range(12)]
    sim = Simulator(cm, AcceptanceSpec(mean=0.7), SimConfig(num_speculative_tokens=6, max_num_seqs=12))
    stats = {}
    for p in ["oracle", "none", "static:1", "static:3", "static:5", "threshold", "smartspec",
              "adaspec-drafter", "adaspec"]:
        r = sim.run(p, reqs)
        s = summarize(r.results, r.duration)
        stats[p] = (s["output_throughput"], s["tpot_ms"]["mean"])
    best_tp, best_tpot = stats.pop("oracle")
    for p, (tp, tpot) in stats.items():
        assert tp <= best_tp * (1 + 1e-9), p
        assert tpot >= best_tpot * (1 - 1e-9), p


def test_draws_are_deterministic_and_markov_bits_have_the_asked_mean_and_correlation():
    spec = AcceptanceSpec(mean=0.7)
    a, b = spec.draw(3, "qa", 50, seed=1), spec.draw(3, "qa", 50, seed=1)
    assert np.array_equal(a.match, b.match) and np.array_equal(a.conf, b.conf)
    bits = markov_bits(0.6, 0.5, 200_000, np.random.default_rng(0)).astype(float)
    assert bits.mean() == pytest.approx(0.6, abs=0.01)
    assert np.corrcoef(bits[:-1], bits[1:])[0, 1] == pytest.approx(0.5, abs=0.02)
    d = Draws(0.5, np.array([True, True, False, True]), np.ones(4))
    assert d.run_length(0, 5) == 2 and d.run_length(3, 5) == 1 and d.run_length(0, 1) == 1
    sharp = AcceptanceSpec(mean=0.6, sharpness=0.9, per_category=False).draw(0, "qa", 5000)
    assert sharp.conf[sharp.match].mean() > sharp.conf[~sharp.match].mean() + 0.3
    with pytest.raises(ValueError, match="synthetic"):
        AcceptanceSpec.parse("magic:1")
    with pytest.raises(ValueError, match="bad mean"):
        AcceptanceSpec.parse("synthetic:1.5")


def test_empirical_acceptance_fitted_from_telemetry(tmp_path):
    cm = CostModel.linear(draft_step=0.001, verify_step=0.010)
    sim = Simulator(cm, AcceptanceSpec(mean=0.5, per_category=False), SimConfig(num_speculative_tokens=4))
    res = sim.run("static:4", [req(i, 0.1 * i, 200) for i in range(8)])
    path = tmp_path / "telemetry.jsonl"
    path.write_text("".join(json.dumps(asdict(s)) + "\n" for s in res.steps))
    fit = AcceptanceSpec.parse(f"empirical:{path}")
    s = summarize(res.results, res.duration)["spec"]
    accepted, tested = s["accepted"], s["accepted"] + sum(
        1 for st in res.steps if st.kind == "decode" for a, n in zip(st.accepted, st.drafted, strict=True)
        if a < n)
    assert fit.mean == pytest.approx(accepted / tested, abs=1e-9)
    assert len(fit.propensities) == 8 and fit.conf_accepted and fit.conf_rejected
    again = Simulator(cm, fit, SimConfig(num_speculative_tokens=4)).run("static:4", [req(0, 0, 50)])
    assert again.results[0].success
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "decode", "request_ids": ["a"]}\n')
    with pytest.raises(ValueError, match="record 1"):
        AcceptanceSpec.parse(f"empirical:{bad}")
    with pytest.raises(ValueError, match="cannot read"):
        AcceptanceSpec.parse(f"empirical:{tmp_path / 'missing.jsonl'}")


def test_cost_model_files_load_and_bad_input_is_named(tmp_path):
    measured = tmp_path / "profile.json"
    CostModel.linear(0.001, 0.01).save(measured)
    assert load_cost_model(measured).predict_verify(1, 1, 10) == pytest.approx(0.01)
    spec = tmp_path / "analytic.json"
    spec.write_text(json.dumps({"hardware": "H100", "target": "vicuna-7b", "draft": {
        "name": "tiny", "params": 5e7, "layers": 2, "hidden": 512, "heads": 8, "kv_heads": 8,
        "vocab": 32000}}))
    cm = load_cost_model(spec)
    assert 0 < cm.predict_draft(1, 1, 100) < cm.predict_verify(1, 1, 100)
    cases = {"missing.json": None, "notjson.json": "{", "list.json": "[]", "neither.json": '{"a": 1}',
             "badcoef.json": json.dumps({**CostModel.linear(0.001, 0.01).to_dict(),
                                         "verify": {"coef": [-1, 0, 0, 0, 0, 0]}}),
             "badslope.json": json.dumps({**CostModel.linear(0.001, 0.01).to_dict(),  # falls past its knee
                                          "verify": {"coef": [0.01, 0, 1e-4, -2e-4, 0, 0], "knee": 8}}),
             "unknownhw.json": json.dumps({"hardware": "TPU", "target": "vicuna-7b", "draft": "vicuna-68m"}),
             "badfield.json": json.dumps({"hardware": {"name": "x", "peak_flops": 1e12, "mem_bw": -1,
                                                       "link_bw": 1e9}, "target": "vicuna-7b",
                                          "draft": "vicuna-68m"}),
             "badtp.json": json.dumps({"hardware": "L40", "target": "vicuna-7b", "draft": "vicuna-68m",
                                       "tp": 0})}
    for name, text in cases.items():
        p = tmp_path / name
        if text is not None:
            p.write_text(text)
        with pytest.raises(ValueError) as err:
            load_cost_model(p)
        assert name in str(err.value) or "TPU" in str(err.value), (name, str(err.value))
    for bad in ["analytic:A100-80GB", "analytic:A100-80GB:nope/nope",
                "analytic:A100-80GB:vicuna-7b/vicuna-68m:x"]:
        with pytest.raises(ValueError):
            resolve_cost_model(bad)


def test_analytic_a100_7b_decode_matches_published_figures():
    """NeMo docs, Llama-2-7B on 1x A100-80GB: 128 in / 20 out, 234.0 ms (batch 1) and 329.5 ms
    (batch 8); minus our prefill estimate, about 11.8 and 13.4 ms per decode step."""
    cm = pair_cost_model("A100-80GB", "vicuna-7b/vicuna-68m")
    for batch, total in [(1, 234.0e-3), (8, 329.5e-3)]:
        published = (total - cm.predict_verify(batch, 128, 128)) / 19
        assert a100_7b_decode_step(batch) == pytest.approx(published, rel=0.25)
    tp8 = pair_cost_model("H100", "llama-3.3-70b/llama-3.2-1b")  # the paper's TP 8
    tp1 = pair_cost_model("H100", "llama-3.3-70b/llama-3.2-1b", 1)
    assert tp8.predict_verify(8, 1, 512) < tp1.predict_verify(8, 1, 512)
    assert cm.predict_verify(64, 9, 512) > 3 * cm.predict_verify(1, 1, 512)  # compute-bound at scale


@pytest.mark.slow
def test_cli_simulate_writes_the_bench_report(tmp_path):
    from adaspec.cli import main

    out = tmp_path / "sim"
    rc = main(["simulate", "--prompts", "synthetic:8", "--arrivals", "poisson:5", "--num-requests", "12",
               "--output-len", "fixed:24", "--policies", "none,static:2", "--slo-tpot-ms", "30",
               "--cost-model", "analytic:L40:vicuna-7b/vicuna-68m", "--output-dir", str(out), "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in summary["runs"]] == ["none", "static:2", "oracle"]
    assert all(r["completed"] == 12 for r in summary["runs"])
    text = (out / "report.md").read_text()
    assert "# adaspec simulation" in text and "## Simulation" in text and (out / "tpot_cdf.png").exists()
    rows = (out / "requests.jsonl").read_text().splitlines()
    assert len(rows) == 36 and json.loads(rows[0])["spec_stats"] is not None
    assert main(["simulate", "--cost-model", str(tmp_path / "none.json"), "--output-dir", str(out)]) == 2


def test_cli_simulate_runs_a_variant_given_on_the_command_line(tmp_path, monkeypatch):
    """--variant NAME=JSON: an adaspec variant of existing parameters, recorded with the report; a
    bad one is refused before anything runs (exit 2)."""
    from adaspec.cli import main
    from adaspec.spec.adaspec_policy import AdaSpecPolicy

    monkeypatch.setattr(AdaSpecPolicy, "VARIANTS", dict(AdaSpecPolicy.VARIANTS))
    out = tmp_path / "sim"
    common = ["simulate", "--prompts", "synthetic:8", "--arrivals", "poisson:5", "--num-requests", "8",
              "--output-len", "fixed:16", "--slo-tpot-ms", "30", "--no-oracle", "--quiet",
              "--cost-model", "analytic:L40:vicuna-7b/vicuna-68m", "--output-dir", str(out)]
    variant = 'adaspec-nv={"verifier": false}'
    assert main([*common, "--policies", "adaspec,adaspec-nv", "--variant", variant]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["policy"] for r in summary["runs"]] == ["adaspec", "adaspec-nv"]
    assert all(r["completed"] == 8 for r in summary["runs"])
    assert summary["meta"]["simulation"]["variants"] == {"adaspec-nv": {"verifier": False}}
    assert main([*common, "--policies", "adaspec", "--variant", 'adaspec-x={"verifer": false}']) == 2


def test_workload_through_simulator_records_every_request():
    wl = build_workload("synthetic:8", arrivals="gamma:20:3", num_requests=20, output_len="sampled:16")
    cm = pair_cost_model("L40", "vicuna-7b/vicuna-68m")
    sim = Simulator(cm, AcceptanceSpec(), SimConfig(max_num_seqs=4, slo_tpot_ms=50))
    res = sim.run("static:3", wl.requests)
    assert [r.index for r in res.results] == list(range(20)) and all(r.success for r in res.results)
    assert all(r.output_tokens == q.max_tokens for r, q in zip(res.results, wl.requests, strict=True))
    assert all(abs(sum(r.chunk_tokens) - r.output_tokens) < 1e-9 for r in res.results)
    assert all(r.ttft > 0 and r.e2e >= r.ttft for r in res.results)


@pytest.mark.slow
def test_cli_profile_writes_a_profile_simulate_loads(tiny_pair, tmp_path, monkeypatch):
    from adaspec.cli import main

    monkeypatch.setenv("ADASPEC_CACHE_DIR", str(tmp_path / "cache"))
    target, draft, _ = tiny_pair
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", str(target), "--draft-model", str(draft), "--output", str(out),
                 "--max-num-seqs", "2", "--num-speculative-tokens", "2", "--max-model-len", "64",
                 "--budget-s", "1"]) == 0
    cm = load_cost_model(out)
    assert cm.predict_verify(2, 3, 32) > 0 and cm.meta["key"]["device"]
    res = Simulator(cm, AllMatch(), SimConfig(num_speculative_tokens=2, max_model_len=64)).run(
        "static:2", [req(0, 0.0, 8)])
    assert res.results[0].output_tokens == 8
