"""Policies: closed-form decisions on synthetic cost and acceptance models, hard limits, the
acceptance model's calibration, decision logs, and losslessness of every policy in the engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaspec import LLM, SamplingParams
from adaspec.spec.acceptance import (
    RANK_WEIGHTS,
    AcceptanceModel,
    measure_calibration,
    outcomes_from_telemetry,
)
from adaspec.spec.adaspec_policy import UNIFORM_FROM, AdaSpecPolicy
from adaspec.spec.baselines import SmartSpecPolicy, ThresholdPolicy
from adaspec.spec.cost_model import CostModel, StepShape
from adaspec.spec.policy import (
    POLICY_NAMES,
    BatchView,
    RequestView,
    StepOutcome,
    WaitingView,
    fit_limits,
    make_policy,
)

MS = 1e-3


class KnownAcceptance(AcceptanceModel):
    """Acceptance known in closed form: a drafted token is accepted with its draft probability, a
    token not drafted yet with its request's fixed rate."""

    def __init__(self, rates: dict[str, float]):
        super().__init__()
        self.rates = rates

    def predict(self, request_id, q, position):
        return q

    def predict_unseen(self, request_id, position):
        return self.rates[request_id]

    def needs_evidence(self, q):
        return False  # known in closed form: nothing to explore

    def unexplored_position(self, positions):
        return None


def request(rid, context=20, cap=8, **kw):
    kw.setdefault("output_tokens", 5)
    return RequestView(rid, context, max_draft=cap, **kw)


def adaspec(cost, rates, name="adaspec", rescue_loss=None, tpot_weighted=False):
    """rescue_loss=1.0: the strict estimator, where keeping k of n requests on track may cost k / n
    of the efficiency (the default caps that at `efficiency.RESCUE_LOSS`). tpot_weighted=False (the
    closed forms here count tokens alike; `test_tokens_of_slow_requests_are_worth_more` covers it)."""
    pol = AdaSpecPolicy.variant(name, cost)
    pol.acceptance = KnownAcceptance(rates)
    pol.tpot_weighted = tpot_weighted
    if rescue_loss is not None:
        pol.rescue_loss = rescue_loss
    return pol


def drive(policy, batch, conf=None):
    """Run one step's decisions exactly as the engine does; conf(i, j) is the draft probability of
    request i's j-th token (default: the request's known rate). Returns (planned, drafted, verified)."""
    rates = getattr(policy.acceptance, "rates", {})
    conf = conf or (lambda i, j: rates[batch.requests[i].request_id])
    planned = fit_limits(batch, policy.plan(batch))
    active = [k > 0 for k in planned]
    while any(active):
        for i, a in enumerate(active):
            if a:
                batch.requests[i].confidences.append(conf(i, len(batch.requests[i].confidences)))
        active = [a and len(r.confidences) < k
                  for a, r, k in zip(active, batch.requests, planned, strict=True)]
        keep = policy.keep_drafting(batch, list(active))
        active = [a and bool(k) for a, k in zip(active, keep, strict=True)]
    drafted = [len(r.confidences) for r in batch.requests]
    verified = [max(0, min(int(n), d)) for n, d in zip(policy.prune(batch), drafted, strict=True)]
    return planned, drafted, verified


# ---------------------------------------------------------------------------------- closed form


def test_free_speculation_drafts_to_k():
    cost = CostModel.linear(draft_step=0.0, verify_step=10 * MS)  # drafting and extra tokens cost nothing
    batch = BatchView([request("a"), request("b", cap=3)], 8)
    planned, drafted, verified = drive(adaspec(cost, {"a": 0.3, "b": 0.3}), batch)
    assert drafted == [8, 3] and verified == [8, 3]


def test_expensive_verification_and_low_acceptance_skips_speculation():
    # verifying k+1 tokens costs k+1 decode steps; acceptance 0.3
    cost = CostModel.linear(draft_step=1 * MS, verify_step=0.0, verify_per_token=10 * MS)
    for name in ("adaspec", "adaspec-drafter", "adaspec-noslo"):
        pol = adaspec(cost, {"a": 0.3, "b": 0.3}, name)
        batch = BatchView([request("a"), request("b")], 8)
        assert drive(pol, batch) == ([0, 0], [0, 0], [0, 0])
        assert pol.log._current["phases"][0]["choice"]["h"] == 0


def test_confident_request_drafts_longer():
    cost = CostModel.linear(draft_step=0.5 * MS, draft_per_row=0.5 * MS, verify_step=10 * MS,
                            verify_per_token=1 * MS, padded=False)
    batch = BatchView([request("sure"), request("unsure")], 8)
    _, drafted, verified = drive(adaspec(cost, {"sure": 0.9, "unsure": 0.2}), batch)
    assert drafted[0] > drafted[1] and verified[0] > verified[1]
    assert drafted[0] >= 4 and drafted[1] <= 1


def test_each_request_stops_on_its_own_and_batch_stops_when_none_pays():
    cost = CostModel.linear(draft_step=0.5 * MS, draft_per_row=0.5 * MS, verify_step=10 * MS,
                            verify_per_token=1 * MS, padded=False)
    pol = adaspec(cost, {"a": 0.9, "b": 0.9})
    batch = BatchView([request("a"), request("b")], 8)
    # a's third token turns out unlikely: a stops right there, b goes on (ragged lengths)
    _, drafted, _ = drive(pol, batch, lambda i, j: 0.02 if (i == 0 and j == 2) else 0.9)
    assert drafted[0] == 3 and drafted[1] > 3
    pol = adaspec(cost, {"a": 0.9, "b": 0.9})
    batch = BatchView([request("a"), request("b")], 8)
    _, drafted, verified = drive(pol, batch, lambda i, j: 0.02)  # every draft collapses at once
    assert drafted == [1, 1] and verified == [0, 0]  # the verifier also drops the worthless tokens


def test_mean_tpot_objective_gives_an_unsure_request_its_first_draft():
    """Tokens per second drafts the sure request deep and the unsure one not at all; the batch's mean
    time per token (adaspec-meantpot) counts t / e_i per request, so the unsure request's first draft
    (e: 1 -> 1.3) is worth more than the sure one's fifth, and the lengths come closer."""
    cost = CostModel.linear(draft_step=0.5 * MS, draft_per_row=0.5 * MS, verify_step=10 * MS,
                            verify_per_token=1 * MS, padded=False)
    lengths = {}
    for name in ("adaspec-noslo", "adaspec-meantpot"):
        pol = adaspec(cost, {"sure": 0.9, "unsure": 0.3}, name)
        pol.slo_aware = False
        lengths[name] = drive(pol, BatchView([request("sure"), request("unsure")], 8))[2]
    sure, unsure = lengths["adaspec-noslo"]
    assert unsure == 0 and sure >= 5
    sure_m, unsure_m = lengths["adaspec-meantpot"]
    assert unsure_m >= 1 and sure_m < sure


def test_steady_objective_weights_each_request_by_its_rate_so_far():
    """adaspec-steady ranks by sum(r) / (t * sum_i r_i / e_i), r_i a request's rate so far: with no
    history it is adaspec-meantpot (same lengths); when the sure request has run at twice the unsure
    one's rate, its deep drafts count for more, so it drafts deeper than under meantpot."""
    cost = CostModel.linear(draft_step=0.5 * MS, draft_per_row=0.5 * MS, verify_step=10 * MS,
                            verify_per_token=1 * MS, padded=False)

    def lengths(name, **history):
        pol = adaspec(cost, {"sure": 0.9, "unsure": 0.3}, name)
        pol.slo_aware = False
        reqs = [request("sure", **history.get("sure", {})), request("unsure", **history.get("unsure", {}))]
        return drive(pol, BatchView(reqs, 8))[2]

    assert lengths("adaspec-steady") == lengths("adaspec-meantpot")
    # TPOT so far: 20 ms a token for the sure request, 40 ms for the unsure one
    history = {"sure": {"output_tokens": 11, "since_first_token": 0.2},
               "unsure": {"output_tokens": 11, "since_first_token": 0.4}}
    sure_m, _ = lengths("adaspec-meantpot", **history)
    sure_s, unsure_s = lengths("adaspec-steady", **history)
    assert sure_s > sure_m


def test_verifier_cuts_globally_least_valuable_tails():
    cost = CostModel.linear(draft_step=0.0, verify_step=10 * MS, verify_per_token=3 * MS, padded=False)
    pol = adaspec(cost, {"a": 0.9, "b": 0.9})
    batch = BatchView([request("a"), request("b")], 8)
    pol.plan(batch)
    batch.requests[0].confidences += [0.95, 0.95, 0.95]
    batch.requests[1].confidences += [0.95, 0.1, 0.9]  # b's tail after 0.1 is worth little
    assert pol.prune(batch) == [3, 1]
    drafter_only = adaspec(cost, {"a": 0.9, "b": 0.9}, "adaspec-drafter")
    drafter_only.plan(batch)
    assert drafter_only.prune(batch) == [3, 3]


def test_padded_verifier_shrinks_the_batch_width():
    """Our runner pads to the longest row: cutting one row's tail saves nothing, cutting every
    row's does."""
    cost = CostModel.linear(draft_step=0.0, verify_step=10 * MS, verify_per_token=1 * MS)
    pol = adaspec(cost, {"a": 0.9, "b": 0.9})
    batch = BatchView([request("a"), request("b")], 8)
    pol.plan(batch)
    batch.requests[0].confidences += [0.95, 0.95, 0.95]
    batch.requests[1].confidences += [0.95, 0.1, 0.9]
    assert pol.prune(batch) == [3, 3]
    pol = adaspec(cost, {"a": 0.9, "b": 0.9})
    batch = BatchView([request("a"), request("b")], 8)
    pol.plan(batch)
    batch.requests[0].confidences += [0.95, 0.1, 0.9]
    batch.requests[1].confidences += [0.95, 0.1, 0.9]
    assert pol.prune(batch) == [1, 1]


def test_catch_up_debt_does_not_lock_speculation_off():
    """After a busy stretch without speculation the draft lags; that debt is owed by any later
    speculation and grows while we wait, so the plan charges only a steady step's catch-up (2
    tokens). Here a drafted token is worth it at that catch-up (1.5 tokens in 12.5 ms against 1 in
    10.1 ms) but not if the first draft forward carried 9 tokens a row (1.5 in 19.5 ms): charging
    even the K+1 cap would keep speculation off for good."""
    from adaspec.spec.cost_model import ForwardTimeModel

    cost = CostModel(ForwardTimeModel([0.3 * MS, 0, 1.0 * MS, 0, 0, 0]),
                     ForwardTimeModel([10 * MS, 0, 0.1 * MS, 0, 0, 0]), window=0)
    for lag in (1, 9, 300):
        planned = adaspec(cost, {"a": 0.5}).plan(BatchView([request("a", draft_lag=lag)], 8))
        assert planned == [8], lag
    full = cost.predict(StepShape([20], [300], [3], [3])).total
    assert full > 3 * cost.predict(StepShape([20], [1], [3], [3])).total  # predictions stay honest


def slo_batch():
    """'a' far ahead of its 20 ms TPOT SLO and very predictable; 'b' unpredictable and behind: 240 ms
    for its 10 tokens so far leaves 20 * 14 - 240 = 40 ms for its last 4, exactly 10 ms a token."""
    a = request("a", output_tokens=11, since_first_token=0.1, tpot_slo=20 * MS)
    b = request("b", output_tokens=11, since_first_token=0.24, tpot_slo=20 * MS, remaining_tokens=4, cap=3)
    return BatchView([a, b], 8)


def test_tokens_of_slow_requests_are_worth_more():
    """For mean TPOT a token is worth its request's time per token: with equal acceptance, the
    request with twice the TPOT so far is weighted 2x the other's (relative to their mean, within
    the clamp) and drafts first; unweighted, they tie and the first in the batch goes first."""
    from adaspec.spec.efficiency import next_token_options, weighted

    fast = request("fast", output_tokens=21, since_first_token=0.2)  # 10 ms a token so far
    slow = request("slow", output_tokens=21, since_first_token=0.4)  # 20 ms
    new = request("new", output_tokens=1)  # no interval yet: weight 1
    assert weighted([fast, slow, new]) == pytest.approx([10 / 15, 20 / 15, 1.0])
    assert weighted([fast, fast]) is None and weighted([fast, new]) is None  # all alike: unweighted
    quick = request("quick", output_tokens=21, since_first_token=0.1)  # 5 ms: 0.4 of the mean, clamped
    assert weighted([quick, slow]) == pytest.approx([0.5, 1.6])
    # equal acceptance: weighted, the slow request's next token ranks first and counts 4/3
    cost = CostModel.linear(draft_step=2 * MS, verify_step=10 * MS, verify_per_token=1 * MS)
    w = weighted([fast, slow])
    for weights, first in ((None, 0), (w, 1)):
        T, E, order, _ = next_token_options(cost, [20, 20], [0, 0], [1.0, 1.0], [1.0, 1.0], [0, 1],
                                            [0.6, 0.6], 0.0, weights)
        assert order[0] == first
        assert E[1] - E[0] == pytest.approx(0.6 * (weights[first] if weights else 1.0))
    rates = {"fast": 0.6, "slow": 0.6}
    batch = BatchView([request("fast", output_tokens=21, since_first_token=0.2),
                       request("slow", output_tokens=21, since_first_token=0.4)], 8)
    planned, drafted, _ = drive(adaspec(cost, rates, "adaspec-noslo", tpot_weighted=True), batch)
    assert drafted[1] >= drafted[0] and drafted[1] > 0


def test_late_weighting_values_only_the_requests_behind_their_slo():
    """adaspec-late: a token of a request behind its TPOT SLO counts its TPOT-so-far weight (at
    least 1); a request on or ahead of its schedule counts 1, however fast it has been."""
    from adaspec.spec.efficiency import SLOState, late_weighted

    slow = request("slow", output_tokens=11, since_first_token=0.3, tpot_slo=0.02, remaining_tokens=10)
    fast = request("fast", output_tokens=11, since_first_token=0.1, tpot_slo=0.02, remaining_tokens=10)
    batch = BatchView([slow, fast], 8)  # 30 and 10 ms a token so far against a 20 ms SLO
    assert SLOState(batch).behind(batch.requests) == [True, False]
    assert late_weighted(batch.requests, SLOState(batch)) == pytest.approx([1.5, 1.0])
    steady = request("steady", output_tokens=11, since_first_token=0.15, tpot_slo=0.02, remaining_tokens=10)
    batch = BatchView([fast, steady], 8)  # both ahead: no weights
    assert late_weighted(batch.requests, SLOState(batch)) is None
    pol = make_policy("adaspec-late", 8)
    assert pol.late_weighted and not pol.tpot_weighted and pol.describe()["late_weighted"]


def test_tight_slo_leaves_only_no_speculation():
    """b has exactly a plain step's time a token left: only no speculation keeps it on track. When
    speculating gains little (4% here) the SLO-aware choice gives that up for b; the strict
    estimator gives up even 25% for it, the default (at most RESCUE_LOSS) does not."""
    cost = CostModel.linear(draft_step=2 * MS, verify_step=10 * MS)  # a plain step: exactly 10 ms
    small, large = {"a": 0.45, "b": 0.05}, {"a": 0.95, "b": 0.05}
    for rates, pol in ((small, adaspec(cost, small)), (large, adaspec(cost, large, rescue_loss=1.0))):
        assert drive(adaspec(cost, rates, "adaspec-noslo"), slo_batch())[1][0] > 0  # efficiency says draft
        assert drive(pol, slo_batch()) == ([0, 0], [0, 0], [0, 0])  # but any longer step breaks b's SLO
        plan = pol.log._current["phases"][0]
        best = max(plan["candidates"], key=lambda c: c["efficiency"])
        assert plan["choice"]["violation"] <= 0 and best["violation"] > 0 and best["h"] > 0
    assert drive(adaspec(cost, large), slo_batch())[1][0] > 0


def test_slo_is_judged_over_the_request_s_remaining_tokens():
    """A request 10 ms behind its 20 ms TPOT budget with 100 tokens to go may take 19.9 ms a token
    from now on; with one token to go, only 10 ms. The TPOT metric is over the whole request, so the
    check spreads the debt over what is left (a one-step check would demand it back at once)."""
    from adaspec.spec.efficiency import SLOState

    assert SLOState.rate(20 * MS, 0.21, 10, 100) == pytest.approx(19.9 * MS)
    assert SLOState.rate(20 * MS, 0.21, 10, 1) == pytest.approx(10 * MS)
    assert SLOState.rate(20 * MS, 0.21, 10, math.inf) == 20 * MS  # unknown length: the rate alone
    assert SLOState.rate(None, 5.0, 10, 1) == math.inf

    def slo(remaining):
        r = request("a", output_tokens=11, since_first_token=0.21, tpot_slo=20 * MS,
                    remaining_tokens=remaining)
        return SLOState(BatchView([r], 8))

    assert slo(100).worst_cells([15 * MS], [[1.0]]) == [pytest.approx(15 / 19.9 - 1)]  # on track
    # with one token to go, 15 ms is over, unless the step brings 1.6 tokens
    assert slo(1).worst_cells([15 * MS, 15 * MS], [[1.0], [1.6]]) == [1.0, pytest.approx(15 / 16 - 1)]
    assert slo(1).worst_cells([15 * MS], [[1.0]]) == [-1.0]  # late whatever we do: does not count
    assert slo(100).worst(np.array([15 * MS, 25 * MS]), np.array([[1.0], [1.0]])).tolist() == [
        pytest.approx(15 / 19.9 - 1), 1.0]


def test_the_slo_check_counts_the_wait_between_steps():
    """A step of t seconds costs its requests t + between (prefills of arrivals, the engine loop):
    15 ms a token is on track for a 19.9 ms budget alone, not with 6 ms of waiting after it."""
    from adaspec.spec.efficiency import SLOState

    r = request("a", output_tokens=11, since_first_token=0.21, tpot_slo=20 * MS, remaining_tokens=100)
    alone, waiting = SLOState(BatchView([r], 8)), SLOState(BatchView([r], 8), between=6 * MS)
    assert alone.worst_cells([15 * MS], [[1.0]]) == [pytest.approx(15 / 19.9 - 1)]
    two = ([15 * MS, 15 * MS], [[1.0], [1.5]])  # one token, or 1.5: only the second keeps the budget
    expected = [1.0, pytest.approx(21 / 1.5 / 19.9 - 1)]
    assert waiting.worst_cells(*two) == expected
    assert waiting.worst(np.array(two[0]), np.array(two[1])).tolist() == expected


def test_policy_learns_the_wait_between_its_decode_steps():
    """`between` follows the gap from one decode step's end to the next one's start, where a request
    of the first is still running (its first gap, then a moving average), and the plan's SLO check
    uses it; a gap no running request waited (a new batch) teaches nothing."""
    from adaspec.spec.control import BETWEEN_DECAY

    cost = CostModel.linear(draft_step=2 * MS, verify_step=10 * MS)
    pol = adaspec(cost, {"a": 0.5, "b": 0.5, "c": 0.5})
    now = 0.0
    for step, (gap, ids) in enumerate([(0.0, "ab"), (0.004, "ab"), (0.010, "b"), (0.5, "c"), (0.002, "c")]):
        now += gap
        batch = BatchView([request(i) for i in ids], 8, now=now)
        pol.plan(batch)
        if step == 1:
            assert pol.between == pytest.approx(0.004) and pol._slo.between == pol.between
        if step == 2:
            assert pol.between == pytest.approx(BETWEEN_DECAY * 0.004 + (1 - BETWEEN_DECAY) * 0.010)
            learned = pol.between
        if step == 3:
            assert pol.between == learned  # c was not in the last step: the 0.5 s is not a wait of its
        pol.observe(StepOutcome(list(ids), [20] * len(ids), [0] * len(ids), [0] * len(ids),
                                [[] for _ in ids], 0, 0.0, 0.010, 0.012))
        now += 0.012
    assert pol.between == pytest.approx(BETWEEN_DECAY * learned + (1 - BETWEEN_DECAY) * 0.002)
    pol.reset()
    assert pol.between == 0.0


def test_a_late_request_does_not_steer_but_a_savable_one_does():
    """'a' is late whatever we do: it must not hold the batch back (the choice is then the most
    efficient one); but when speculating on 'a' brings it back on track for its SLO, that is
    chosen, though it costs the batch (when the SLO may cost that much)."""
    cost = CostModel.linear(draft_step=4 * MS, verify_step=10 * MS, verify_per_token=0.5 * MS, padded=False)
    rates = {"a": 0.9, "b": 0.05, "c": 0.05, "d": 0.05}

    def batch(spent):
        reqs = [request("a", output_tokens=11, since_first_token=spent, tpot_slo=20 * MS,
                        remaining_tokens=4, cap=3)]
        return BatchView(reqs + [request(r) for r in "bcd"], 8)

    assert drive(adaspec(cost, rates, "adaspec-noslo"), batch(0.4))[1] == [0, 0, 0, 0]
    for rescue_loss in (None, 1.0):  # hopeless (0.4 s > 14 x 20 ms)
        assert drive(adaspec(cost, rates, rescue_loss=rescue_loss), batch(0.4))[1] == [0, 0, 0, 0]
    pol = adaspec(cost, rates, rescue_loss=1.0)
    drafted = drive(pol, batch(20 * MS * 14 - 4 * 9 * MS))[1]  # 9 ms a token left: a plain step is over
    assert drafted[0] > 0 and drafted[1:] == [0, 0, 0]
    plan = pol.log._current["phases"][0]
    assert plan["candidates"][0]["violation"] == 1.0 and plan["choice"]["violation"] <= 0


def test_no_request_is_sacrificed_to_rescue_others():
    """a1 and a2 are behind (10 ms a token left for their last 4) and only speculation gets them
    there; b (13 ms a token left, unpredictable) is on track only without it. No step keeps all
    three on track, so the choice is the most efficient step (here: none), not the one that puts
    the fewest requests over (rescuing a1 and a2 by slowing b and the batch)."""
    cost = CostModel.linear(draft_step=6 * MS, verify_step=10 * MS, verify_per_token=0.5 * MS, padded=False)
    rates = {"a1": 0.9, "a2": 0.9, "b": 0.05}

    def batch():
        left = {"a1": 10 * MS, "a2": 10 * MS, "b": 13 * MS}  # per token, for the last 4
        return BatchView([request(r, output_tokens=11, since_first_token=20 * MS * 14 - 4 * left[r],
                                  tpot_slo=20 * MS, remaining_tokens=4, cap=3) for r in left], 8)

    pol = adaspec(cost, rates, rescue_loss=1.0)
    assert drive(pol, batch()) == drive(adaspec(cost, rates, "adaspec-noslo"), batch()) == ([0, 0, 0],) * 3
    cands = pol.log._current["phases"][0]["candidates"]
    assert cands[0]["violation"] == 2.0  # without speculation a1 and a2 are over
    assert min(c["violation"] for c in cands) == 1.0  # speculating rescues them and puts b over


@pytest.mark.parametrize("rescue_loss", [0.05, 0.5])
def test_a_rescue_may_cost_the_share_of_requests_it_saves_up_to_a_cap(rescue_loss):
    """The most efficient step (100 tokens/s) leaves 2 requests off track that slower ones keep on
    track: a rescue may cost 2 / population of the throughput and at most `rescue_loss`; only the
    candidates that could be chosen are checked against the SLOs."""
    from types import SimpleNamespace

    from adaspec.spec.efficiency import choose

    over = {0: 1.0, 1: 2.0, 2: -0.1, 3: -0.2}  # SLO check per candidate (> 0: requests off track)
    checked = []

    def slo(population):
        def worst_cells(t, e):
            checked.extend(x[0] for x in e)
            return [over[x[0]] for x in e]
        return SimpleNamespace(active=True, population=population, worst_cells=worst_cells,
                               excess=lambda t, e: [over[e[0]]])

    def pick(e, population, aware=True):
        checked.clear()
        return choose([1.0] * len(e), e, lambda i: [i], slo(population), aware, rescue_loss)[0]

    assert pick([90.0, 100.0, 96.0, 85.0], 4) == 2  # 4% for 2 of 4: within any cap
    assert pick([90.0, 100.0, 94.0, 85.0], 4) == (1 if rescue_loss < 0.06 else 2)
    assert sorted(checked) == ([1] if rescue_loss < 0.06 else [0, 1, 2, 3])
    assert pick([90.0, 100.0, 80.0, 85.0], 4) == (1 if rescue_loss < 0.15 else 3)
    assert pick([90.0, 100.0, 94.0, 85.0], 40) == 1  # 2 of 40 are worth 5%: not 6%
    assert pick([90.0, 100.0, 96.0, 85.0], 4, aware=False) == 1 and not checked


def test_a_partial_rescue_saves_some_requests_when_no_candidate_saves_all():
    """No candidate keeps all 3 of the requests that the best one leaves off track on track: the
    strict rule keeps the best; `partial` takes the candidate that leaves the fewest over, if it
    costs at most the share of requests it saves (capped at the rescue loss) and puts no one over
    that the best keeps on track; `rescue_e` lets a cell that the efficiency choice may not take
    (masked to 0 in `e`) rescue them."""
    from types import SimpleNamespace

    import numpy as np

    from adaspec.spec.efficiency import choose

    off = {0: [1, 1, 1, 0], 1: [1, 1, 0, 0], 2: [1, 0, 0, 0], 3: [0, 0, 1, 1]}  # requests over, per candidate
    slo = SimpleNamespace(active=True, population=10, worst_cells=lambda t, e: [sum(off[x[0]]) for x in e],
                          excess=lambda t, e: [float(sum(off[e[0]]))],
                          judge=lambda t, e: (np.array([float(sum(off[int(x[0])])) for x in e]),
                                              np.array([off[int(x[0])] for x in e], dtype=bool)))

    def pick(e, partial=True, rescue_e=None, loss=0.05):
        return choose([1.0] * len(e), e, lambda i: [i], slo, True, loss, partial, rescue_e)[0]

    assert pick([100.0, 99.0, 97.0, 96.0], partial=False) == 0  # strict: only a full rescue counts
    assert pick([100.0, 99.0, 97.0, 96.0]) == 2  # 2 of 10 saved, 3% lost: fewest over, then efficiency
    assert pick([100.0, 99.0, 89.0, 96.0], loss=0.5) == 2  # 11% lost for 2 of 10 (20%): allowed
    assert pick([100.0, 99.0, 79.0, 96.0], loss=0.5) == 1  # 21% for 2 of 10: too much; 1 of 10 for 1%
    assert pick([100.0, 99.5, 89.0, 89.0], loss=0.05) == 1  # the cap: 2 saved are worth 5%, not 11%
    assert pick([100.0, 96.0, 0.0, 0.0]) == 1 and pick([100.0, 94.0, 0.0, 0.0]) == 0  # 1 of 10: 5% cap
    assert pick([100.0, 0.0, 0.0, 99.0]) == 0  # 3 leaves fewer over, but puts request 3 over
    assert pick([100.0, 0.0, 0.0, 0.0], rescue_e=[100.0, 99.0, 97.0, 96.0]) == 2  # masked cells rescue


def test_verifier_explores_where_calibration_lacks_evidence():
    """An under-confident draft (q = 0.05) looks worthless to a fresh calibration, and verifying
    costs a lot: the verifier would drop every draft and never learn. It keeps one token per
    request until the bin has `min_evidence` verified tokens, then trusts what it learned."""
    from adaspec.spec.acceptance import AcceptanceModel

    cost = CostModel.linear(draft_step=0.1 * MS, verify_step=10 * MS, verify_per_token=6 * MS, padded=False)
    pol = AdaSpecPolicy.variant("adaspec-noslo", cost)
    pol.acceptance = AcceptanceModel(min_evidence=8)
    pol.acceptance.unseen_prior = 0.99  # the look-ahead is optimistic: the plan drafts
    pol.acceptance.unexplored_position = lambda positions: None  # about the bins' evidence, not positions'
    first = drive(pol, BatchView([request("a"), request("b")], 8), lambda i, j: 0.05)
    assert first[2] == [1, 1]  # nothing known about q ~ 0.05 yet: verify one token each
    for k in range(8):  # the outcomes: such tokens are rejected
        pol.acceptance.observe(f"x{k}", [0.05], 0)
    assert not pol.acceptance.needs_evidence(0.05)
    again = drive(pol, BatchView([request("c"), request("d")], 8), lambda i, j: 0.05)
    assert again[1] == [0, 0] or again[2] == [0, 0]  # known to be worthless: not verified


def test_waiting_request_ttft_counts_when_the_queue_matters():
    """A request is about to miss its TTFT in the queue; 'a' holds the slot it waits for, and
    speculating on 'a' frees it sooner, though it costs the batch (when the SLO may cost that much)."""
    cost = CostModel.linear(draft_step=4 * MS, verify_step=10 * MS, verify_per_token=0.5 * MS, padded=False)
    rates = {"a": 0.95, "b": 0.05, "c": 0.05, "d": 0.05}

    def batch():
        reqs = [request("a", remaining_tokens=3)] + [request(r, remaining_tokens=50) for r in "bcd"]
        return BatchView(reqs, 8, num_waiting=1, waiting=[WaitingView(waited=0.28, ttft_slo=0.3)])

    assert drive(adaspec(cost, rates, "adaspec-noslo"), batch())[1] == [0, 0, 0, 0]
    assert drive(adaspec(cost, rates, rescue_loss=1.0), batch())[1][0] > 0


def test_threshold_stops_after_low_mean_and_never_turns_off():
    pol = ThresholdPolicy()
    batch = BatchView([request("a"), request("b", cap=2)], 8)
    conf = {0: [0.9, 0.9, 0.9, 0.9], 1: [0.5, 0.1]}  # means: 0.7, 0.5 -> stop after step 2
    planned, drafted, verified = drive(pol, batch, lambda i, j: conf[i][j])
    assert planned == [8, 2] and drafted == [2, 2] and verified == [2, 2]
    batch = BatchView([request("a")], 8)
    assert drive(pol, batch, lambda i, j: 0.01)[1] == [1]  # hopeless, but it still drafts


def smartspec_choice(alpha, cost, k_max, batch_size=1):
    rates = [(1 - alpha ** (k + 1)) / (1 - alpha) * batch_size / cost.predict(
        StepShape([20] * batch_size, [1] * batch_size, [k] * batch_size, [k] * batch_size)).total
        for k in range(k_max + 1)]
    best = max(range(1, k_max + 1), key=lambda k: (rates[k], -k))
    return 0 if rates[0] >= 1.1 * rates[best] else best


@pytest.mark.parametrize("draft_ms", [0.5, 3.0, 5.0, 7.0])
def test_smartspec_closed_form(draft_ms):
    cost = CostModel.linear(draft_step=draft_ms * MS, verify_step=10 * MS, verify_per_token=0.2 * MS)
    pol = SmartSpecPolicy(cost)
    planned = pol.plan(BatchView([request("a"), request("b")], 8))
    assert planned == [smartspec_choice(0.7, cost, 8, 2)] * 2


def test_smartspec_no_speculation_must_win_by_ten_percent():
    # goodput(k=1) = 1.7 / (10 ms + draft); goodput(0) = 1 / 10 ms
    cost = CostModel.linear(draft_step=(1.05 * 17 - 10) * MS, verify_step=10 * MS)  # k=0 better by 5%
    assert SmartSpecPolicy(cost).plan(BatchView([request("a", cap=1)], 8)) == [1]
    cost = CostModel.linear(draft_step=(1.15 * 17 - 10) * MS, verify_step=10 * MS)  # by 15%
    assert SmartSpecPolicy(cost).plan(BatchView([request("a", cap=1)], 8)) == [0]


def test_smartspec_alpha_is_measured_and_reset():
    pol = SmartSpecPolicy(CostModel.linear(draft_step=1 * MS, verify_step=10 * MS))
    outcome = lambda d, a: StepOutcome(["a"], [20], [d], [a], [[0.9] * d], d, 0.0, 0.01, 0.01)  # noqa: E731
    pol.observe(outcome(4, 2))
    assert pol.alpha == pytest.approx(0.5)
    pol.observe(outcome(4, 0))
    pol.observe(outcome(4, 0))  # 2 / 12 < 0.3
    assert pol.alpha == 0.65


def test_smartspec_speculates_again_after_slow_first_steps():
    """Session 7's Spec-Bench run: two slow warm-up steps (first-call work, 5-10x the forwards'
    price) taught smartspec's cost model a huge draft price, and with no further drafting nothing
    corrected it; it never speculated again. Two steps are not enough evidence now."""
    pol = SmartSpecPolicy(CostModel.linear(draft_step=1 * MS, verify_step=10 * MS, window=20))
    for _ in range(2):
        planned, drafted, _ = drive(pol, BatchView([request("a", cap=3)], 8), lambda i, j: 0.9)
        k = drafted[0]
        assert k > 0
        # drafts took 20x their price, the verification its price; every draft accepted
        pol.observe(StepOutcome(["a"], [20], [k], [k], [[0.9] * k], k, 20 * k * MS, 10 * MS,
                                (10 + 20 * k) * MS))
    assert pol.cost_model.draft_scale.value == pytest.approx(20)
    assert pol.plan(BatchView([request("a", cap=3)], 8))[0] > 0


# ---------------------------------------------------------------------------------- hard limits


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.integers(1, 3), st.floats(0.01, 0.99)), min_size=1,
                max_size=6),
       st.integers(2, 40), st.sampled_from(["threshold", "smartspec", "adaspec", "adaspec-drafter",
                                            "adaspec-noslo", "adaspec-always", "adaspec-everystep",
                                            "static:8"]))
def test_no_decision_exceeds_limits(reqs, budget, name):
    cost = CostModel.linear(draft_step=0.1 * MS, verify_step=10 * MS, verify_per_token=0.1 * MS)
    pol = make_policy(name, 8, cost)
    batch = BatchView([request(str(i), cap=cap, draft_lag=lag, tpot_slo=0.02)
                       for i, (cap, lag, _) in enumerate(reqs)], 8, max_batched_tokens=budget)
    planned = pol.plan(batch)
    assert all(0 <= k <= r.max_draft for k, r in zip(planned, batch.requests, strict=True))
    if not name.startswith("static"):  # static:K leaves the token budget to the engine's clipping
        assert sum(planned) + len(planned) <= max(budget, len(planned))
    active = [k > 0 for k in planned]
    for depth in range(8):
        if not any(active):
            break
        for i, a in enumerate(active):
            if a:
                batch.requests[i].confidences.append(reqs[i][2])
        active = [a and depth + 1 < k for a, k in zip(active, planned, strict=True)]
        keep = pol.keep_drafting(batch, list(active))
        assert len(keep) == len(active)
        active = [a and bool(k) for a, k in zip(active, keep, strict=True)]
    verified = pol.prune(batch)
    assert all(0 <= n <= len(r.confidences) for n, r in zip(verified, batch.requests, strict=True))


def test_make_policy_names():
    assert {"none", "static:K", "threshold", "smartspec", "adaspec", "adaspec-drafter",
            "adaspec-noslo", "adaspec-always"} <= set(POLICY_NAMES)
    assert make_policy("adaspec-always", 8).adaptation is None and make_policy("adaspec", 8).adaptation
    assert make_policy("adaspec-noslo", 8).name == "adaspec-noslo"
    assert make_policy("threshold:0.4", 8).threshold == 0.4
    assert make_policy("adaspec-tpot", 8).tpot_weighted and not make_policy("adaspec", 8).tpot_weighted
    for bad in ("adaspec:3", "adaspec-fast", "threshold:2", "smartspec:x"):
        with pytest.raises(ValueError, match="policy"):
            make_policy(bad, 8)


# ---------------------------------------------------------------------------------- acceptance


def test_acceptance_calibration_beats_raw_probability():
    import random

    rng = random.Random(0)
    model = AcceptanceModel()
    for step in range(600):  # the draft is overconfident: true acceptance is q^2
        q = [rng.random() for _ in range(3)]
        accepted = 0
        while accepted < 3 and rng.random() < q[accepted] ** 2:
            accepted += 1
        model.observe(f"r{step % 7}", q, accepted)
    rep = model.report()
    assert rep["ours"]["ece"] < rep["raw_draft_probability"]["ece"] / 2
    assert rep["ours"]["brier"] < rep["raw_draft_probability"]["brier"]
    curve = [model.calibrated(q / 20) for q in range(21)]
    assert all(b >= a for a, b in zip(curve, curve[1:], strict=False))
    assert model.calibrated(0.5) == pytest.approx(0.25, abs=0.08)


def test_request_history_follows_the_request():
    model = AcceptanceModel()
    for _ in range(10):
        model.observe("stubborn", [0.9, 0.9], 0)  # always rejected at once
        model.observe("easy", [0.9, 0.9], 2)
    assert model.predict("stubborn", 0.9, 0) < 0.5 < model.predict("easy", 0.9, 0)
    assert model.predict_unseen("stubborn", 0) < 0.3 < model.predict_unseen("easy", 0)
    model.forget_except(["easy"])
    assert "stubborn" not in model.requests  # finished requests are forgotten



def _static_steps(rates, steps=400, k=3, life=20, seed=0):
    """Telemetry-like steps of a static:k run: request slot i accepts each draft with rates[i]
    (i.i.d.), and is replaced by a new request every `life` steps."""
    import random
    from types import SimpleNamespace

    rng = random.Random(seed)
    out = []
    for t in range(steps):
        ids = [f"{i}-{(t + 3 * i) // life}" for i in range(len(rates))]
        acc = []
        for r in rates:
            a = 0
            while a < k and rng.random() < r:
                a += 1
            acc.append(a)
        out.append(SimpleNamespace(request_ids=ids, confidences=[[0.5] * k for _ in rates], accepted=acc))
    return out


def test_lookahead_by_rank_shows_regression_to_the_mean():
    """Requests alike: ranking them by their short histories picks noise, so the top fifth is
    over-predicted and the bottom under-predicted; shrinking harder to the global rate narrows that."""
    from adaspec.spec.acceptance import lookahead_by_rank

    steps = _static_steps([0.7] * 20)
    weak = lookahead_by_rank(steps, AcceptanceModel(unseen_prior_weight=1.0))
    strong = lookahead_by_rank(steps, AcceptanceModel(unseen_prior_weight=64.0))
    assert [g["group"] for g in weak] == [0, 1, 2, 3, 4] and sum(g["n"] for g in weak) == 20 * 400
    top, bottom = weak[0], weak[-1]
    assert abs(top["accepted"] - bottom["accepted"]) < 0.15  # alike in truth
    assert top["predicted"] > top["accepted"] + 0.1 and bottom["predicted"] < bottom["accepted"] - 0.1
    spread = lambda gs: gs[0]["predicted"] - gs[-1]["predicted"]  # noqa: E731
    assert spread(strong) < spread(weak) / 2


def test_rank_weight_is_learned_from_the_lookaheads_errors():
    """Alike requests: the heaviest shrinkage predicts best; requests that truly differ: the lightest.
    Until enough request-steps are scored, the model's own weight."""
    def learned(steps):
        model = AcceptanceModel(rank_weights=RANK_WEIGHTS)
        for s in steps:
            model.forget_except(s.request_ids)
            model.observe_step(s.request_ids, s.confidences, s.accepted)
        return model

    assert AcceptanceModel().rank_weight() == AcceptanceModel().unseen_prior_weight
    alike = learned(_static_steps([0.7] * 20))
    assert alike.rank_weight() == max(alike.rank_weights)
    differ = learned(_static_steps([0.95] * 5 + [0.3] * 5, life=40))
    assert differ.rank_weight() == min(differ.rank_weights)
    assert differ.report()["rank_weight"] == differ.rank_weight()


def test_sum_weight_is_learned_from_the_lookaheads_bias():
    """Drafts accepted all or none (stretches of easy and hard text), requests that differ: the
    lightest shrinkage ranks them best, but a request's rate applied at every position over-predicts
    what deep drafts sum to (positions past an accepted one accept always here); the heaviest,
    nearer the global rates by position, sums closest. Until enough request-steps are scored, the
    model's own weight."""
    import random

    rng = random.Random(0)
    model = AcceptanceModel(rank_weights=RANK_WEIGHTS)
    assert model.sum_weight() == model.unseen_prior_weight
    easy = [0.9] * 4 + [0.3] * 4
    for t in range(600):
        ids = [f"{i}-{(t + 3 * i) // 30}" for i in range(len(easy))]
        model.forget_except(ids)
        model.observe_step(ids, [[0.5] * 4 for _ in easy], [4 if rng.random() < e else 0 for e in easy])
    assert model.rank_weight() == min(RANK_WEIGHTS) and model.sum_weight() == max(RANK_WEIGHTS)
    assert 0 < model.rank_bias[-1] < model.rank_bias[0]  # both over-predict, the heaviest least
    assert model.report()["sum_weight"] == max(RANK_WEIGHTS)


def test_plan_ranks_with_the_learned_weight():
    """The plan's look-ahead uses `rank_weight` unless the policy fixes one."""
    seen = []

    class Spy(AcceptanceModel):
        def unseen_table(self, request_ids, positions, weight=None):
            seen.append(weight)
            return super().unseen_table(request_ids, positions, weight)

    model = Spy(rank_weights=RANK_WEIGHTS)
    model.rank_scored, model.rank_errors = 10_000, np.array([3.0, 2.0, 1.0, 4.0])  # 16 has erred least
    cost = CostModel.linear(draft_step=0.0, verify_step=10 * MS)
    batch = lambda: BatchView([request(r) for r in "abcd"], 8)  # noqa: E731
    AdaSpecPolicy(cost, acceptance=model).plan(batch())
    assert 16.0 in seen
    seen.clear()
    model.rank_bias = np.array([-3.0, -2.0, 1.5, -0.5])  # 32 has summed closest
    AdaSpecPolicy(cost, acceptance=model).plan(batch())
    assert seen == [None, 16.0]  # per-request plans: priced and ranked with the rank weight
    seen.clear()
    ids = [f"r{k}" for k in range(UNIFORM_FROM)]
    pol = AdaSpecPolicy(cost, acceptance=model)
    pol.plan(BatchView([request(r) for r in ids], 8))
    assert seen == [32.0, 16.0]  # one depth for all: priced with the sum weight, ranked as before
    assert pol._unseen == model.unseen_table(ids, 9, 32.0)
    seen.clear()
    AdaSpecPolicy(cost, acceptance=model, plan_prior_weight=8.0).plan(batch())
    assert 8.0 in seen and 16.0 not in seen


def test_lookahead_by_rank_ranks_real_differences():
    from adaspec.spec.acceptance import lookahead_by_rank

    gs = lookahead_by_rank(_static_steps([0.9] * 5 + [0.2] * 5), groups=2)
    assert gs[0]["accepted"] > 2 > 0.5 > gs[1]["accepted"]
    assert gs[0]["predicted"] > gs[1]["predicted"] + 1

# ---------------------------------------------------------------------------------- in the engine

PROMPTS = ["def add(a, b):", "class Point:", "for i in range(10):", "import os\nimport sys",
           "    self.x = x", "print(", "if __name__ == '__main__':", "return a + b"]
# A cheap draft: the adaptive policies speculate, so their ragged paths run (frozen: no correction).
CHEAP_DRAFT = dict(draft_step=0.05 * MS, verify_step=5 * MS, verify_per_token=0.05 * MS)


def greedy(n=24):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def make_llm(pair, policy, k=6, **kw):
    target, draft, _ = pair
    kw.setdefault("dtype", torch.float64)
    kw.setdefault("max_model_len", 128)
    return LLM(model=target, draft_model=draft, policy=policy, num_speculative_tokens=k, **kw)


@pytest.fixture(scope="module")
def reference(tiny_pair):
    return [o.token_ids for o in make_llm(tiny_pair, "none").generate(PROMPTS, greedy())]


@pytest.mark.parametrize("name", ["threshold", "smartspec", "adaspec", "adaspec-drafter", "adaspec-noslo",
                                  "adaspec-always", "adaspec-everystep", "adaspec-late",
                                  "adaspec-uniform", "adaspec-ragged"])
def test_every_policy_is_lossless(tiny_pair, reference, name):
    pol = make_policy(name, 6, CostModel.linear(**CHEAP_DRAFT))
    spec = make_llm(tiny_pair, pol, slo_tpot_ms=50.0)
    outs = spec.generate(PROMPTS, greedy())
    assert [o.token_ids for o in outs] == reference
    assert sum(o.spec_stats["drafted"] for o in outs) > 0
    records = list(pol.log.records)
    assert records and all("outcome" in r and r["phases"] for r in records)
    for r in records:  # no decision beyond K, the cap or the budget; what ran is what was chosen
        caps = [q["cap"] for q in r["requests"]]
        assert all(d <= min(c, 6) for d, c in zip(r["outcome"]["drafted"], caps, strict=True))
    modes = {p["choice"] for r in records for p in r["phases"] if p["phase"] == "mode"}
    # cost-aware adaptation tries both ways of running a speculating step (adaspec-always and
    # adaspec-uniform: no choice)
    assert modes == ({"adaptive"} if name == "adaspec-always" else {"fixed"} if name == "adaspec-uniform" else
                     {"adaptive", "fixed"} if name.startswith("adaspec") else set())


def test_drafter_stops_requests_on_their_own(tiny_pair, reference):
    """Per-token costs make the drafter weigh each request's history (deterministic: the cost model
    is frozen, and tokens are not weighted by the measured TPOTs)."""
    cost = CostModel.linear(draft_step=0.2 * MS, draft_per_row=0.1 * MS, verify_step=5 * MS,
                            verify_per_token=0.05 * MS, padded=False)
    policy = make_policy("adaspec-drafter", 6, cost)
    policy.tpot_weighted = False
    policy.uniform_from = None  # per-request plans at this batch size too (PROMPTS are 8)
    spec = make_llm(tiny_pair, policy)
    assert [o.token_ids for o in spec.generate(PROMPTS, greedy())] == reference
    recs = [r for r in spec.engine.telemetry if r.kind == "decode"]
    # same budget, different lengths: the drafter stopped some requests while others went on
    assert any(len({d for d, p in zip(r.drafted, r.planned, strict=True) if p == max(r.planned)}) > 1
               for r in recs)


def test_decisions_respect_budget_and_are_logged(tiny_pair, reference, tmp_path):
    pol = make_policy("adaspec", 6, CostModel.linear(**CHEAP_DRAFT))
    spec = make_llm(tiny_pair, pol, max_num_batched_tokens=30)  # 8 requests x (6+1) would be 56
    outs = spec.generate(PROMPTS, greedy())
    assert [o.token_ids for o in outs] == reference
    recs = [r for r in spec.engine.telemetry if r.kind == "decode"]
    assert all(sum(r.planned) + len(r.planned) <= 30 for r in recs)
    pol.log.to_jsonl(tmp_path / "d.jsonl")
    back = pol.log.read_jsonl(tmp_path / "d.jsonl")
    assert len(back) == len(pol.log.records)
    assert {p["phase"] for r in back for p in r["phases"]} >= {"plan", "draft", "prune"}
    assert all(r["predicted"]["step_time"] > 0 for r in back)
    # Replaying the log through a fresh copy of the policy re-makes every decision.
    from adaspec.spec.decisions import replay

    again = replay(back, make_policy("adaspec", 6, CostModel.linear(**CHEAP_DRAFT)))
    assert [r["replayed_verified"] for r in again] == [r["outcome"]["drafted"] for r in back]
    # ... and another policy can be weighed on the same steps
    static = replay(back, make_policy("static:2", 6))
    assert all(max(r["replayed_verified"]) <= 2 for r in static)
    # the log's outcomes carry request identities: calibration replays per-request history
    assert measure_calibration(pol.log.outcomes())["ours"]["n"] == pol.acceptance.ours.n


def test_calibration_on_tiny_pair_from_telemetry(tiny_pair, tmp_path):
    """Our acceptance estimate is better calibrated than the draft's raw probability, measured from
    engine telemetry (request identities recovered from it) of a static run."""
    spec = make_llm(tiny_pair, "static:4", k=4)
    spec.generate(PROMPTS, greedy(32))
    steps = outcomes_from_telemetry(spec.engine.telemetry)
    assert len({rid for s in steps for rid in s.request_ids}) == len(PROMPTS)
    rep = measure_calibration(steps)
    assert rep["ours"]["n"] > 100
    assert rep["ours"]["ece"] < rep["raw_draft_probability"]["ece"]
    assert rep["ours"]["brier"] < rep["raw_draft_probability"]["brier"]
    from adaspec.spec.acceptance import calibration_from_jsonl

    spec.engine.export_telemetry(tmp_path / "t.jsonl")
    from_file = calibration_from_jsonl(tmp_path / "t.jsonl")
    ranks = from_file.pop("lookahead_by_rank")
    assert from_file == rep
    assert sum(g["n"] for g in ranks) > 0


@pytest.mark.slow
def test_build_engine_profiles_once_then_reuses(tiny_pair, reference, tmp_path, monkeypatch):
    from adaspec.spec import profiler

    monkeypatch.setenv("ADASPEC_CACHE_DIR", str(tmp_path))
    spec = make_llm(tiny_pair, "adaspec", max_num_seqs=8)
    cm = spec.engine.policy.cost_model
    assert cm is not None and list((tmp_path / "profiles").glob("*.json"))
    assert [o.token_ids for o in spec.generate(PROMPTS, greedy())] == reference
    assert cm.error_report()["steps"] > 0
    monkeypatch.setattr(profiler, "time_forwards", lambda *a, **k: pytest.fail("profiled twice"))
    again = make_llm(tiny_pair, "smartspec", max_num_seqs=8)
    assert again.engine.policy.cost_model.to_dict() == json.loads(json.dumps(cm.to_dict()))


@pytest.mark.slow
def test_closed_loop_benchmark_smoke(tiny_pair, tmp_path, monkeypatch):
    """The benchmark script end to end on tiny inputs (not a measurement: just that it runs and
    reports every field)."""
    from conftest import load_benchmark

    monkeypatch.setenv("ADASPEC_CACHE_DIR", str(tmp_path / "cache"))
    bench = load_benchmark("policies_closed_loop")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "turns": [p]}) + "\n"
                               for i, p in enumerate(PROMPTS[:3])))
    target, draft, _ = tiny_pair
    policies = "none,static:2,threshold,smartspec,adaspec"
    out = tmp_path / "docs" / "pcl"
    assert bench.main(["--model", str(target), "--draft-model", str(draft), "--prompts", str(prompts),
                       "--policies", policies, "--concurrency", "1,2", "--requests-per-level", "3",
                       "--max-tokens", "6", "--num-speculative-tokens", "2", "--max-model-len", "64",
                       "--out", str(out), "--save-decisions", str(tmp_path / "dec")]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["meta"]["tpot_slo_ms"] > 0 and res["meta"]["output_length_rule"].startswith("fixed 6")
    rows = {(r["policy"], r["concurrency"]): r for r in res["results"]}
    assert set(rows) == {(p, c) for p in policies.split(",") for c in (1, 2)}
    for r in rows.values():
        assert r["requests"] == 3 and r["failed"] == 0 and 0 <= r["slo_attainment"] <= 1
        assert r["tpot_p99_ms"] >= r["tpot_median_ms"] > 0
    assert rows[("static:2", 1)]["mean_speculation_length"] > 0
    assert "step_time_error" in rows[("adaspec", 2)]
    cal = res["per_policy"]["static:2"]["calibration_from_telemetry"]
    assert cal["ours"]["n"] > 0 and cal["raw_draft_probability"]["n"] == cal["ours"]["n"]
    md = out.with_suffix(".md").read_text()
    assert "## Concurrency 2" in md and "| adaspec |" in md and "calibration" in md
    assert (tmp_path / "dec" / "adaspec.jsonl").exists()
    # every measured request has its own line, and the attainment table agrees with the rows
    reqs = [json.loads(x) for x in out.with_suffix(".requests.jsonl").read_text().splitlines()]
    assert len(reqs) == 3 * len(rows)
    slo = res["meta"]["tpot_slo_ms"]
    for (p, c), r in rows.items():
        mine = [q for q in reqs if q["policy"] == p and q["concurrency"] == c]
        assert {q["prompt"] for q in mine} == {0, 1, 2} and all(q["output_tokens"] == 6 for q in mine)
        assert sum(q["drafted"] for q in mine) > 0 or r["mean_speculation_length"] == 0
        met = sum(q["tpot_ms"] <= slo for q in mine) / len(mine)
        assert res["attainment_by_slo"][p][str(c)]["1"] == pytest.approx(met) == r["slo_attainment"]
    assert "## SLO attainment at multiples of the SLO" in md


def test_attainment_by_acceptance_groups_prompts_by_the_reference_policy():
    """Prompts fall into fifths of their accepted tokens per step under the reference policy, per
    concurrency (the other policies' own acceptance does not move a prompt)."""
    from conftest import load_benchmark

    groups = load_benchmark("attainment_by_acceptance").groups
    recs = [{"policy": "static:5", "concurrency": 4, "prompt": p, "accepted": 10 * p, "steps": 10}
            for p in range(10)]
    recs += [{"policy": "adaspec", "concurrency": 4, "prompt": p, "accepted": 100 - 10 * p, "steps": 10}
             for p in range(10)]
    recs.append({"policy": "static:5", "concurrency": 8, "prompt": 3, "accepted": 0, "steps": 0})
    g = groups(recs, "static:5")
    assert [g[4, p] for p in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert (8, 3) not in g  # no verification step: no rate


def test_sim_grid_compare_takes_the_best_baseline_per_cell():
    """Per cell the lowest baseline TPOT and the highest attainment, from the reference grid;
    baselines in the compared grid are skipped; a cell with no baseline is an error."""
    from conftest import load_benchmark

    compare = load_benchmark("sim_grid_compare").compare

    def cell(tpot, att):
        return {"tpot_mean": tpot, "attainment": att}

    ref = {"p|t|0.3|none": cell(20.0, 1.0), "p|t|0.3|static:3": cell(10.0, 0.9),
           "p|t|0.6|static:3": cell(12.0, 0.8)}
    rows = compare(ref, {"p|t|0.3|adaspec": cell(8.0, 0.95), "p|t|0.6|adaspec": cell(15.0, 0.85),
                         "p|t|0.3|none": cell(1.0, 1.0)})
    assert len(rows) == 1 and rows[0]["policy"] == "adaspec"
    assert rows[0]["gain"] == pytest.approx([10 / 8 - 1, 12 / 15 - 1])
    assert rows[0]["attainment"] == pytest.approx([-0.05, 0.05])
    with pytest.raises(ValueError, match="p|t|0.9"):
        compare(ref, {"p|t|0.9|adaspec": cell(1.0, 1.0)})


def test_plan_counterfactual_alternates_adaspec_and_a_fixed_depth(tiny_pair, tmp_path):
    """Every other decode step runs static:k's plan (depth k for all); each step records the grid's
    predictions for both plans and what it measured."""
    from conftest import load_benchmark

    bench = load_benchmark("plan_counterfactual")
    target, draft, _ = tiny_pair
    out = tmp_path / "pc"
    assert bench.main(["--model", str(target), "--draft-model", str(draft), "--concurrency", "3",
                       "--repeats", "1", "--max-tokens", "12", "--depth", "2",
                       "--num-speculative-tokens", "4",
                       "--max-model-len", "128", "--tpot-slo-ms", "1000", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    recs = res["records"]
    assert {r["forced"] for r in recs} == {True, False}
    # a forced step verifies depth 2 for every request (where the requests' caps allow it)
    assert any(r["forced"] and r["verified"] == 2 * r["batch"] for r in recs)
    assert all(r["emitted"] >= r["batch"] and r["fixed_time"] > 0 for r in recs)
    assert "forced" in res["summary"]["3"] and out.with_suffix(".md").exists()


def test_only_a_learned_plan_weight_scores_rank_weights():
    """Scoring the candidate weights costs a little every step: only the model of an adaspec plan
    that learns its weight does it."""
    assert AdaSpecPolicy().acceptance.rank_weights == RANK_WEIGHTS
    assert AdaSpecPolicy(plan_prior_weight=8.0).acceptance.rank_weights == ()
    assert SmartSpecPolicy().acceptance.rank_weights == ()


def test_policy_overhead_times_each_decision_per_step(tiny_pair, tmp_path):
    """The benchmark times the policy's four decisions and the learning policies' main parts, per
    decode step, for every policy and level it runs."""
    from conftest import load_benchmark

    bench = load_benchmark("policy_overhead")
    target, draft, _ = tiny_pair
    out = tmp_path / "po"
    assert bench.main(["--model", str(target), "--draft-model", str(draft), "--policies", "adaspec,static:2",
                       "--concurrency", "1,3", "--max-tokens", "12", "--max-prompt-tokens", "40",
                       "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [(r["policy"], r["concurrency"]) for r in rows] == [("adaspec", 1), ("adaspec", 3),
                                                               ("static:2", 1), ("static:2", 3)]
    for r in rows:
        assert r["calls_per_step"]["plan"] == 1.0 and r["calls_per_step"]["observe"] == 1.0
        assert r["decisions_ms_per_step"] > 0
    adaspec = rows[1]["ms_per_step"]
    assert adaspec["plan: continuation_grid"] > 0 and adaspec["observe: AcceptanceModel.observe_step"] > 0
    assert "plan: continuation_grid" not in rows[3]["calls_per_step"]  # a static policy has no grid
    assert all(getattr(owner, name).__name__ == name for owner, name, _ in bench.PARTS)  # put back


def test_decision_cost_runs_the_baseline_shapes_with_the_policy_deciding_alongside(tiny_pair, tmp_path):
    """The shadow engine verifies exactly what the baseline decides, while the policy under test
    makes (and learns from) every decision on the same batches."""
    from conftest import load_benchmark

    bench = load_benchmark("decision_cost")
    target, draft, _ = tiny_pair
    out = tmp_path / "dc"
    assert bench.main(["--model", str(target), "--draft-model", str(draft), "--baseline", "static:2",
                       "--concurrency", "2", "--repeats", "2", "--max-tokens", "12",
                       "--max-prompt-tokens", "40", "--out", str(out)]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["results"]
    for role in ("baseline", "shadow"):
        assert row[role]["runs"] == 2 and row[role]["step_ms"] > 0 and row[role]["verify_ms"] > 0
    assert row["step_ratio"] == pytest.approx(row["shadow"]["step_ms"] / row["baseline"]["step_ms"], rel=1e-3)
    pol = AdaSpecPolicy(CostModel.linear(**CHEAP_DRAFT))
    shadow = bench.Shadow(pol, make_policy("static:2", 6))
    batch = BatchView([request("a"), request("b")], 6)
    assert shadow.plan(batch) == [2, 2] and pol.log._current is not None  # adaspec planned this step


def test_request_waits_measures_life_over_decode_time(tmp_path):
    """Hand-built telemetry: request a runs two 10 ms decode steps with a 5 ms gap and a 20 ms
    prefill between them (life 45 ms over 20 ms of its steps); b runs one step alone (ratio 1)."""
    from conftest import load_benchmark

    bench = load_benchmark("request_waits")
    recs = [{"kind": "prefill", "start": 0.000, "step_time": 0.020, "request_ids": ["a"]},
            {"kind": "decode", "start": 0.020, "step_time": 0.010, "request_ids": ["a"]},
            {"kind": "prefill", "start": 0.035, "step_time": 0.020, "request_ids": ["b"]},
            {"kind": "decode", "start": 0.055, "step_time": 0.010, "request_ids": ["a"]},
            {"kind": "decode", "start": 0.070, "step_time": 0.010, "request_ids": ["b"]}]
    res = bench.request_waits(recs, min_decode=0.0)
    assert res["requests"] == 2 and res["prefill_share"] == pytest.approx(0.04 / 0.07)
    assert res["median"] == pytest.approx((45 / 20 + 1) / 2)
    assert bench.request_waits(recs, min_decode=0.015)["median"] == pytest.approx(45 / 20)  # b too short
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    assert bench.main([str(path)]) == 0


def test_uniform_variant_gives_every_request_the_plans_depth():
    """`adaspec-uniform`: one depth for all that may draft, drafted without questions (no ragged
    lengths, no pruning), while the same batch under `adaspec` drafts by confidence."""
    cost = CostModel.linear(draft_step=0.5 * MS, draft_per_row=0.5 * MS, verify_step=10 * MS,
                            verify_per_token=1 * MS, padded=False)
    batch = BatchView([request("sure"), request("unsure"), request("short", cap=2)], 8)
    pol = adaspec(cost, {"sure": 0.9, "unsure": 0.2, "short": 0.9}, "adaspec-uniform")
    planned, drafted, verified = drive(pol, batch, lambda i, j: 0.02 if j == 1 else 0.9)
    h = planned[0]
    assert h >= 1 and planned == [h, h, min(h, 2)] and drafted == planned and verified == planned
    assert pol.describe()["uniform"] is True
    # the restriction holds with the mean-TPOT objective too (it re-weighs the grid's candidates)
    pol = adaspec(cost, {"sure": 0.9, "unsure": 0.2, "short": 0.9}, "adaspec-uniform")
    pol.mean_tpot = True
    batch = BatchView([request("sure"), request("unsure"), request("short", cap=2)], 8)
    planned, _, _ = drive(pol, batch)
    assert planned[0] >= 1 and planned == [planned[0], planned[0], min(planned[0], 2)]
    # expensive verification: the uniform variant may still choose no speculation at all
    cost = CostModel.linear(draft_step=1 * MS, verify_step=0.0, verify_per_token=10 * MS)
    pol = adaspec(cost, {"a": 0.3, "b": 0.3}, "adaspec-uniform")
    assert drive(pol, BatchView([request("a"), request("b")], 8)) == ([0, 0], [0, 0], [0, 0])


def test_adaspec_plans_per_request_below_its_batch_size_and_uniform_from_it():
    """`adaspec`: below `uniform_from` requests draft by confidence (as `adaspec-ragged` at every
    batch size); from it on every request that may draft gets the plan's depth, drafted without
    questions."""
    cost = CostModel.linear(draft_step=0.5 * MS, draft_per_row=0.5 * MS, verify_step=10 * MS,
                            verify_per_token=1 * MS, padded=False)
    rates = {"sure": 0.9, "unsure": 0.2, "short": 0.9}
    small = BatchView([request("sure"), request("unsure"), request("short", cap=2)], 8)
    pol = adaspec(cost, rates)
    assert pol.uniform_from == 8 and AdaSpecPolicy.variant("adaspec-ragged").uniform_from is None
    pol.uniform_from = 4
    planned, _, _ = drive(pol, small, lambda i, j: 0.02 if j == 1 else 0.9)
    assert planned[0] > planned[1]  # the confident request drafts longer (as `adaspec` would)
    pol = adaspec(cost, rates)
    pol.uniform_from = 3
    batch = BatchView([request("sure"), request("unsure"), request("short", cap=2)], 8)
    planned, drafted, verified = drive(pol, batch, lambda i, j: 0.02 if j == 1 else 0.9)
    h = planned[0]
    assert h >= 1 and planned == [h, h, min(h, 2)] and drafted == planned and verified == planned
    assert pol.describe()["uniform_from"] == 3 and pol.describe()["uniform"] is False


def test_rank_weight_scoring_small_batches_match_the_array_path():
    """Batches of one or two score the look-ahead in plain floats: the same values as the array
    path used for larger batches."""
    model = AcceptanceModel(rank_weights=RANK_WEIGHTS)
    rng = np.random.default_rng(0)
    for _ in range(40):
        ids = [f"r{i}" for i in range(4)]
        confs = [list(rng.uniform(0.1, 0.99, size=rng.integers(1, 6))) for _ in ids]
        model.observe_step(ids, confs, [int(rng.integers(0, len(c) + 1)) for c in confs])
    for ids in (["r0"], ["r1", "new"]):
        n = [3, 5][:len(ids)]
        array = model.lookahead_tokens(ids, n, RANK_WEIGHTS)
        floats = [model._lookahead_small(ids, n, w) for w in RANK_WEIGHTS]
        np.testing.assert_allclose(array, floats, rtol=1e-12)


def test_lookahead_follows_a_requests_recent_steps():
    """A request that accepted everything, then nothing: with its past decayed per verification the
    look-ahead falls further than with the whole history counted alike (request_decay=1.0), whose
    rate is exactly accepted / tested over every tested token."""
    models = {d: AcceptanceModel(request_decay=d) for d in (1.0, 0.9)}
    for m in models.values():
        for _ in range(20):
            m.observe("r", [0.9, 0.9, 0.9], 3)
        for _ in range(5):
            m.observe("r", [0.9, 0.9, 0.9], 0)
    plain, decayed = (models[d].predict_unseen("r", 0) for d in (1.0, 0.9))
    assert decayed < plain - 0.1
    rate = models[1.0].request_rates["r"]
    assert (rate.accepted, rate.tested) == (60.0, 65.0)  # 20 x 3 accepted of 3; 5 x 0 of the 1 tested


def test_exploration_stops_at_positions_a_draft_rarely_reaches():
    """At low acceptance a deep position is verified only when every one before it was accepted, so
    it gathers evidence slowly; probing it stops once a draft reaches it with less than
    `explore_reach` probability (session 20: simulated Llama-70B pair, probes cost 1-3.5%)."""
    from adaspec.spec.acceptance import AcceptanceModel

    acc = AcceptanceModel(min_evidence=20, explore_reach=0.2)
    for k in range(200):  # ~40% accepted at each of positions 0 and 1; position 2 tested ~28 times
        n = 0 if k % 5 < 3 else (1 if k % 25 < 15 else 2)
        acc.observe(f"r{k}", [0.5, 0.5, 0.5], n)
    rates = [acc._global_rate(j) for j in range(3)]
    assert rates[0] == pytest.approx(0.4, abs=0.03) and acc.position_rates[2].tested < 40
    reach2 = rates[0] * rates[1]
    assert reach2 < 0.2 and acc.position_rates[2].tested >= 20
    assert acc.position_rates[3].tested == 0  # never drafted that deep
    assert acc.unexplored_position(8) is None  # position 3: reached with < 0.2, not probed
    assert AcceptanceModel(min_evidence=20, explore_reach=0.0).unexplored_position(1) == 0
    acc.explore_reach = 0.0  # without the bound, position 3 would be probed
    assert acc.unexplored_position(8) == 3


def test_look_ahead_positions_without_evidence_are_explored():
    """Early rejections can leave a look-ahead position's global rate low on a handful of tests
    (session 17, c=1: position 1 at 1 of 6). The plan then stops drafting before it, so it is never
    verified again and the estimate stays wrong. Until a position has `min_evidence` verified
    tokens, the plan's top-ranked request drafts past it; once it has them, the plan's own choice
    stands, even if the evidence says the position is as bad as it looked."""
    from adaspec.spec.acceptance import AcceptanceModel

    acc = AcceptanceModel(min_evidence=20)
    assert acc.unexplored_position(4) == 0  # nothing verified yet
    for k in range(30):  # position 0: 18 of 30 accepted; position 1 tested 6 times, accepted once
        acc.observe(f"w{k}", [0.6, 0.6], 1 if k < 12 else 0)
        if k < 6:
            acc.observe(f"v{k}", [0.6, 0.6], 2 if k == 0 else 1)
    assert acc.unexplored_position(4) == 1 and acc.unexplored_position(1) is None
    # a draft forward and a verified token cost 7 ms against a 20 ms step without speculation: with
    # position 0 at ~0.5 and position 1 at ~0.15, no depth pays
    cost = CostModel.linear(draft_step=2 * MS, verify_step=10 * MS, verify_per_token=5 * MS, padded=False)
    pol = AdaSpecPolicy.variant("adaspec-noslo", cost)
    pol.acceptance = acc
    batch = BatchView([request("a", cap=2, output_tokens=10), request("b", cap=2, output_tokens=10)], 8)
    planned, drafted, verified = drive(pol, batch, lambda i, j: 0.6)
    phases = {p["phase"]: p for p in pol.log._current["phases"]}
    assert phases["plan"]["choice"]["h"] == 0  # the plan's own choice: no speculation
    assert phases["explore"]["depth"] == 2 and sorted(verified) == [0, 2]  # one request probes position 1
    assert pol.replan.reusable(["a", "b"]) is None  # the next step plans (and explores) again
    # ... but at most one plan in PROBE_EVERY probes (each probe costs the batch a draft forward)
    probes, pol.replan = [], None  # every step plans anew (a reused plan makes no new decision)
    for k in range(2 * pol.probe_every):
        b = BatchView([request(f"{r}{k}", cap=2, output_tokens=10) for r in "pq"], 8)
        drive(pol, b, lambda i, j: 0.6)
        probes.append("explore" in {p["phase"] for p in pol.log._current["phases"]})
        pol.log._current = None  # no outcome is observed: position 1 stays unexplored
    assert probes == ([False] * (pol.probe_every - 1) + [True]) * 2
    for k in range(20):  # position 1 now has its evidence, and it is bad
        acc.observe(f"u{k}", [0.6, 0.6], 1)
    assert acc.unexplored_position(2) is None
    batch = BatchView([request("c", cap=2, output_tokens=10), request("d", cap=2, output_tokens=10)], 8)
    assert max(drive(pol, batch, lambda i, j: 0.6)[1]) <= 1  # never past position 0
    assert "explore" not in {p["phase"] for p in pol.log._current["phases"]}


def test_a_variant_registered_from_the_command_line_is_built_by_name(monkeypatch):
    """`AdaSpecPolicy.register_variant("NAME=JSON")` (sim_paper_grid's --variant): make_policy then
    builds NAME with those keyword arguments; bad specs are refused with the field named."""
    monkeypatch.setattr(AdaSpecPolicy, "VARIANTS", dict(AdaSpecPolicy.VARIANTS))  # the registry is shared
    cost = CostModel.linear(draft_step=0.5 * MS, verify_step=10 * MS)
    spec = 'adaspec-rl20={"rescue_loss": 0.2, "uniform_from": 4}'
    assert AdaSpecPolicy.register_variant(spec) == "adaspec-rl20"
    pol = make_policy("adaspec-rl20", 8, cost)
    assert pol.name == "adaspec-rl20" and pol.rescue_loss == 0.2 and pol.uniform_from == 4
    assert make_policy("adaspec", 8, cost).rescue_loss != 0.2
    assert AdaSpecPolicy.register_variant(spec) == "adaspec-rl20"  # the same again: harmless
    for spec, field in [('rl={"rescue_loss": 0.2}', "NAME"), ("adaspec-x=", "JSON"),
                        ('adaspec-x=[1]', "JSON object"), ('adaspec-x={"rescue_los": 1}', "rescue_los"),
                        ('adaspec-rl20={"rescue_loss": 0.3}', "exists"),
                        ('adaspec-y={"rescue_loss": "0.2"}', "rescue_loss must be a number"),
                        ('adaspec-y={"verifier": 0}', "verifier must be true or false")]:
        with pytest.raises(ValueError, match=field):
            AdaSpecPolicy.register_variant(spec)
