"""The oracle: a policy that knows every request's future acceptance outcomes.

Knowing that request i would accept exactly a_i more draft tokens, drafting k_i <= a_i emits
k_i + 1 tokens for sure and drafting past a_i is pure waste; so per step the oracle weighs the
candidates k_i = min(a_i, h) for every depth h (draft forwards are batched by depth, so a request
that stops early saves little and the deeper ones set the cost) and picks the one with the most
emitted tokens per unit of (true) step time, among those that keep every SLO when any does
(when none does, the most efficient one: perfect knowledge makes throughput the fastest way back).
It is greedy per step, not a plan over the whole run: a bound on throughput and TPOT for a per-step
controller with perfect acceptance knowledge (tested); SLO attainment, a per-request threshold, is
not guaranteed to be maximal (a policy may trade one request's TPOT for another's).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from adaspec.spec.cost_model import CostModel, StepShape
from adaspec.spec.efficiency import SLOState
from adaspec.spec.policy import BatchView, Policy, fit_limits


class OraclePolicy(Policy):
    name = "oracle"
    uses_draft = True
    needs_cost_model = True

    def __init__(self, cost_model: CostModel, lookahead: Callable[[str, int], int], slo_aware: bool = True):
        """lookahead(request_id, cap): how many of the next `cap` draft tokens would be accepted."""
        self.cost_model, self.lookahead, self.slo_aware = cost_model, lookahead, slo_aware
        self._planned: list[int] = []

    def plan(self, batch: BatchView) -> list[int]:
        reqs = batch.requests
        runs = [self.lookahead(r.request_id, r.max_draft) for r in reqs]
        contexts = [r.context_len for r in reqs]
        lags = [r.draft_lag for r in reqs]
        cands, times, tokens = [], [], []
        for h in range(max(runs, default=0) + 1):
            lengths = fit_limits(batch, [min(a, h) for a in runs])
            if cands and lengths == cands[-1]:
                continue
            cands.append(lengths)
            times.append(self.cost_model.predict(StepShape(contexts, lags, lengths, lengths)).total)
            tokens.append([k + 1 for k in lengths])
        t, e = np.asarray(times), np.asarray(tokens, dtype=float)
        eff = e.sum(-1) / np.maximum(t, 1e-12)
        if self.slo_aware:  # the most efficient step that keeps on track every request some step
            feasible = SLOState(batch).worst(t, e) <= 0  # can; if none does, the most efficient
            if feasible.any():
                eff = np.where(feasible, eff, -np.inf)
        self._planned = cands[int(np.argmax(eff))]
        return list(self._planned)

    def prune(self, batch: BatchView) -> list[int]:
        return list(self._planned)

    def describe(self) -> dict:
        return {"name": self.name, "slo_aware": self.slo_aware}
