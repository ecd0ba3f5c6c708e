"""AdaSpec: adaptive drafter, confidence-prior verifier and SLO-aware choice on one efficiency model.

Per step (see `efficiency.py` for the model and the choice rule):
- plan: weigh every (depth h, top-m requests) candidate with look-ahead acceptance predictions
  (with the prior weight that has predicted best: `AcceptanceModel.rank_weight`) against no
  speculation; skip speculation unless some candidate is predicted to pay. The chosen
  requests may draft up to their cap; how far they go is decided token by token. The draft's
  catch-up after steps without speculation is a debt that any later speculation must pay too, and
  it grows while we wait; the plan charges only the catch-up of steady speculation (STEADY_LAG
  tokens a row: the last draft and the bonus token), so the choice is between speculating from
  now on and not. Charging the debt, even capped at K+1 tokens, locked speculation off at batch
  32 (measured: 410 of 458 steps without drafts, median lag 25 tokens, 1034 tokens/s where
  static:3 reached 1306).
- keep_drafting: with the real draft confidences so far, weigh again which requests draft one more
  token (the sunk draft time counts): each request stops on its own (ragged lengths), and the batch
  stops when no request's next token is worth its cost.
- prune (verifier): drop the globally least valuable draft positions, tails first, to the removal
  count with the best predicted efficiency, against the device's cost curve.
Each of the three choices goes through `efficiency.choose` (the SLO-aware rule). While a look-ahead
position has too little evidence (`AcceptanceModel.unexplored_position`), the plan's top-ranked
request drafts past it (`_probe`): a position the plan never drafts to is never verified, so an
early pessimistic estimate would stand for good. With
`tpot_weighted=True` a token counts at its request's worth for mean TPOT (`efficiency.weighted`: its
TPOT so far, relative to the batch's). Off by default: side by side on Spec-Bench (session 5) it cut
the P99 TPOT by 10-28% but not the mean (docs/policies.md).
Ablations: `adaspec-drafter` (no verifier, efficiency only), `adaspec-noslo` (no SLO),
`adaspec-always` (keep_drafting and prune in every speculating step, as the paper),
`adaspec-uniform` (`uniform=True`: the plan's depth for every request that may draft, drafted
without questions: the efficiency model and SLO rule choosing one k a step, with no per-request or
per-token adaptation and none of its cost; the control for what that adaptation adds); `adaspec-tpot`
is `adaspec` with `tpot_weighted=True`, `adaspec-meantpot` with `mean_tpot=True` (candidates ranked
by the batch's mean time per token instead of its tokens per second), `adaspec-steady` the same
with each request weighted by its rate so far (`_choose`), `adaspec-late` with
`late_weighted=True` (only requests behind their SLO weighted, `efficiency.late_weighted`; on the
conversation trace in session 10 it cut the P99 TPOT but not the mean, docs/trace_replay.md), and
`adaspec-ragged` plans per request at every batch size (`adaspec` until session 16; `adaspec` now
plans as `adaspec-uniform` from UNIFORM_FROM requests on, see there). There the SLO rule may still
rescue requests with any cell of the plan's grid (`grid_rescue`: the top m requests to depth h),
and a rescue may keep some of the requests off track on track, not all (`partial_rescue`,
`efficiency.choose`); `adaspec-strict` has neither (`adaspec` until session 21).

keep_drafting and prune cost time of their own. With `cost_aware_adaptation` (on by default) a
speculating step runs them only where, at this batch size, their measured cost has been below the
efficiency they were predicted to add (`adaptation.py`); otherwise the plan's requests draft its
depth h, without questions, and verify it all. The plan costs time too: with `reuse_plans` (on by
default) a fixed-mode decision made with every request well inside its SLO may serve the next steps,
for as many steps as re-planning has measurably changed less than it cost (`replan.py`);
`adaspec-everystep` plans every step, `adaspec-uniformreuse` reuses only decisions that treat every
request alike (the first version of the rule, c38eafc).
"""

from __future__ import annotations

import inspect
import json

import numpy as np

from adaspec.spec.acceptance import RANK_WEIGHTS, AcceptanceModel
from adaspec.spec.adaptation import AdaptationValue
from adaspec.spec.control import ControlledPolicy
from adaspec.spec.cost_model import CostModel, StepShape
from adaspec.spec.decisions import candidate
from adaspec.spec.efficiency import (
    RESCUE_LOSS,
    CandidateTokens,
    SLOState,
    choose,
    continuation_grid,
    late_weighted,
    next_token_options,
    prune_sequence,
    weighted,
)
from adaspec.spec.policy import BatchView, StepOutcome, fit_limits
from adaspec.spec.replan import SLO_HEADROOM, ReplanSchedule

STEADY_LAG = 2  # draft catch-up per row after a fully accepted step (last draft + bonus token)
# From this batch size on adaspec plans as adaspec-uniform (one depth for every request that may
# draft, drafted without per-token questions). At c=16 in the closed loop the per-request plan
# expected 1.3% more than depth 3 for all and its decisions cost ~4.6% of the step; side by side
# (session 16, as `adaspec-hybrid`) this was 3-5% faster than per-request plans at c=16-32 and on
# the traces' x4 levels 11% (code) and 4% (conversation), level at x2 (docs/policies.md,
# docs/trace_replay.md). Below it per-request lengths were level with or ahead of one depth for
# all (sessions 9 and 14). `adaspec-ragged` keeps per-request plans at every batch size.
UNIFORM_FROM = 8
# At most one plan in this many probes an unexplored look-ahead position (`_probe`). A probe drafts
# one request past the plan's depth, and every draft forward runs for the batch: probing every plan
# until a deep position had its evidence cost the simulated Llama-70B pair 1-3% (session 20).
PROBE_EVERY = 4

class AdaSpecPolicy(ControlledPolicy):
    name = "adaspec"
    needs_cost_model = True
    VARIANTS = {"adaspec": {}, "adaspec-noslo": {"slo_aware": False},
                "adaspec-drafter": {"verifier": False, "slo_aware": False},
                "adaspec-always": {"cost_aware_adaptation": False, "uniform_from": None},
                "adaspec-tpot": {"tpot_weighted": True},
                "adaspec-meantpot": {"mean_tpot": True}, "adaspec-everystep": {"reuse_plans": False},
                "adaspec-late": {"late_weighted": True}, "adaspec-uniformreuse": {"reuse_ragged": False},
                "adaspec-uniform": {"uniform": True}, "adaspec-steady": {"mean_tpot": True, "steady": True},
                "adaspec-ragged": {"uniform_from": None},
                "adaspec-strict": {"partial_rescue": False, "grid_rescue": False}}

    def __init__(self, cost_model: CostModel | None = None, *, verifier: bool = True,
                 slo_aware: bool = True, acceptance: AcceptanceModel | None = None, name: str = "adaspec",
                 rescue_loss: float = RESCUE_LOSS, tpot_weighted: bool = False,
                 cost_aware_adaptation: bool = True, mean_tpot: bool = False,
                 plan_prior_weight: float | None = None, reuse_plans: bool = True,
                 late_weighted: bool = False, reuse_ragged: bool = True, uniform: bool = False,
                 steady: bool = False, uniform_from: int | None = UNIFORM_FROM,
                 partial_rescue: bool = True, grid_rescue: bool = True):
        if acceptance is None:  # a learned plan weight needs its candidates scored (rank_weight)
            acceptance = AcceptanceModel(rank_weights=RANK_WEIGHTS if plan_prior_weight is None else ())
        super().__init__(cost_model, acceptance)
        self.verifier, self.slo_aware, self.name = verifier, slo_aware, name
        self.rescue_loss = rescue_loss  # efficiency a step may give up for the SLOs (efficiency.choose)
        self.partial_rescue = partial_rescue  # a rescue may save some of the requests, not all
        self.grid_rescue = grid_rescue  # a uniform plan's rescue may take per-request cells
        self.tpot_weighted = tpot_weighted  # tokens valued per request for mean TPOT (efficiency.weighted)
        self.late_weighted = late_weighted  # the same, for requests behind their SLO only
        self._weights: list[float] | None = None
        self.mean_tpot = mean_tpot  # rank candidates by the batch's mean time per token (see _choose)
        self.steady = steady  # ... with each request weighted by its rate so far (see _choose)
        self._rates: list[float] | None = None  # each request's tokens per step so far, relative
        # The plan ranks requests by their look-ahead and drafts for the top m: with a fixed prior
        # weight of 4 it took a short history's luck for a better request on the built-in prompts
        # (AcceptanceModel.rank_weight). None: the weight learned from the look-ahead's errors.
        self.plan_prior_weight = plan_prior_weight
        # None: adapt in every step (the paper's drafter and verifier); else measured per batch size
        self.adaptation = AdaptationValue() if cost_aware_adaptation else None
        # None: plan every step; else a uniform decision may serve the next steps (`replan.py`)
        self.replan = ReplanSchedule() if reuse_plans else None
        self.reuse_ragged = reuse_ragged  # False: reuse only decisions that treat every request alike
        # one depth for all that may draft, drafted without questions, at batches of this size and
        # larger (None: never; uniform=True: always, adaspec-uniform)
        self.uniform_from = 1 if uniform else uniform_from
        self._adapting = True  # this step runs keep_drafting and prune
        self._fixed: list[int] | None = None  # the plan's fixed depths, when it speculates
        self._gain: float | None = None
        self._planned: list[int] = []
        self._prefix_probs: list[list[float]] = []  # P(first j+1 drafts all accepted), per request
        self._prefix_sums: list[float] = []  # sum of each request's prefix probabilities
        self._forwards: tuple = (None, [], [])  # (batch, drafted, predicted time of each draft forward)
        self._slo: SLOState | None = None
        self._unseen: list[list[float]] = []  # look-ahead acceptance per request and position
        self.probe_every = PROBE_EVERY  # plans per probe at most (`_probe`)
        self._since_probe = PROBE_EVERY  # plans since the last probe (the first plan may probe)

    @property
    def uniform(self) -> bool:
        """One depth for all at every batch size (`adaspec-uniform`)."""
        return self.uniform_from == 1

    @classmethod
    def variant(cls, name: str, cost_model: CostModel | None = None) -> AdaSpecPolicy:
        return cls(cost_model, name=name, **cls.VARIANTS[name])

    @classmethod
    def register_variant(cls, spec: str) -> str:
        """Add a variant from `NAME=JSON` (`adaspec-rl20={"rescue_loss": 0.2}`): `make_policy` then
        builds it by name, so a study can weigh a parameter without a code change (`adaspec simulate
        --variant`, `sim_paper_grid.py --variant`). Returns NAME."""
        name, sep, kwargs = spec.partition("=")
        name = name.strip()
        if not sep or not name.startswith("adaspec-"):
            raise ValueError(f"variant must be NAME=JSON with NAME starting 'adaspec-', got {spec!r}")
        try:
            params = json.loads(kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"variant {name!r}: its keyword arguments are not JSON ({e})") from None
        if name in cls.VARIANTS:  # the same again is harmless (a second run in one process)
            if cls.VARIANTS[name] == params:
                return name
            raise ValueError(f"variant {name!r} exists already, as {cls.VARIANTS[name]}")
        if not isinstance(params, dict):
            raise ValueError(f"variant {name!r}: keyword arguments must be a JSON object, got {kwargs!r}")
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                    if k not in ("self", "cost_model", "acceptance", "name")}
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise ValueError(f"variant {name!r}: unknown parameter(s) {unknown}; known: {sorted(defaults)}")
        for key, value in params.items():  # a flag takes true/false, a number a number (None where it may)
            default = defaults[key]
            flag = isinstance(default, bool)
            ok = isinstance(value, bool) if flag else (
                (value is None and default is None)
                or (isinstance(value, int | float) and not isinstance(value, bool)))
            if not ok:
                want = "true or false" if flag else "a number"
                raise ValueError(f"variant {name!r}: {key} must be {want}, got {value!r}")
        cls.VARIANTS[name] = params
        return name

    @classmethod
    def register_variants(cls, specs: list[str]) -> dict[str, dict]:
        """`register_variant` of each spec; {name: keyword arguments}, for the run's report."""
        return {name: cls.VARIANTS[name] for name in map(cls.register_variant, specs)}

    # ------------------------------------------------------------------------------ helpers

    def _update_probs(self, batch: BatchView) -> None:
        """Extend each request's P(first j+1 drafts all accepted) with its new confidences, and
        their running sum (added in order: the value of `sum(ps)`, without summing it anew)."""
        predict_row, sums = self.acceptance.predict_row, self._prefix_sums
        for k, (r, ps) in enumerate(zip(batch.requests, self._prefix_probs, strict=True)):
            if len(ps) < len(r.confidences):
                for p in predict_row(r.request_id, r.confidences[len(ps):], len(ps)):
                    ps.append((ps[-1] if ps else 1.0) * p)
                    sums[k] += ps[-1]

    def _sunk_draft_time(self, batch: BatchView, drafted: list[int]) -> float:
        """Predicted time of the draft forwards run so far: `CostModel.draft_forwards` of the step's
        shape, predicted and summed in order. Draft forward j runs the requests that drafted more
        than j tokens, which change only where a request's draft length crossed j: the forwards
        below the shortest draft that changed are kept from the last call (after each draft forward,
        only the new one is priced and predicted; the cost model changes only at `observe`)."""
        last_batch, last, times = self._forwards
        if last_batch is not batch:
            last, times = [0] * len(drafted), []
        kept = min((min(a, b) for a, b in zip(last, drafted, strict=True) if a != b), default=len(times))
        del times[kept:]
        if len(times) < max(drafted, default=0):
            reqs = batch.requests
            lags, contexts = [r.draft_lag for r in reqs], [r.context_len for r in reqs]
            for j in range(len(times), max(drafted)):
                times.append(self.costs.predict_draft(*self.costs.draft_forward(drafted, lags, contexts, j),
                                                      later=j > 0))
        self._forwards = (batch, drafted, times)
        return sum(times)

    def _record(self, phase: str, T, E, checks: dict[int, float], choice: tuple[int, int]) -> None:
        """Log the choice and, for each depth h, the candidate with the chosen requests (all that
        may draft, if the choice was not to speculate), with the SLO check where one was made."""
        h, m = choice
        width = T.shape[1]
        col = m or width - 1

        def cand(d: int, k: int) -> dict:
            return candidate(f"h={d},m={k}", E[d, k], T[d, k], checks.get(d * width + k), h=d, m=k)

        self.log.add(phase, [cand(d, col if d else 0) for d in range(T.shape[0])], cand(h, m))

    def describe(self) -> dict:
        d = super().describe()
        if self.slo_aware:
            d["rescue_loss"] = self.rescue_loss
            d["partial_rescue"] = self.partial_rescue
            d["grid_rescue"] = self.grid_rescue
        d["tpot_weighted"] = self.tpot_weighted
        d["late_weighted"] = self.late_weighted
        d["mean_tpot"] = self.mean_tpot
        d["steady"] = self.steady
        d["plan_prior_weight"] = self.plan_prior_weight
        d["uniform"] = self.uniform
        d["uniform_from"] = self.uniform_from
        d["adaptation"] = None if self.adaptation is None else self.adaptation.report()
        d["replan"] = None if self.replan is None else self.replan.report()
        return d

    def _choose(self, T, E, tokens_of, uniform: bool = False) -> tuple[int, dict[int, float]]:
        """`efficiency.choose` on this policy's objective. uniform: of a plan's grid only "all that
        may draft, to depth h" (column m = all) and no speculation (row h = 0) may be chosen."""
        if self.mean_tpot and isinstance(tokens_of, CandidateTokens):
            # The goal's metric averages each request's time per token, t / e_i for a step of time t
            # emitting e_i tokens of request i: rank the candidates by B / (t * sum_i 1 / e_i), i.e.
            # tokens counted as B / sum(1 / e_i) (their harmonic mean times B), not sum(e_i). A
            # request's first draft then outweighs another's fourth.
            # steady: a request's 1 / e_i weighted by its rate so far, r_i (tokens per step, relative):
            # sum_i r_i / e_i is, to first order around the current policy, the change in the batch's
            # total remaining lifetime in steps, so the candidates are ranked by sum(r) / (t * sum_i
            # r_i / e_i). Unweighted (mean_tpot alone) it assumes every request runs at the same rate
            # and undervalues the confident requests' deep drafts.
            rows = tokens_of.rows(list(range(int(np.size(E)))))
            r = np.ones(rows.shape[1]) if self._rates is None else np.asarray(self._rates)
            H = r.sum() / (r / np.maximum(rows, 1e-9)).sum(axis=1)
            E = H.tolist() if isinstance(E, list) else H.reshape(np.shape(E))
        full = None
        if uniform:
            h, m = np.indices(np.shape(E))
            full = E if self.grid_rescue else None
            E = np.where((h > 0) & (m < np.shape(E)[1] - 1), 0.0, E)
        return choose(T, E, tokens_of, self._slo, self.slo_aware, self.rescue_loss, self.partial_rescue, full)

    # ------------------------------------------------------------------------------ decisions

    def plan(self, batch: BatchView) -> list[int]:
        started = self.clock()
        self.begin(batch)
        reqs = batch.requests
        self._prefix_probs = [[] for _ in reqs]
        self._prefix_sums = [0] * len(reqs)  # int 0, as sum() starts
        self._forwards = (None, [], [])
        self._fixed, self._adapting, self._gain = None, True, None
        ids = [r.request_id for r in reqs]
        depths = None if self.replan is None else self.replan.reusable(ids)
        if depths is not None:  # the last plan's decision, drafted without questions
            self._adapting = False
            self._planned = fit_limits(batch, depths)
            self.log.add("plan", [], "reused", depths=self._planned)
            return self._planned
        self._slo = SLOState(batch, self.between)
        if self.tpot_weighted:
            self._weights = weighted(reqs)
        elif self.late_weighted and self._slo.active:
            self._weights = late_weighted(reqs, self._slo)
        else:
            self._weights = None
        rel_tpot = weighted(reqs) if self.steady else None  # TPOT so far over the batch's: 1 / rate
        self._rates = None if rel_tpot is None else [1.0 / w for w in rel_tpot]
        self._planned = [0] * len(reqs)
        K = max((r.max_draft for r in reqs), default=0)
        n = len(reqs)
        uniform = self.uniform_from is not None and n >= self.uniform_from
        # Look-ahead acceptances, fixed for the step (+1: keep_drafting may read one past K). The
        # requests are ranked with the prior weight that has erred least (`rank_weight`), and
        # per-request plans are priced with it too: each request's depth rests on its own
        # prediction. One depth for all rests on the batch's sum: priced with the weight whose sums
        # have been least biased (`AcceptanceModel.sum_weight`).
        w = self.plan_prior_weight or self.acceptance.rank_weight()
        wp = (self.plan_prior_weight or self.acceptance.sum_weight()) if uniform else None
        self._unseen = self.acceptance.unseen_table(ids, K + 1, wp)
        ranked = (self._unseen if w == (wp or self.acceptance.unseen_prior_weight)
                  else self.acceptance.unseen_table(ids, K, w))
        priced = self._unseen if uniform else ranked
        cont = [i for i, r in enumerate(reqs) if r.max_draft > 0]
        if not cont:
            self.log.add("plan", [], "no request may draft")
            return self._planned
        T, E, order, tokens_of = continuation_grid(
            self.costs, [r.context_len for r in reqs], [0] * n, [1.0] * n, [1.0] * n, cont,
            [priced[i][:reqs[i].max_draft] for i in cont],
            [min(reqs[i].draft_lag, STEADY_LAG) for i in cont], 0.0, self._weights,
            [ranked[i][0] for i in cont])
        choice, checks = self._choose(T, E, tokens_of, uniform=uniform)
        h, m = divmod(choice, T.shape[1])
        probe = self._probe(reqs, order, h if m else 0, K)
        if probe is not None:
            return self._explore(batch, order, m, h, probe, T, E, checks, started)
        if h and m:
            fixed = [0] * n
            for i in order[:m]:
                fixed[i] = h
            self._fixed = fit_limits(batch, fixed)
            if uniform:
                self._adapting = False
            elif self.adaptation is not None:
                self._adapting = self.adaptation.decide(n)
            if self._adapting:
                for i in order[:m]:
                    self._planned[i] = reqs[i].max_draft
            else:
                self._planned = list(self._fixed)
        self._planned = fit_limits(batch, self._planned)
        self._record("plan", T, E, checks, (h, m))
        if self._fixed is not None:
            self.log.add("mode", [], "adaptive" if self._adapting else "fixed")
        if self.replan is not None:
            last_in = None if m == len(cont) else order[m - 1]  # the lowest-ranked chosen, if some were not
            self._schedule(batch, ranked, last_in, h if m else 0, checks.get(choice, 1.0),
                           self.clock() - started, float(T[h, m]))
        return self._planned

    def _probe(self, reqs, order: list[int], depth: int, K: int) -> int | None:
        """The depth the top-ranked request must draft to test the shallowest look-ahead position
        with too little evidence (`AcceptanceModel.unexplored_position`), if deeper than the plan's
        `depth` for it; None when nothing needs exploring. Without it, early rejections can hold
        the global rate of a position low for good: the plan stops drafting before it, so it is
        never verified again (session 17, c=1: ~240 steps of at most one draft)."""
        self._since_probe += 1
        if self._since_probe < self.probe_every:
            return None
        j = self.acceptance.unexplored_position(K)
        if j is None or not order:
            return None
        want = min(j + 1, reqs[order[0]].max_draft)
        if want <= depth:
            return None
        self._since_probe = 0
        return want

    def _explore(self, batch: BatchView, order: list[int], m: int, h: int, probe: int, T, E, checks,
                 started: float) -> list[int]:
        """The plan's choice, except that its top-ranked request drafts `probe` tokens; fixed mode
        (no per-token questions, no pruning, which would drop the probe), and not reused: the next
        step plans again and explores until the position has its evidence."""
        reqs = batch.requests
        fixed = [0] * len(reqs)
        for i in order[:m]:
            fixed[i] = h
        fixed[order[0]] = probe  # the plan's top-ranked request: the likeliest to reach the position
        self._fixed = self._planned = fit_limits(batch, fixed)
        self._adapting = False
        self._record("plan", T, E, checks, (h, m))
        self.log.add("explore", [], "probe", request=reqs[order[0]].request_id, depth=probe)
        if self.replan is not None:
            self.replan.planned(None, len(reqs), None, self.clock() - started, float(T[h, m]))
        return list(self._planned)

    def _schedule(self, batch: BatchView, ranked, last_in: int | None, h: int, margin: float,
                  plan_time: float, step_time: float) -> None:
        """Tell the replan schedule what this plan cost, what the last decision would have lost
        against this one (both priced alike), and whether this one may be reused (`replan.py`).
        h: the chosen depth (0: no speculation); last_in: the lowest-ranked chosen request when the
        plan left some out (None: all that may draft were chosen); margin: its SLO check;
        step_time: the chosen candidate's predicted step time."""
        ids = [r.request_id for r in batch.requests]
        depths = self._fixed or [0] * len(ids)
        regret, last = None, self.replan.depths(ids)
        if last is not None:  # both priced as the plan sees them (no drafts yet: look-ahead only)
            last = fit_limits(batch, last)
            regret = max(0.0, 1.0 - self._predicted_efficiency(batch, last, last, steady=True)
                         / self._predicted_efficiency(batch, depths, depths, steady=True))
        safe = not (self.slo_aware and self._slo.active) or margin <= -SLO_HEADROOM
        decision = None
        uniform = not h or last_in is None
        if safe and not (self._fixed is not None and self._adapting) and (uniform or self.reuse_ragged):
            newcomer = h  # all chosen: a request that joins drafts too; else if it would rank among them
            if h and last_in is not None and self.acceptance.newcomer_unseen() < ranked[last_in][0]:
                newcomer = 0
            decision = (dict(zip(ids, depths, strict=True)), newcomer)
        self.replan.planned(decision, len(ids), regret, plan_time, step_time)

    def keep_drafting(self, batch: BatchView, active: list[bool]) -> list[bool]:
        """One token of look-ahead: the catch-up cost is sunk now, every further draft step costs the
        same and its token is worth less, so if one more step does not pay, none does."""
        if not self._adapting:
            return active  # the plan's depths, drafted without questions
        self._update_probs(batch)
        cont = [i for i, a in enumerate(active) if a]
        if not cont:
            return active
        reqs, pp = batch.requests, self._prefix_probs
        drafted = [len(r.confidences) for r in reqs]
        T, E, order, tokens_of = next_token_options(
            self.costs, [r.context_len for r in reqs], drafted, [1 + s for s in self._prefix_sums],
            [ps[-1] if ps else 1.0 for ps in pp], cont, [self._unseen[i][drafted[i]] for i in cont],
            self._sunk_draft_time(batch, drafted), self._weights)
        m, checks = self._choose(T, E, tokens_of)
        keep = set(order[:m])
        # the candidates logged, the choice among them (one dict for both)
        logged = {k: candidate(f"m={k}", E[k], T[k], checks.get(k), m=k) for k in sorted({0, m, len(cont)})}
        self.log.add("draft", list(logged.values()), logged[m], drafted=drafted[cont[0]])
        return [a and i in keep for i, a in enumerate(active)]

    def prune(self, batch: BatchView) -> list[int]:
        drafted = [len(r.confidences) for r in batch.requests]
        if not self._adapting:
            return drafted
        self._update_probs(batch)
        if not self.verifier or not any(drafted):
            self._measure_gain(batch, drafted, drafted)
            return drafted
        T, E, removals, tokens_of = prune_sequence(self.costs, [r.context_len for r in batch.requests],
                                                   drafted, self._prefix_probs,
                                                   self._sunk_draft_time(batch, drafted), self._weights)
        r, checks = self._choose(T, E, tokens_of)
        lengths = list(drafted)
        for i in removals[:r]:
            lengths[i] -= 1
        # Explore: verify one token where the calibration has too little evidence to be trusted
        # (a token never verified never corrects a pessimistic prior).
        for i, req in enumerate(batch.requests):
            if drafted[i] and not lengths[i] and self.acceptance.needs_evidence(req.confidences[0]):
                lengths[i] = 1
        logged = {k: candidate(f"drop={k}", E[k], T[k], checks.get(k), drop=k)
                  for k in sorted({0, r, len(removals)})}  # the choice is one of them
        self.log.add("prune", list(logged.values()), logged[r], lengths=lengths)
        self._measure_gain(batch, drafted, lengths)
        return lengths

    # ------------------------------------------------------------------------------ adaptation value

    def _predicted_efficiency(self, batch: BatchView, drafted: list[int], verified: list[int],
                              steady: bool = False) -> float:
        """Expected tokens / predicted step time of a shape: this step's prefix probabilities where
        the drafts exist, look-ahead acceptance beyond them (for the plan's depths not drafted).
        steady: the draft catch-up of steady speculation (STEADY_LAG), as the plan prices it."""
        tokens = 0.0
        for i, (ps, n) in enumerate(zip(self._prefix_probs, verified, strict=True)):
            tokens += 1 + sum(ps[:n])
            p = ps[-1] if ps else 1.0
            for j in range(len(ps), n):
                p *= self._unseen[i][j]
                tokens += p
        reqs = batch.requests
        lags = [min(r.draft_lag, STEADY_LAG) if steady else r.draft_lag for r in reqs]
        shape = StepShape([r.context_len for r in reqs], lags, drafted, verified)
        return tokens / self.costs.predict(shape).total

    def _measure_gain(self, batch: BatchView, drafted: list[int], verified: list[int]) -> None:
        """What adapting added this step: the verified shape's predicted efficiency over the fixed
        plan's, both priced now."""
        if self.adaptation is None or self._fixed is None:
            return
        self._gain = (self._predicted_efficiency(batch, drafted, verified)
                      / self._predicted_efficiency(batch, self._fixed, self._fixed))
        self.log.add("adaptation", [], "gain", gain=round(self._gain, 5))

    def observe(self, outcome: StepOutcome) -> None:
        super().observe(outcome)
        if self.adaptation is not None and self._fixed is not None:
            outside = max(0.0, outcome.step_time - outcome.draft_time - outcome.verify_time)
            self.adaptation.observe(len(outcome.request_ids), self._adapting, outside, outcome.step_time,
                                    self._gain)
        self._fixed, self._gain, self._adapting = None, None, True

    def reset(self) -> None:
        super().reset()
        self._since_probe = self.probe_every
        if self.adaptation is not None:
            self.adaptation.reset()
        if self.replan is not None:
            self.replan.reset()
