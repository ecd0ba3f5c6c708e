"""Cost-aware adaptation: AdaSpec runs its per-token drafter and its verifier only where, at this
batch size, their measured cost has been below the efficiency they were predicted to add."""

from __future__ import annotations

import pytest
from test_policies import MS, adaspec, drive, request

from adaspec.spec.adaptation import AdaptationValue, bucket
from adaspec.spec.cost_model import CostModel
from adaspec.spec.policy import BatchView, StepOutcome


def run(a: AdaptationValue, steps: int, batch: int, gain: float, cost: float,
        step: float = 0.05) -> list[bool]:
    """`steps` speculating steps where adapting adds `gain` (ratio) and costs `cost` seconds."""
    modes = []
    for _ in range(steps):
        m = a.decide(batch)
        a.observe(batch, m, 0.003 + (cost if m else 0.0), step, gain if m else None)
        modes.append(m)
    return modes


def test_batch_buckets():
    assert [bucket(b) for b in (1, 2, 3, 4, 7, 8, 16, 31, 32, 64)] == [0, 1, 1, 2, 2, 3, 4, 4, 5, 5]


def test_both_modes_are_tried_then_the_cheaper_wins():
    a = AdaptationValue(explore=0)
    modes = run(a, 30, 16, gain=1.02, cost=0.005)  # adds 2% of 50 ms = 1 ms, costs 5 ms
    assert modes[:10] == [True, False] * 5  # warm-up: each mode in turn, adapting first
    assert not any(modes[10:])
    e = a.estimate(16)
    assert abs(e["gain"] - 1.02) < 1e-9 and abs(e["cost"] - 0.005) < 1e-9
    a = AdaptationValue(explore=0)
    assert all(run(a, 30, 16, gain=1.2, cost=0.005)[10:])  # adds 10 ms: worth its 5


def test_no_cost_means_adapt_whenever_it_gains():
    """A simulator that charges nothing for the decisions: adapting is kept exactly when it helps."""
    a = AdaptationValue(explore=0)
    assert all(run(a, 20, 8, gain=1.001, cost=0.0)[10:])
    a = AdaptationValue(explore=0)
    assert not any(run(a, 20, 8, gain=0.99, cost=0.0)[10:])


def test_the_other_mode_is_explored_and_batch_sizes_learn_apart():
    a = AdaptationValue(explore=5)
    modes = run(a, 40, 16, gain=1.02, cost=0.005)
    later = modes[10:]
    assert 0 < sum(later) <= len(later) // 5 + 1  # fixed by the rule, adaptive every 5th step
    assert a.decide(2) is True  # another bucket has not been measured: it starts adaptive
    assert a.preferred(16) is False and a.preferred(2) is True
    report = a.report()
    assert report["batch 16+"]["adapts"] is False and report["batch 16+"]["fixed_steps"] > 10


def cost_model():
    return CostModel.linear(draft_step=0.5 * MS, draft_per_row=0.5 * MS, verify_step=10 * MS,
                            verify_per_token=1 * MS, padded=False)


def test_fixed_step_drafts_the_plans_depth_without_questions():
    pol = adaspec(cost_model(), {"a": 0.9, "b": 0.9})
    pol.adaptation.decide = lambda n: False
    batch = BatchView([request("a"), request("b")], 8)
    planned, drafted, verified = drive(pol, batch, lambda i, j: 0.02)  # the drafts collapse...
    phases = pol.log._current["phases"]
    h = phases[0]["choice"]["h"]
    assert h > 1 and planned == drafted == verified == [h, h]  # ... and all of them are verified
    assert [p["phase"] for p in phases] == ["plan", "mode"] and phases[1]["choice"] == "fixed"


def test_adaptive_step_measures_its_gain_over_the_fixed_plan():
    pol = adaspec(cost_model(), {"a": 0.9, "b": 0.9})
    batch = BatchView([request("a"), request("b")], 8)
    planned, drafted, verified = drive(pol, batch, lambda i, j: 0.02)
    assert planned == [8, 8] and drafted == [1, 1] and verified == [0, 0]  # stopped and pruned
    gain = [p for p in pol.log._current["phases"] if p["phase"] == "adaptation"][0]["gain"]
    assert gain > 1.2  # priced now: two collapsed drafts of depth h were worth much less than 2 tokens
    pol.observe(StepOutcome(["a", "b"], [20, 20], verified, [0, 0], [[], []], 1, 1 * MS, 10 * MS, 14 * MS))
    b = pol.adaptation._bucket(2)
    assert list(b.gains) == [pytest.approx(min(gain, 2.0), abs=1e-5)] and not b.outside[False]  # clipped
    assert list(b.outside[True]) == [pytest.approx(3 * MS)]
    # the paper's behaviour, every step: adaspec-always
    always = adaspec(cost_model(), {"a": 0.9, "b": 0.9}, name="adaspec-always")
    assert always.adaptation is None
    for _ in range(3):
        batch = BatchView([request("a"), request("b")], 8)
        assert drive(always, batch, lambda i, j: 0.02)[2] == [0, 0]
        always.observe(StepOutcome(["a", "b"], [20, 20], [0, 0], [0, 0], [[], []], 1, MS, MS, 5 * MS))


def test_gain_is_the_mean_over_steps_where_adapting_mostly_changes_nothing():
    """Four steps in five adapting changes nothing (gain 1); the fifth it is worth 50% (clipped at
    2x): worth 10% on average, which pays for a cost of 4% of the step (a median would say 0)."""
    a = AdaptationValue(explore=0)
    for i in range(10):
        a.observe(16, True, 0.005, 0.05, 1.5 if i % 5 == 4 else 1.0)
        a.observe(16, False, 0.003, 0.05, None)
    a.observe(16, True, 0.005, 0.05, 9.0)
    e = a.estimate(16)
    assert e["gain"] == pytest.approx((8 * 1.0 + 2 * 1.5 + 2.0) / 11)
    assert a.decide(16) is True
