"""The cost model fitted from engine telemetry (`adaspec.sim.fitted`): it recovers known coefficients
from synthetic telemetry, names what is wrong with bad files, and the simulator's prefill steps and
inter-step gaps under it add up by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaspec.bench.workload import BenchRequest
from adaspec.sim.acceptance_sim import Draws
from adaspec.sim.fitted import POOLED, FittedCostModel, Outside, PathForward, fit_telemetry
from adaspec.sim.hardware import resolve_cost_model
from adaspec.sim.simulator import SimConfig, Simulator
from adaspec.spec.cost_model import CostModel, ForwardTimeModel, StepShape

# Known truth: coefficients of the profile's six features (no knee), then the three path costs.
DRAFT = PathForward([2e-3, 1e-4, 5e-5, 0.0, 1e-7, 0.0], 0.0, (1e-3, 2e-3, 1e-4))
VERIFY = PathForward([10e-3, 2e-4, 3e-4, 0.0, 1e-6, 2e-7], 0.0, (5e-3, 1e-3, 0.0))
PRE_TARGET = PathForward([0.0, 3e-3, 1e-4, 0.0, 0.0, 2e-7], 0.0, (0.0, 0.0, 0.0))
PRE_DRAFT = PathForward([0.0, 1e-3, 2e-5, 0.0, 0.0, 0.0], 0.0, (0.0, 0.0, 0.0))
OUTSIDE = {"decode": [1e-3, 2e-4, 5e-5], "decode_gap": [4e-4, 5e-5, 0.0], "prefill": [3e-4, 1e-4, 0.0],
           "prefill_gap": [2e-4, 3e-5, 0.0]}


def synthetic_telemetry(seed: int, outside: dict, steps: int = 400) -> list[dict]:
    """Engine-like step records timed by the known truth: requests arrive, are prefilled, then draft
    0..4 tokens a step (0 lets the draft lag grow, so catch-up forwards get wider), until done."""
    rng = np.random.default_rng(seed)
    shaper = CostModel(ForwardTimeModel([0.0] * 6), ForwardTimeModel([0.0] * 6))
    out, now, lag, ctx, left, n = [], 100.0, {}, {}, {}, 0
    o = {k: Outside(v) for k, v in outside.items()}
    for _ in range(steps):
        if not ctx or (len(ctx) < 12 and rng.random() < 0.3):
            ids = [f"r{n + i}" for i in range(int(rng.integers(1, 4)))]
            n += len(ids)
            lens = [int(x) for x in rng.integers(5, 300, len(ids))]
            w = max(lens)
            d, v = PRE_DRAFT.predict(len(ids), w, w), PRE_TARGET.predict(len(ids), w, w)
            step = d + v + o["prefill"].predict(len(ids))
            out.append(dict(kind="prefill", start=now, batch_size=len(ids), num_waiting=0,
                            context_lens=lens, request_ids=ids, planned=[], drafted=[], accepted=[],
                            confidences=[], draft_steps=0, draft_time=d, verify_time=v, step_time=step))
            now += step + o["prefill_gap"].predict(len(ids))
            for q, c in zip(ids, lens, strict=True):
                ctx[q], lag[q], left[q] = c + 1, 1, int(rng.integers(3, 40))
            continue
        ids = list(ctx)
        drafted = [int(x) for x in rng.integers(0, 5, len(ids))]
        accepted = [int(rng.integers(0, k + 1)) for k in drafted]
        shape = StepShape([ctx[q] for q in ids], [lag[q] for q in ids], drafted, drafted)
        forwards = shaper.draft_forwards(shape)
        d = sum(DRAFT.predict(*f) for f in forwards)
        v = VERIFY.predict(*shaper.verify_forward(shape))
        step = d + v + o["decode"].predict(len(ids), sum(drafted))
        out.append(dict(kind="decode", start=now, batch_size=len(ids), num_waiting=0,
                        context_lens=shape.contexts, request_ids=ids, planned=drafted, drafted=drafted,
                        accepted=accepted, confidences=[], draft_steps=len(forwards), draft_time=d,
                        verify_time=v, step_time=step))
        now += step + o["decode_gap"].predict(len(ids), sum(drafted))
        for q, k, a in zip(ids, drafted, accepted, strict=True):
            lag[q] = (2 if a == k else 1) if k else lag[q] + 1
            ctx[q] += a + 1
            left[q] -= 1
            if left[q] <= 0:
                del ctx[q], lag[q], left[q]
    return out


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_fit_recovers_known_coefficients_and_per_policy_outside_time(tmp_path):
    slow = {k: [3 * c for c in v] for k, v in OUTSIDE.items()}  # a policy that plans for longer
    a = write(tmp_path / "telemetry-static_2.jsonl", synthetic_telemetry(0, OUTSIDE))
    b = write(tmp_path / "telemetry-adaspec.jsonl", synthetic_telemetry(1, slow))
    cm = fit_telemetry([a, b])
    for fitted, truth in ((cm.draft, DRAFT), (cm.verify, VERIFY)):
        assert fitted.coef == pytest.approx(truth.coef, abs=1e-9)
        assert fitted.paths == pytest.approx(truth.paths, abs=1e-9)
    # A prefill attends over its own width (context = tokens per row, always > 1), so rows, tokens
    # and path terms are not separable there: the times are what must come back.
    b, w = np.meshgrid(np.arange(1, 6), np.arange(2, 400, 37))
    for fitted, truth in ((cm.prefill_target, PRE_TARGET), (cm.prefill_draft, PRE_DRAFT)):
        assert fitted.predict(b, w, w) == pytest.approx(truth.predict(b, w, w), rel=1e-6)
    for policy, coef in (("static:2", OUTSIDE), ("adaspec", slow)):
        own = cm.for_policy(policy)
        assert own.policy_key != POOLED
        for part, c in coef.items():
            assert own.outside[own.policy_key][part].coef == pytest.approx(c, abs=1e-9)
        assert own.predict_overhead(5, 7) == pytest.approx(c0 := coef["decode"][0] + 5 * coef["decode"][1]
                                                           + 7 * coef["decode"][2])
        assert own.predict(StepShape([50] * 5, [1] * 5, [1, 1, 2, 1, 2], [1, 1, 2, 1, 2])).overhead == \
            pytest.approx(c0)
    pooled = cm.for_policy("threshold")  # no file of its own: the fit over both files
    assert pooled.policy_key == POOLED
    assert OUTSIDE["decode"][0] < pooled.outside[POOLED]["decode"].coef[0] < slow["decode"][0]


def test_policy_file_can_be_named_explicitly_and_through_resolve_cost_model(tmp_path):
    path = write(tmp_path / "run.jsonl", synthetic_telemetry(2, OUTSIDE, 150))
    cm, desc = resolve_cost_model(f"telemetry:static:2={path}")
    assert isinstance(cm, FittedCostModel) and "fitted from engine telemetry" in desc
    assert cm.for_policy("static:2").policy_key == "static_2"


def test_path_costs_apply_by_shape_and_grids_match_scalars():
    m = PathForward([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], 0.0, (10.0, 100.0, 1000.0))
    assert m.predict(1, 1, 50) == 1.0  # one row, one token: no mask, fast path
    assert m.predict(3, 1, 50) == 11.0  # several rows: masked
    assert m.predict(2, 4, 50) == 1.0 + 10 + 100 + 2000  # several tokens per row: general path
    assert m.predict(0, 4, 50) == 0.0
    b, t = np.array([[1, 3, 2, 0]]), np.array([[1, 1, 4, 4]])
    assert m.predict_elementwise(b, t, 50).tolist() == [[1.0, 11.0, 2111.0, 0.0]]
    assert m.predict(b, t, np.full((1, 4), 50)).tolist() == [[1.0, 11.0, 2111.0, 0.0]]


def bad(tmp_path, text: str, name: str = "telemetry-x.jsonl") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_bad_telemetry_is_named(tmp_path):
    good = json.dumps(synthetic_telemetry(3, OUTSIDE, 5)[1])
    rec = json.loads(good)
    cases = {
        str(tmp_path / "missing.jsonl"): "cannot read telemetry",
        bad(tmp_path, good + "\n{oops\n"): ":2: not JSON",
        bad(tmp_path, json.dumps({"kind": "decode"}) + "\n"): ":1: missing batch_size",
        bad(tmp_path, json.dumps({**rec, "kind": "verify"}) + "\n"): "kind must be",
        bad(tmp_path, json.dumps({**rec, "step_time": -1}) + "\n"): "step_time must be a finite number",
        bad(tmp_path, json.dumps({**rec, "batch_size": rec["batch_size"] + 1}) + "\n"): "does not match",
        bad(tmp_path, json.dumps({**rec, "accepted": [9] * rec["batch_size"]}) + "\n"): "accepted <= drafted",
        bad(tmp_path, json.dumps({**rec, "kind": "prefill"}) + "\n"): "no decode step records",
        bad(tmp_path, "[1, 2]\n"): "not a JSON object",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message):
            fit_telemetry([path])
    no_draft = [{**r, "drafted": [0] * r["batch_size"], "accepted": [0] * r["batch_size"], "draft_steps": 0,
                 "draft_time": 0.0} for r in synthetic_telemetry(4, OUTSIDE, 60)]
    with pytest.raises(ValueError, match="no draft forwards"):
        fit_telemetry([write(tmp_path / "telemetry-none.jsonl", no_draft)])
    ok = write(tmp_path / "telemetry-static_2.jsonl", synthetic_telemetry(5, OUTSIDE, 60))
    with pytest.raises(ValueError, match="two files for policy 'static_2'"):
        fit_telemetry([ok, f"static:2={ok}"])
    with pytest.raises(ValueError, match="at least one telemetry file"):
        resolve_cost_model("telemetry:")


def req(i, arrival, max_tokens=7):
    return BenchRequest(i, "x" * 40, "qa", max_tokens, True, arrival)


class AllMatch:
    def draw(self, key, category, n, seed=0):
        return Draws(1.0, np.ones(n, dtype=bool), np.full(n, 0.9))


def constant(seconds: float) -> PathForward:
    return PathForward([seconds, 0.0, 0.0, 0.0, 0.0, 0.0])


def test_simulator_prefill_steps_and_gaps_add_up_by_hand():
    """static:2, requests of 7 tokens, every draft accepted. Prefill: 20 ms target + 2 ms draft +
    0.3 ms outside = 22.3 ms, then a 0.5 ms gap. Decode: 2 draft forwards x 1 ms + 10 ms verify +
    0.2 ms outside (static:2's own; the pooled fit says 0.5) = 12.2 ms, then a 1 ms gap; 3 tokens a
    step. r1 arrives during r0's first decode step, is prefilled after that step's gap, and its
    prefill step stalls r0's decoding."""
    own = {"decode": Outside([0.2e-3, 0.0, 0.0]), "decode_gap": Outside([1e-3, 0.0, 0.0]),
           "prefill": Outside([0.3e-3, 0.0, 0.0]), "prefill_gap": Outside([0.5e-3, 0.0, 0.0])}
    pooled = {**own, "decode": Outside([0.5e-3, 0.0, 0.0])}
    cm = FittedCostModel(constant(1e-3), constant(10e-3), constant(2e-3), constant(20e-3),
                         {POOLED: pooled, "static_2": own})
    sim = Simulator(cm, AllMatch(), SimConfig(num_speculative_tokens=8))
    res = sim.run("static:2", [req(0, 0.0), req(1, 0.030)])
    starts = [round(s.start * 1e3, 6) for s in res.steps]
    kinds = [s.kind for s in res.steps]
    assert kinds == ["prefill", "decode", "prefill", "decode", "decode"]
    # 0 + 22.3 + 0.5 = 22.8; + 12.2 + 1 = 36.0; + 22.3 + 0.5 = 58.8; + 12.2 + 1 = 72.0
    assert starts == [0.0, 22.8, 36.0, 58.8, 72.0]
    assert [round(s.step_time * 1e3, 6) for s in res.steps] == [22.3, 12.2, 22.3, 12.2, 12.2]
    r0, r1 = res.results
    assert r0.chunk_times == pytest.approx([0.0223, 0.035, 0.071])  # 36 ms between: r1's prefill
    assert r1.chunk_times == pytest.approx([0.0583 - 0.03, 0.071 - 0.03, 0.0842 - 0.03])
    none = Simulator(cm, AllMatch(), SimConfig()).run("none", [req(0, 0.0, 3)])
    # no draft prefill for a policy without a draft; pooled outside time: 20.3 + 0.5, then 10.5 + 1
    assert [round(s.start * 1e3, 6) for s in none.steps] == [0.0, 20.8, 32.3]
