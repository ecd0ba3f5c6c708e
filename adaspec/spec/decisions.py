"""Decision log: what a policy saw, considered and chose each step, and what then happened.

One record per decode step, a plain dict (JSON-ready) so it can be plotted, diffed between runs, and
replayed: the batch as the policy saw it at plan time, one entry per decision phase (plan, each
draft step, prune) with the candidates weighed (draft lengths, predicted time and tokens, SLO
violation) and the choice, then the prediction for what ran and the measured outcome.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path


def _r(x: float, digits: int = 6) -> float:
    return round(float(x), digits)


def candidate(label: str, tokens: float, time: float, violation: float | None = None, **extra) -> dict:
    """One option a policy weighed: expected emitted tokens, predicted step time (s), worst
    predicted SLO violation (fraction over budget; <= 0 means every SLO is met)."""
    tokens, time = float(tokens), float(time)
    d = {"label": label, "tokens": round(tokens, 4), "time": round(time, 7),
         "efficiency": round(tokens / time, 3) if time > 0 else None}
    if violation is not None:
        d["violation"] = round(float(violation), 4)
    d.update(extra)
    return d


class DecisionLog:
    def __init__(self, maxlen: int = 20_000):
        self.records: deque[dict] = deque(maxlen=maxlen)
        self._current: dict | None = None
        self.steps = 0

    def begin(self, policy: str, batch) -> None:
        self.steps += 1
        self._current = {
            "step": self.steps, "policy": policy, "now": batch.now, "num_waiting": batch.num_waiting,
            "requests": [{"id": r.request_id, "context": r.context_len, "output": r.output_tokens,
                          "cap": r.max_draft, "lag": r.draft_lag, "tpot_slo": r.tpot_slo,
                          "since_first_token": r.since_first_token, "remaining": r.remaining_tokens}
                         for r in batch.requests],
            "phases": [],
        }

    def add(self, phase: str, candidates: list[dict], choice: dict | str, **extra) -> None:
        if self._current is not None:
            self._current["phases"].append({"phase": phase, "candidates": candidates, "choice": choice,
                                            **extra})

    def finish(self, outcome, predicted: dict | None = None) -> None:
        """Close the step with the prediction for what ran and the measured outcome."""
        if self._current is None:
            return
        rec = self._current
        rec["predicted"] = predicted
        rec["outcome"] = {
            "request_ids": list(outcome.request_ids), "drafted": list(outcome.drafted),
            "accepted": list(outcome.accepted),
            "confidences": [[_r(q, 5) for q in c] for c in outcome.confidences],
            "draft_steps": outcome.draft_steps, "draft_time": outcome.draft_time,
            "verify_time": outcome.verify_time, "step_time": outcome.step_time,
            "emitted": sum(outcome.accepted) + len(outcome.accepted)}
        self.records.append(rec)
        self._current = None

    def clear(self) -> None:
        self.records.clear()
        self._current = None
        self.steps = 0

    def outcomes(self) -> list:
        """Recorded outcomes as objects with request_ids/confidences/accepted (for calibration)."""
        from types import SimpleNamespace

        return [SimpleNamespace(**r["outcome"]) for r in self.records]

    def to_jsonl(self, path: str | Path) -> None:
        with open(path, "w") as f:
            for r in self.records:
                f.write(json.dumps(r) + "\n")

    @staticmethod
    def read_jsonl(path: str | Path) -> list[dict]:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
