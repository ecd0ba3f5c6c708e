"""Acceptance model: P(a drafted token is accepted | draft probability, position, request history).

Probabilities here are *conditional*: the chance that drafted position j is accepted given that
positions before it were (acceptance is a prefix), so the chance that a step keeps j+1 drafted
tokens is the product of the first j+1 of them. Verification reveals each position up to and
including the first rejection; later positions are never tested and are not learned from.

Three parts, each simple enough to trust:
1. Calibration of the draft's own probability q: acceptance counts in equal-width bins of q, each
   starting from a weak prior (3 pseudo-observations) that believes q itself, made monotone in q by
   pooling adjacent violators, and interpolated between bin centres. Until a bin has seen
   `min_evidence` verified tokens, `needs_evidence` tells the policy to verify some there.
2. Position and request adjustments, in odds: for each position, and for each running request,
   (accepted + m) / (expected + m), where "expected" sums the calibrated predictions that were
   tested. A request that keeps getting rejected sees its odds shrink, and keeps being expected to.
3. For a token not drafted yet (look-ahead), the request's own acceptance rate (its past decayed by
   `request_decay` per verification: recent steps count more), shrunk towards the global rate at
   that position (prior 0.6, as in the paper's reference) with the weight of `unseen_prior_weight`
   tested tokens (4). The plan, which *ranks* requests by it, uses the weight
   whose predictions have erred least so far (`rank_weight`).

`CalibrationScore` measures it: expected calibration error and Brier score, scored prequentially
(each prediction before its outcome is learned), for our estimate and for the raw q;
`measure_calibration` replays outcomes (from engine telemetry, a decision log, or a file:
`python -m adaspec.spec.acceptance telemetry.jsonl`) through a fresh model.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-3


def _odds(p: float) -> float:
    p = min(1 - EPS, max(EPS, p))
    return p / (1 - p)


def _prob(odds: float) -> float:
    return min(1 - EPS, max(EPS, odds / (1 + odds)))


def _on_curve(curve: list[float], q: float) -> float:
    """The calibration curve (acceptance at each bin centre of q) at q: linear between the centres,
    flat beyond the outer ones."""
    top = len(curve) - 1
    x = q * (top + 1) - 0.5
    if x <= 0.0:
        return curve[0]
    if x >= top:
        return curve[top]
    lo = int(x)
    return curve[lo] + (x - lo) * (curve[lo + 1] - curve[lo])


def expected_tokens(predictions: list[list[float]]) -> float:
    """Expected tokens a step emits when each request verifies the drafts of one row of conditional
    acceptances (`AcceptanceModel.predictions`): one token each, plus P(first j+1 accepted) summed."""
    total = 0.0
    for row in predictions:
        prefix = 1.0
        total += 1
        for p in row:
            prefix *= p
            total += prefix
    return total


def pool_adjacent_violators(values: list[float], weights: list[float]) -> list[float]:
    """Weighted isotonic (non-decreasing) fit of `values`."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [b[0] for b in blocks for _ in range(b[2])]


@dataclass
class _Ratio:
    """Observed over expected acceptances, with `prior` pseudo-observations of ratio 1."""

    accepted: float = 0.0
    expected: float = 0.0

    def factor(self, prior: float) -> float:
        return (self.accepted + prior) / (self.expected + prior)


@dataclass
class _Rate:
    accepted: float = 0.0
    tested: float = 0.0


# Per verification, the weight a request's earlier outcomes keep in its look-ahead rate. Acceptance
# comes in stretches (easy text accepts every draft), so recent steps predict the next better than a
# request's whole history: replayed prequentially on static:3 and static:5 telemetry of the embedded
# pair (code trace, Spec-Bench closed loop, conversation trace; `python benchmarks/lookahead_decay.py
# TELEMETRY...`), the look-ahead's squared error on the tokens a step accepts fell in 5 of 5 with 0.9
# against 1.0 (no decay), and its under-prediction of 3-5 drafts' tokens shrank in 4 of 5 (Spec-Bench
# static:5: -0.153 -> -0.100 tokens a step; code static:5 -0.060 -> -0.062). Stronger decay (0.7)
# cut the bias further but raised the error on two of the five.
REQUEST_DECAY = 0.9
# `unexplored_position` probes a position only while a draft reaches it with at least this
# probability (what the position's own rate can change in the look-ahead is at most that)
EXPLORE_REACH = 0.2
RANK_WEIGHTS = (4.0, 8.0, 16.0, 32.0)  # prior weights `rank_weight` chooses among (AdaSpecPolicy's model)
RANK_EVERY = 4  # score the weights on one verification step in this many (see _score_rank_weights)
RANK_DECAY = 0.996  # per scored step: the choice follows a workload that changes (half-life ~700 steps)
RANK_MIN_SCORED = 64  # request-steps scored before the choice departs from unseen_prior_weight


class AcceptanceModel:
    def __init__(self, bins: int = 10, calibration_prior: float = 3.0, position_prior: float = 20.0,
                 request_prior: float = 4.0, unseen_prior: float = 0.6, unseen_prior_weight: float = 4.0,
                 max_position: int = 16, min_evidence: int = 20, rank_weights: tuple[float, ...] = (),
                 request_decay: float = REQUEST_DECAY, explore_reach: float = EXPLORE_REACH):
        self.bins = bins
        self.calibration_prior = calibration_prior
        self.position_prior = position_prior
        self.request_prior = request_prior
        self.unseen_prior = unseen_prior
        self.unseen_prior_weight = unseen_prior_weight
        self.max_position = max_position
        self.min_evidence = min_evidence
        self.explore_reach = explore_reach  # `unexplored_position` names only positions this reachable
        self.request_decay = request_decay  # weight of a request's past per verification (look-ahead)
        # scored (one step in RANK_EVERY) for `rank_weight`; empty (the default) for models no plan ranks with
        self.rank_weights = tuple(rank_weights)
        self.reset()

    def reset(self) -> None:
        self.bin_accepted = [0.0] * self.bins  # plain lists: updated a token at a time, every step
        self.bin_tested = [0.0] * self.bins
        self._curve: list[float] | None = None
        self._factors: list[float] | None = None
        self.positions = [_Ratio() for _ in range(self.max_position)]
        self.position_rates = [_Rate() for _ in range(self.max_position)]
        self.requests: dict[str, _Ratio] = {}
        self.request_rates: dict[str, _Rate] = {}
        self.ours = CalibrationScore()
        self.raw = CalibrationScore()
        self._memo: dict[tuple[str, float, int], float] = {}
        self.rank_errors = np.zeros(len(self.rank_weights))  # decayed squared errors, per weight
        self.rank_bias = np.zeros(len(self.rank_weights))  # decayed signed errors (predicted - accepted)
        self.rank_scored = 0  # request-steps scored
        self._rank_steps = 0  # verification steps with drafts seen (RANK_EVERY)

    # ------------------------------------------------------------------------------ predictions

    def _calibration_curve(self) -> list[float]:
        """Acceptance at each bin centre of q: rebuilt after every observed step, plain floats."""
        if self._curve is None:
            prior = self.calibration_prior
            weights = [t + prior for t in self.bin_tested]
            rates = [(a + prior * ((b + 0.5) / self.bins)) / w
                     for b, (a, w) in enumerate(zip(self.bin_accepted, weights, strict=True))]
            self._curve = pool_adjacent_violators(rates, weights)
        return self._curve

    def _position_factors(self) -> list[float]:
        """Each position's odds factor, as of the last observed step."""
        if self._factors is None:
            self._factors = [pos.factor(self.position_prior) for pos in self.positions]
        return self._factors

    def calibrated(self, q: float) -> float:
        """Global monotone map from draft probability to acceptance probability (piecewise linear
        between bin centres, flat beyond the outer ones)."""
        return _on_curve(self._calibration_curve(), q)

    def needs_evidence(self, q: float) -> bool:
        """Too few verified tokens near draft probability q to trust the calibration there yet.
        A policy that skips verifying such tokens would never learn they are better than the
        prior says (measured: an under-confident draft, q ~ 0.05 with 70% acceptance, had every
        draft pruned, step after step), so it should verify some."""
        return self.bin_tested[min(int(q * self.bins), self.bins - 1)] < self.min_evidence

    def unexplored_position(self, positions: int) -> int | None:
        """The shallowest of the first `positions` look-ahead positions whose global rate rests on
        fewer than `min_evidence` verified tokens (None: every one has enough). A position is
        verified only when the policy drafts past it, so a pessimistic early estimate is never
        corrected unless the policy drafts there anyway (measured, session 17: at c=1 the first
        requests' rejections left position 1 at 1 accepted of 6, its rate at 0.34 against ~0.87
        later, and adaspec drafted at most one token for ~240 steps).

        Only positions a draft reaches with probability at least `explore_reach` (the product of
        the global rates before it) are named: a position is verified only when every one before
        it was accepted, so at low acceptance a deep position gathers its evidence slowly and the
        probes went on for the whole run (session 20, simulated Llama-70B pair, acceptance ~0.45:
        1-3.5% behind the best static k in 7 of 8 cells, level or ahead without the probes), while
        what its rate can change in the look-ahead is at most its reach (a token a step)."""
        last = self.max_position - 1
        reach = 1.0
        for j in range(positions):
            if reach < self.explore_reach:
                return None
            if self.position_rates[min(j, last)].tested < self.min_evidence:
                return j
            reach *= self._global_rate(j)
        return None

    def predict(self, request_id: str, q: float, position: int) -> float:
        """Conditional acceptance of a drafted token with draft probability q at `position` (0-based)."""
        return self.predict_row(request_id, (q,), position)[0]

    def predict_row(self, request_id: str, confidences, start: int = 0) -> list[float]:
        """`predict` of a request's drafted tokens at positions start, start+1, ... Predictions
        change only when the model learns, so they are kept until then: `observe_step` scores the
        very predictions the policy drafted with, without computing them again. One call per row,
        the step's curve and position factors looked up once: at observe every verified token is
        predicted (30-60 a step at batch 16-32). 15% less time than a call per token in a loop of
        its own; inside the engine the observe step did not get measurably faster (session 14,
        `benchmarks/policy_overhead.py`: 0.125 ms a step at c=16 either way)."""
        memo, out = self._memo, []
        curve = None
        for j, q in enumerate(confidences, start):
            key = (request_id, q, j)
            p = memo.get(key)
            if p is None:
                if curve is None:  # the step's figures, looked up once a row
                    curve, factors = self._calibration_curve(), self._position_factors()
                    req = self.requests.get(request_id)
                    rf = 1.0 if req is None else req.factor(self.request_prior)  # x 1.0 changes nothing
                p = memo[key] = _prob(_odds(_on_curve(curve, q)) * factors[min(j, len(factors) - 1)] * rf)
            out.append(p)
        return out

    def predictions(self, request_ids: list[str], confidences: list[list[float]]) -> list[list[float]]:
        """`predict_row` of every request's drafted tokens (one row per request)."""
        return [self.predict_row(rid, c) for rid, c in zip(request_ids, confidences, strict=True)]

    def _global_rate(self, position: int) -> float:
        g = self.position_rates[min(position, self.max_position - 1)]
        w = self.unseen_prior_weight
        return (g.accepted + w * self.unseen_prior) / (g.tested + w)

    def _unseen(self, rate: _Rate | None, global_rate: float, weight: float | None = None) -> float:
        if rate is None:
            return _prob(_odds(global_rate))
        w = self.unseen_prior_weight if weight is None else weight
        return _prob(_odds((rate.accepted + w * global_rate) / (rate.tested + w)))

    def predict_unseen(self, request_id: str, position: int) -> float:
        """Conditional acceptance of a token not drafted yet (used to look ahead)."""
        return self._unseen(self.request_rates.get(request_id), self._global_rate(position))

    def newcomer_unseen(self, position: int = 0) -> float:
        """`predict_unseen` for a request with no history yet (one that joins the batch later)."""
        return self._unseen(None, self._global_rate(position))

    def unseen_table(self, request_ids: list[str], positions: int,
                     weight: float | None = None) -> list[list[float]]:
        """`predict_unseen` for every request and positions 0..positions-1, as one numpy evaluation
        with the same arithmetic (identical values); per call for a request or two, or if a subclass
        redefines predict_unseen (then `weight` is its business and is not passed).

        `weight` (default `unseen_prior_weight`) is how many tested tokens the global rate counts
        for against the request's own. Choosing the top few of many requests by their look-ahead
        picks, besides the truly better ones, those whose short history was lucky (the winner's
        curse): measured on the embedded pair's static:3 telemetry with weight 4
        (`lookahead_by_rank`), the top fifth of a step's ranking accepted 2.24 tokens where 2.36
        were predicted and the bottom fifth 1.72 where 1.49 were; with 16, 2.24 / 2.24 and
        1.75 / 1.62 (docs/policies.md, session 8)."""
        if type(self).predict_unseen is not AcceptanceModel.predict_unseen:
            return [[self.predict_unseen(rid, j) for j in range(positions)] for rid in request_ids]
        if len(request_ids) <= 2:
            return [[self._unseen(self.request_rates.get(rid), self._global_rate(j), weight)
                     for j in range(positions)] for rid in request_ids]
        w = self.unseen_prior_weight if weight is None else weight
        return self._unseen_array(request_ids, positions, np.array([w], dtype=float))[0].tolist()

    def _unseen_array(self, request_ids: list[str], positions: int, weights: np.ndarray) -> np.ndarray:
        """[weights, requests, positions] look-ahead acceptances, `_unseen`'s arithmetic elementwise."""
        g = np.array([self._global_rate(j) for j in range(positions)], dtype=float)[None, None, :]
        rates = [self.request_rates.get(rid) for rid in request_ids]
        acc = np.array([r.accepted if r else 0.0 for r in rates], dtype=float)[None, :, None]
        tested = np.array([r.tested if r else 0.0 for r in rates], dtype=float)[None, :, None]
        seen = np.array([r is not None for r in rates], dtype=bool)[None, :, None]
        w = weights[:, None, None]
        p = np.where(seen, (acc + w * g) / (tested + w), g)
        p = np.clip(p, EPS, 1 - EPS)  # _prob(_odds(p)), elementwise
        odds = p / (1 - p)
        return np.clip(odds / (1 + odds), EPS, 1 - EPS)

    def lookahead_tokens(self, request_ids: list[str], drafts: list[int], weights) -> np.ndarray:
        """[weights, requests] accepted tokens the look-ahead predicts for each request's next
        `drafts` drafts (sum over j < drafts of P(the first j+1 accepted)), per prior weight: the
        quantity the plan ranks requests by and sums."""
        n = np.asarray(drafts)
        table = self._unseen_array(request_ids, int(n.max()), np.asarray(weights, dtype=float))
        within = np.arange(int(n.max()))[None, :] < n[:, None]
        return (np.cumprod(table, axis=2) * within).sum(axis=2)

    def rank_weight(self) -> float:
        """The prior weight for a look-ahead that ranks requests (the plan's): of `rank_weights`, the
        one whose look-ahead has predicted the accepted tokens of verified drafts best so far
        (decayed squared error, each step scored before it is learned), `unseen_prior_weight` until
        RANK_MIN_SCORED request-steps are scored (or if the model scores no `rank_weights`).

        Why learned: the right weight is a property of the workload, how much requests really differ
        against how noisy a short history is. On the embedded pair's static:3 telemetry
        (`lookahead_by_rank`), weight 4 ranked the built-in prompts with too wide a spread (top fifth
        2.36 tokens predicted / 2.24 accepted, bottom 1.49 / 1.72), 16-32 fitted them; the Spec-Bench
        prompts, which differ more, by 4-8, within 0.5% of each other (docs/policies.md, session 8)."""
        if self.rank_scored < RANK_MIN_SCORED or not self.rank_weights:
            return self.unseen_prior_weight
        return self.rank_weights[int(np.argmin(self.rank_errors))]

    def sum_weight(self) -> float:
        """The prior weight whose look-ahead has summed closest to the accepted tokens (smallest
        signed error over the scored request-steps; `unseen_prior_weight` until RANK_MIN_SCORED).

        Why apart from `rank_weight`: the plan ranks requests by their look-ahead, where a weight
        that tells requests apart best (least squared error) serves, but one depth for all (adaspec
        from `UNIFORM_FROM` requests on) is chosen by the batch's expected tokens, a sum, where only
        the bias counts. Acceptance comes in stretches, so a request's recent rate, applied at
        every position, under-predicts deep drafts (the positions past a few accepted ones accept
        more often), the more the less it is shrunk to the global rates: replayed on static:8
        telemetry at c=4-16 (session 17, `benchmarks/lookahead_bias.py`), weight 4 predicted 2.6%
        fewer tokens than were accepted for 1 draft and 8.7% fewer for 8, weight 32 within 1.2% at
        every depth; squared error favoured the lighter weights (4 in that session's closed loops)."""
        if self.rank_scored < RANK_MIN_SCORED or not self.rank_weights:
            return self.unseen_prior_weight
        return self.rank_weights[int(np.argmin(np.abs(self.rank_bias)))]

    def _score_rank_weights(self, request_ids: list[str], confidences: list[list[float]],
                            accepted: list[int]) -> None:
        """Add each weight's squared error on this step's accepted tokens (requests that verified
        drafts; predictions from the state before the step, as the plan made them), on one step in
        RANK_EVERY: the choice settles over hundreds of steps, and scoring every step took 0.35-0.45
        ms of each step in the engine at any batch size (`benchmarks/policy_overhead.py`; its dozen
        small numpy calls run several times slower between forwards than in a loop of their own)."""
        if not self.rank_weights or not any(confidences):
            return
        self._rank_steps += 1
        if self._rank_steps % RANK_EVERY:
            return
        rows = [(rid, len(c), min(int(a), len(c)))
                for rid, c, a in zip(request_ids, confidences, accepted, strict=True) if c]
        ids, n, real = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        if len(ids) <= 2:  # plain floats, as unseen_table's (at c=1 the numpy path cost ~0.07 ms a step)
            predicted = [self._lookahead_small(ids, n, w) for w in self.rank_weights]
        else:
            predicted = self.lookahead_tokens(ids, n, self.rank_weights).tolist()
        self.rank_errors = np.array([e * RANK_DECAY + sum((p - r) ** 2 for p, r in zip(ps, real, strict=True))
                                     for e, ps in zip(self.rank_errors.tolist(), predicted, strict=True)])
        accepted = sum(real)
        self.rank_bias = np.array([b * RANK_DECAY + sum(ps) - accepted
                                   for b, ps in zip(self.rank_bias.tolist(), predicted, strict=True)])
        self.rank_scored += len(ids)

    def _lookahead_small(self, request_ids: list[str], drafts: list[int], weight: float) -> list[float]:
        """`lookahead_tokens` of one weight for a request or two, from `unseen_table`'s plain floats
        (the same arithmetic: sums of running products)."""
        table = self.unseen_table(request_ids, max(drafts), weight)
        return [sum(itertools.accumulate(row[:k], operator.mul))
                for row, k in zip(table, drafts, strict=True)]

    # ------------------------------------------------------------------------------ learning

    def observe(self, request_id: str, confidences: list[float], accepted: int) -> None:
        """Learn from one request's verification: `accepted` of the verified `confidences` (a prefix)."""
        self.observe_step([request_id], [confidences], [accepted])

    def observe_step(self, request_ids: list[str], confidences: list[list[float]],
                     accepted: list[int], predictions: list[list[float]] | None = None) -> None:
        """Learn from one verification step of a batch. Every prediction is scored before any of the
        step's outcomes is learned (they were all made before it), and the calibration curve is
        rebuilt once per step, not once per request. `predictions`: `self.predictions` of these
        confidences, if the caller has them already (at least every tested token's)."""
        self._score_rank_weights(request_ids, confidences, accepted)
        if predictions is None:
            predictions = self.predictions(request_ids, confidences)
        curve = self._calibration_curve()  # the step's, before any of it is learned
        for rid, c, p, a in zip(request_ids, confidences, predictions, accepted, strict=True):
            # positions past the first rejection were never tested and teach nothing
            self._learn(rid, c[:int(a) + 1], p, int(a), curve)
        self._curve = self._factors = None
        self._memo.clear()

    def _learn(self, request_id: str, tested: list[float], preds: list[float], accepted: int,
               curve: list[float]) -> None:
        req = self.requests.setdefault(request_id, _Ratio())
        rate = self.request_rates.setdefault(request_id, _Rate())
        bins, last = self.bins, self.max_position - 1
        bin_accepted, bin_tested = self.bin_accepted, self.bin_tested
        self.ours.add_prefix(preds[:len(tested)], accepted)
        self.raw.add_prefix(tested, accepted)
        for j, q in enumerate(tested):
            ok = float(j < accepted)
            b = min(int(q * bins), bins - 1)
            bin_accepted[b] += ok
            bin_tested[b] += 1
            cal = _on_curve(curve, q)
            pos = self.positions[min(j, last)]
            pos.accepted += ok
            pos.expected += cal
            req.accepted += ok
            req.expected += cal
            prate = self.position_rates[min(j, last)]
            prate.accepted += ok
            prate.tested += 1
        n = len(tested)
        d = self.request_decay
        rate.accepted = rate.accepted * d + min(accepted, n)
        rate.tested = rate.tested * d + n

    def forget_except(self, request_ids: Iterable[str]) -> None:
        """Drop history of requests no longer running (bounded memory)."""
        keep = set(request_ids)
        self._memo.clear()
        for d in (self.requests, self.request_rates):
            for rid in [r for r in d if r not in keep]:
                del d[rid]

    def report(self) -> dict:
        """Prequential calibration scores, ours vs the raw draft probability, the learned curve
        (acceptance at each bin centre of q), and the ranking look-ahead's weight and errors."""
        curve = [float(self.calibrated((b + 0.5) / self.bins)) for b in range(self.bins)]
        return {"ours": self.ours.report(), "raw_draft_probability": self.raw.report(),
                "curve": [round(v, 4) for v in curve], "rank_weight": self.rank_weight(),
                "sum_weight": self.sum_weight(),
                "rank_errors": {f"{w:g}": round(float(e), 3)
                                for w, e in zip(self.rank_weights, self.rank_errors, strict=True)}}


@dataclass
class CalibrationScore:
    """Running expected calibration error (equal-width bins) and Brier score (plain lists: `add`
    runs for every verified token)."""

    bins: int = 10
    count: list[float] = field(default_factory=lambda: [0.0] * 10)
    sum_pred: list[float] = field(default_factory=lambda: [0.0] * 10)
    sum_outcome: list[float] = field(default_factory=lambda: [0.0] * 10)
    sq_error: float = 0.0

    def add_prefix(self, ps: list[float], accepted: int) -> None:
        """Add a verification's tested tokens: predictions `ps`, the first `accepted` of them accepted."""
        bins, count, sum_pred, sum_outcome = self.bins, self.count, self.sum_pred, self.sum_outcome
        sq = self.sq_error
        for j, p in enumerate(ps):
            b = min(int(p * bins), bins - 1)
            ok = 1.0 if j < accepted else 0.0
            count[b] += 1
            sum_pred[b] += p
            sum_outcome[b] += ok
            sq += (p - ok) ** 2
        self.sq_error = sq

    @property
    def n(self) -> int:
        return int(sum(self.count))

    def ece(self) -> float:
        n = sum(self.count)
        if not n:
            return float("nan")
        return float(np.sum(np.abs(np.subtract(self.sum_pred, self.sum_outcome))) / n)

    def brier(self) -> float:
        return self.sq_error / self.n if self.n else float("nan")

    def report(self) -> dict:
        return {"n": self.n, "ece": self.ece(), "brier": self.brier()}


def measure_calibration(steps: Iterable, model: AcceptanceModel | None = None) -> dict:
    """Replay verification outcomes through a fresh acceptance model and score it against the raw
    draft probability. `steps`: objects with `request_ids`, `confidences` (verified tokens' draft
    probabilities per request) and `accepted` (StepOutcome, or `outcomes_from_telemetry` output)."""
    model = model or AcceptanceModel(rank_weights=RANK_WEIGHTS)  # the report gives the weight a plan learns
    for s in steps:
        model.observe_step(list(s.request_ids), [list(c) for c in s.confidences], list(s.accepted))
    return model.report()


def lookahead_by_rank(steps: Iterable, model: AcceptanceModel | None = None, groups: int = 5,
                      min_batch: int = 2, weight: float | None = None) -> list[dict]:
    """Calibration of the look-ahead (`unseen_table`) where the plan uses it: to rank requests.

    Per step (batch >= `min_batch`, every request verified at least one draft: a static policy's
    telemetry), each request's predicted accepted tokens over the drafts it verified, from the
    look-ahead before the step, against what it accepted; requests ranked within the step by the
    prediction and pooled by rank group (0: most confident). A plan that drafts for its top m
    requests leaves out the bottom ones: if the bottom group is under-predicted and the top one
    over-predicted (regression to the mean), leaving requests out looks cheaper than it is.
    `weight`: the look-ahead's prior weight (`unseen_table`). Prequential, as `measure_calibration`:
    every step is predicted before it is learned."""
    model = model or AcceptanceModel()
    out = [{"group": g, "n": 0, "predicted": 0.0, "accepted": 0.0} for g in range(groups)]
    for ids, confs, accepted in prequential(steps, model):
        if len(ids) >= min_batch and all(confs):
            w = model.unseen_prior_weight if weight is None else weight
            pred = model.lookahead_tokens(ids, [len(c) for c in confs], [w])[0].tolist()
            for rank, i in enumerate(sorted(range(len(ids)), key=lambda i: -pred[i])):
                g = out[groups * rank // len(ids)]
                g["n"] += 1
                g["predicted"] += pred[i]
                g["accepted"] += min(int(accepted[i]), len(confs[i]))
    return [{**g, "predicted": round(g["predicted"] / g["n"], 4),
             "accepted": round(g["accepted"] / g["n"], 4)}
            for g in out if g["n"]]


def prequential(steps: Iterable, model: AcceptanceModel
                 ) -> Iterator[tuple[list[str], list[list[float]], list[int]]]:
    """Each step's (request ids, verified tokens' confidences, accepted counts) with `model` as it
    stood before the step (the history of requests no longer running dropped, as the policies do at
    each step); the step is learned after the caller has predicted it."""
    for s in steps:
        ids, confs, accepted = list(s.request_ids), [list(c) for c in s.confidences], list(s.accepted)
        model.forget_except(ids)
        yield ids, confs, accepted
        model.observe_step(ids, confs, accepted)


@dataclass
class _TelemetryStep:
    request_ids: list[str]
    confidences: list[list[float]]
    accepted: list[int]


def outcomes_from_telemetry(records: Iterable) -> list[_TelemetryStep]:
    """Decode-step outcomes (request ids, verified tokens' confidences, accepted counts) from
    engine `StepRecord`s or their JSON form."""
    return [_TelemetryStep(list(rec.request_ids), [list(c) for c in rec.confidences], list(rec.accepted))
            for rec in records if rec.kind == "decode"]


def steps_from_jsonl(path: str) -> list[_TelemetryStep]:
    """`outcomes_from_telemetry` of a telemetry file written by `LLMEngine.export_telemetry` (or a
    benchmark's `--export-telemetry`)."""
    import json
    from types import SimpleNamespace

    with open(path) as f:
        return outcomes_from_telemetry(SimpleNamespace(**json.loads(line)) for line in f if line.strip())


def calibration_from_jsonl(path: str, weight: float | None = None, **model_kw) -> dict:
    """Calibration report from a telemetry file written by `LLMEngine.export_telemetry`: the
    per-token scores, and the look-ahead's calibration by rank (`lookahead_by_rank`, with prior
    `weight`)."""
    steps = steps_from_jsonl(path)
    model_kw.setdefault("rank_weights", RANK_WEIGHTS)  # as measure_calibration's own default
    report = measure_calibration(steps, AcceptanceModel(**model_kw))
    report["lookahead_by_rank"] = lookahead_by_rank(steps, AcceptanceModel(**model_kw), weight=weight)
    return report


if __name__ == "__main__":  # python -m adaspec.spec.acceptance telemetry.jsonl [--weight W]
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Calibration of the acceptance model, from engine telemetry.")
    ap.add_argument("telemetry")
    ap.add_argument("--weight", type=float, default=None,
                    help="look-ahead prior weight for the ranking table (default: the model's)")
    a = ap.parse_args()
    print(json.dumps(calibration_from_jsonl(a.telemetry, a.weight), indent=1))
