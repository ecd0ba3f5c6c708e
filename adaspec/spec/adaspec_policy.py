"""AdaSpec: adaptive drafter, confidence-prior verifier and SLO-aware choice on one efficiency model.

Per step (see `efficiency.py` for the model and the choice rule):
- plan: weigh every (depth h, top-m requests) candidate with look-ahead acceptance predictions
  against no speculation; skip speculation unless some candidate is predicted to pay. The chosen
  requests may draft up to their cap; how far they go is decided token by token.
- keep_drafting: with the real draft confidences so far, weigh again which requests continue (the
  sunk draft time counts): each request stops on its own (ragged lengths), and the batch stops when
  no request's next token is worth its cost.
- prune (verifier): drop the globally least valuable draft positions, tails first, to the removal
  count with the best predicted efficiency (within SLO), against the device's cost curve.
Ablations: `adaspec-drafter` (no verifier, efficiency only), `adaspec-noslo` (no SLO).
"""

from __future__ import annotations

import numpy as np

from adaspec.spec.acceptance import AcceptanceModel
from adaspec.spec.control import ControlledPolicy
from adaspec.spec.cost_model import CostModel
from adaspec.spec.decisions import candidate
from adaspec.spec.efficiency import SLOState, continuation_grid, pick, prune_sequence
from adaspec.spec.policy import BatchView, fit_limits


class AdaSpecPolicy(ControlledPolicy):
    name = "adaspec"
    needs_cost_model = True
    VARIANTS = {"adaspec": (True, True), "adaspec-noslo": (True, False), "adaspec-drafter": (False, False)}

    def __init__(self, cost_model: CostModel | None = None, *, verifier: bool = True,
                 slo_aware: bool = True, acceptance: AcceptanceModel | None = None, name: str = "adaspec"):
        super().__init__(cost_model, acceptance)
        self.verifier, self.slo_aware, self.name = verifier, slo_aware, name
        self._planned: list[int] = []
        self._probs: list[list[float]] = []  # conditional acceptance of each drafted token
        self._slo: SLOState | None = None

    @classmethod
    def variant(cls, name: str, cost_model: CostModel | None = None) -> AdaSpecPolicy:
        verifier, slo_aware = cls.VARIANTS[name]
        return cls(cost_model, verifier=verifier, slo_aware=slo_aware, name=name)

    # ------------------------------------------------------------------------------ helpers

    def _update_probs(self, batch: BatchView) -> None:
        for r, ps in zip(batch.requests, self._probs, strict=True):
            for j in range(len(ps), len(r.confidences)):
                ps.append(self.acceptance.predict(r.request_id, r.confidences[j], j))

    def _arrays(self, batch: BatchView):
        """Per request: contexts, drafted, expected tokens from the drafts, P(all drafts accepted)."""
        contexts = np.array([r.context_len for r in batch.requests], dtype=float)
        drafted = np.array([len(r.confidences) for r in batch.requests], dtype=float)
        prefix_probs = [np.cumprod(ps).tolist() if ps else [] for ps in self._probs]
        base = np.array([1 + sum(p) for p in prefix_probs])
        prefix = np.array([p[-1] if p else 1.0 for p in prefix_probs])
        return contexts, drafted, base, prefix, prefix_probs

    def _grid(self, batch: BatchView, cont: list[int], horizon: list[int], first_width: list[int],
              sunk: float):
        contexts, drafted, base, prefix, _ = self._arrays(batch)
        H = max(horizon)
        future = np.array([[self.acceptance.predict_unseen(batch.requests[i].request_id, int(drafted[i]) + t)
                            for t in range(H)] for i in cont])
        return continuation_grid(self.costs, self._slo, contexts, drafted, base, prefix, np.array(cont),
                                 future, np.array(horizon), np.array(first_width), sunk)

    def _record(self, phase: str, T, E, V, choice: tuple[int, int], **extra) -> None:
        """Log, for each depth h, its best top-m candidate (by the same rule), and the choice."""
        cands = []
        for h in range(T.shape[0]):
            m = pick(T[h], E[h], V[h], self.slo_aware) if h else 0
            cands.append(candidate(f"h={h},m={m}", E[h, m], T[h, m], V[h, m], h=h, m=m))
        h, m = choice
        self.log.add(phase, cands, candidate(f"h={h},m={m}", E[h, m], T[h, m], V[h, m], h=h, m=m), **extra)

    # ------------------------------------------------------------------------------ decisions

    def plan(self, batch: BatchView) -> list[int]:
        self.begin(batch)
        self._slo = SLOState(batch)
        self._probs = [[] for _ in batch.requests]
        cont = [i for i, r in enumerate(batch.requests) if r.max_draft > 0]
        self._planned = [0] * len(batch.requests)
        if not cont:
            self.log.add("plan", [], "no request may draft")
            return self._planned
        T, E, V, order = self._grid(batch, cont, [batch.requests[i].max_draft for i in cont],
                                    [batch.requests[i].draft_lag for i in cont], 0.0)
        h, m = np.unravel_index(pick(T, E, V, self.slo_aware), T.shape)
        if h and m:
            for i in order[:m]:
                self._planned[i] = batch.requests[i].max_draft
        self._planned = fit_limits(batch, self._planned)
        self._record("plan", T, E, V, (int(h), int(m)))
        return self._planned

    def keep_drafting(self, batch: BatchView, active: list[bool]) -> list[bool]:
        self._update_probs(batch)
        cont = [i for i, a in enumerate(active) if a]
        if not cont:
            return active
        sunk = sum(self.costs.predict_draft(*f) for f in self.costs.draft_forwards(self.shape(batch)))
        horizon = [self._planned[i] - len(batch.requests[i].confidences) for i in cont]
        T, E, V, order = self._grid(batch, cont, horizon, [1] * len(cont), sunk)
        h, m = np.unravel_index(pick(T, E, V, self.slo_aware), T.shape)
        keep = set(order[:m].tolist()) if h else set()
        self._record("draft", T, E, V, (int(h), int(m)), drafted=len(batch.requests[cont[0]].confidences))
        return [a and i in keep for i, a in enumerate(active)]

    def prune(self, batch: BatchView) -> list[int]:
        self._update_probs(batch)
        drafted = [len(r.confidences) for r in batch.requests]
        if not self.verifier or not any(drafted):
            return drafted
        contexts, drafted_arr, _, _, prefix_probs = self._arrays(batch)
        sunk = sum(self.costs.predict_draft(*f) for f in self.costs.draft_forwards(self.shape(batch)))
        T, E, V, removals = prune_sequence(self.costs, self._slo, contexts, drafted_arr, prefix_probs, sunk)
        r = pick(T, E, V, self.slo_aware)
        lengths = list(drafted)
        for i, _ in removals[:r]:
            lengths[i] -= 1
        cands = [candidate(f"drop={k}", E[k], T[k], V[k], drop=k) for k in sorted({0, r, len(removals)})]
        self.log.add("prune", cands, candidate(f"drop={r}", E[r], T[r], V[r], drop=r), lengths=lengths)
        return lengths
