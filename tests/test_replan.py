"""When adaspec reuses its last plan instead of planning again (`adaspec.spec.replan`)."""

from __future__ import annotations

import pytest
from test_policies import MS, adaspec, drive, request

from adaspec.spec.cost_model import CostModel
from adaspec.spec.policy import BatchView, make_policy
from adaspec.spec.replan import ReplanSchedule

IDS = [str(i) for i in range(16)]


def uniform(depth, ids=IDS):
    return {rid: depth for rid in ids}, depth


def test_interval_doubles_while_reuse_loses_less_than_planning_costs_and_halves_when_it_loses_more():
    s = ReplanSchedule(max_interval=8)
    s.planned(uniform(3), 16, None, plan_time=1 * MS, step_time=20 * MS)  # cost 5% of the step; no regret yet
    assert s.interval == 1 and s.reusable(IDS) is None
    for _ in range(3):  # the reused decision would have lost nothing
        s.planned(uniform(3), 16, 0.0, 1 * MS, 20 * MS)
    assert s.interval == 8
    assert [s.reusable(IDS) for _ in range(8)] == [[3] * 16] * 7 + [None]  # the planning step counts
    s.planned(uniform(3), 16, 0.0, 1 * MS, 20 * MS)
    assert s.reusable(IDS + ["x", "y", "z"]) is None  # the batch grew by more than an eighth: plan
    assert s.reusable(IDS + ["x"]) == [3] * 17
    s.planned(uniform(3), 16, 1.0, 1 * MS, 20 * MS)  # regret average 0.2 > twice the cost (0.1)
    assert s.interval == 4
    s.planned(None, 16, 0.0, 1 * MS, 20 * MS)  # a decision that may not be reused
    assert s.reusable(IDS) is None and s.depths(IDS) is None


def test_a_reused_decision_keeps_each_request_s_depth_and_gives_newcomers_the_default():
    s = ReplanSchedule()
    s.interval = 4
    s.planned(({"a": 4, "b": 0, "c": 4}, 0), 3, None, 1 * MS, 20 * MS)
    assert s.reusable(["a", "b", "d"]) == [4, 0, 0]  # c left, d joined: not among the chosen
    s.planned(({"a": 4, "b": 4}, 4), 2, None, 1 * MS, 20 * MS)
    assert s.reusable(["a", "d"]) == [4, 4]


def test_free_planning_is_never_skipped():
    s = ReplanSchedule()
    for _ in range(10):
        s.planned(uniform(3), 16, 0.0, plan_time=0.0, step_time=20 * MS)
    assert s.interval == 1 and s.reusable(IDS) is None


def fixed_mode(pol):
    """Adaptation decided 'fixed' for every speculating step (the plan's depths, no questions)."""
    pol.adaptation.decide = lambda batch_size: False
    ticks = iter(range(10**6))
    pol.clock = lambda: next(ticks) * MS  # every plan takes 1 ms
    return pol


COST = CostModel.linear(draft_step=0.5 * MS, verify_step=10 * MS, verify_per_token=0.1 * MS)
RATES = {str(i): 0.8 for i in range(4)}


def run_steps(pol, steps=12, **kw):
    return [drive(pol, BatchView([request(str(i), **kw) for i in range(4)], 8))[0] for _ in range(steps)]


@pytest.mark.parametrize("name", ["adaspec", "adaspec-everystep"])
def test_a_stable_plan_is_reused_unless_planning_every_step_is_asked_for(name):
    pol = fixed_mode(adaspec(COST, RATES, name=name))
    plans = run_steps(pol)
    assert plans[0][0] > 0 and all(p == plans[0] for p in plans)  # reused or not, the same decision
    if name == "adaspec":
        assert pol.replan.reuses > 0 and pol.replan.plans + pol.replan.reuses == len(plans)
        assert pol.describe()["replan"]["reuses"] == pol.replan.reuses
    else:
        assert pol.replan is None


def test_a_request_near_its_slo_makes_every_step_plan():
    pol = fixed_mode(adaspec(COST, RATES))
    run_steps(pol, steps=1)
    choice = next(p for p in pol.log._current["phases"] if p["phase"] == "plan")["choice"]
    per_token = choice["time"] / (choice["tokens"] / 4)  # each request's time per token
    pol = fixed_mode(adaspec(COST, RATES))
    run_steps(pol, tpot_slo=1.05 * per_token)  # on track, but less than 10% under
    assert pol.replan.reuses == 0 and pol.replan.plans == 12
    pol = fixed_mode(adaspec(COST, RATES))
    run_steps(pol, tpot_slo=2 * per_token)  # far inside: reused
    assert pol.replan.reuses > 0


def test_adaspec_everystep_is_a_named_ablation():
    assert make_policy("adaspec-everystep", 8).replan is None and make_policy("adaspec", 8).replan
    assert not make_policy("adaspec-uniformreuse", 8).reuse_ragged and make_policy("adaspec", 8).reuse_ragged


def test_a_ragged_decision_is_reused_request_by_request():
    cost = CostModel.linear(draft_step=0.5 * MS, verify_step=10 * MS, verify_per_token=1 * MS, padded=False)
    pol = fixed_mode(adaspec(cost, {"a": 0.9, "b": 0.05}))
    plans = [drive(pol, BatchView([request("a"), request("b")], 8))[0] for _ in range(8)]
    assert plans[0][0] > 0 and plans[0][1] == 0 and all(p == plans[0] for p in plans)
    assert pol.replan.reuses > 0
    # a request that joins without history ranks below the confident one: it would not draft
    assert pol.replan.depths(["a", "new"]) == [plans[0][0], 0]


def test_adaspec_uniformreuse_plans_again_after_a_ragged_decision():
    cost = CostModel.linear(draft_step=0.5 * MS, verify_step=10 * MS, verify_per_token=1 * MS, padded=False)
    pol = fixed_mode(adaspec(cost, {"a": 0.9, "b": 0.05}, name="adaspec-uniformreuse"))
    plans = [drive(pol, BatchView([request("a"), request("b")], 8))[0] for _ in range(8)]
    assert plans[0][0] > 0 and plans[0][1] == 0 and all(p == plans[0] for p in plans)
    assert pol.replan.reuses == 0 and pol.replan.plans == 8
    pol = fixed_mode(adaspec(COST, RATES, name="adaspec-uniformreuse"))
    run_steps(pol)
    assert pol.replan.reuses > 0  # a uniform decision is still reused
