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


def compact(x):
    """Floats to 6 significant digits (clock readings to the microsecond), recursively: done once
    at export, not in the hot path."""
    if isinstance(x, float):
        return round(x, 6) if abs(x) >= 1 else float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: compact(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [compact(v) for v in x]
    return x


def candidate(label: str, tokens: float, time: float, violation: float | None = None, **extra) -> dict:
    """One option a policy weighed: expected emitted tokens, predicted step time (s), and the SLO
    check of `efficiency.SLOState.worst_cells` where one was made (only candidates that could be
    chosen are checked), over the requests some checked candidate keeps on track (<= 0: all of
    them on track, by that worst margin; > 0: how many of them are predicted off track).
    Kept at full precision (rounding every candidate of every step costs more than the decision
    itself; `compact` rounds at export)."""
    tokens, time = float(tokens), float(time)
    d = {"label": label, "tokens": tokens, "time": time, "efficiency": tokens / time if time > 0 else None}
    if violation is not None:
        d["violation"] = float(violation)
    d.update(extra)
    return d


class DecisionLog:
    def __init__(self, maxlen: int = 2_000):  # a step at batch 32 is ~30 kB
        self.records: deque[dict] = deque(maxlen=maxlen)
        self._current: dict | None = None
        self.steps = 0

    def begin(self, policy: str, batch) -> None:
        self.steps += 1
        self._current = {
            "step": self.steps, "policy": policy, "now": batch.now, "num_waiting": batch.num_waiting,
            "K": batch.num_speculative_tokens, "max_batched_tokens": batch.max_batched_tokens,
            "waiting": [[w.waited, w.ttft_slo] for w in batch.waiting],
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

    def finish(self, outcome, predicted: dict | None = None,
               drafted_confidences: list[list[float]] | None = None) -> None:
        """Close the step with the prediction for what ran, the measured outcome and every drafted
        token's draft probability (pruned ones included, for replay)."""
        if self._current is None:
            return
        rec = self._current
        rec["predicted"] = predicted
        if drafted_confidences is not None:
            rec["drafted_confidences"] = [list(c) for c in drafted_confidences]
        rec["outcome"] = {
            "request_ids": list(outcome.request_ids), "drafted": list(outcome.drafted),
            "accepted": list(outcome.accepted),
            "confidences": [list(c) for c in outcome.confidences],
            "draft_steps": outcome.draft_steps, "draft_time": outcome.draft_time,
            "verify_time": outcome.verify_time, "step_time": outcome.step_time,
            "draft_first_time": outcome.draft_first_time,
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
                f.write(json.dumps(compact(r)) + "\n")

    @staticmethod
    def read_jsonl(path: str | Path) -> list[dict]:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]


def replay(records: list[dict], policy) -> list[dict]:
    """Re-decide recorded steps with another policy (or the same one, to check determinism).

    Each step is rebuilt from the record: the batch as seen at plan time, the recorded draft
    probabilities fed as the policy drafts (it cannot draft past what was recorded), and the
    recorded verification outcome fed to `observe` (what the new choice would have accepted is
    unknown, so the outcome is the recorded one, cut to the new lengths). Returns per step the
    recorded and the replayed plan and verified lengths."""
    from adaspec.spec.policy import BatchView, RequestView, StepOutcome, WaitingView, fit_limits

    out = []
    for rec in records:
        reqs = [RequestView(q["id"], q["context"], q["output"], q["cap"], q["lag"], tpot_slo=q["tpot_slo"],
                            since_first_token=q["since_first_token"], remaining_tokens=q["remaining"])
                for q in rec["requests"]]
        batch = BatchView(reqs, rec["K"], rec["num_waiting"], rec["now"], rec["max_batched_tokens"],
                          [WaitingView(*w) for w in rec["waiting"]])
        recorded = rec.get("drafted_confidences") or rec["outcome"]["confidences"]
        planned = fit_limits(batch, policy.plan(batch))
        active = [0 < k and len(c) > 0 for k, c in zip(planned, recorded, strict=True)]
        while any(active):
            for r, a, c in zip(reqs, active, recorded, strict=True):
                if a:
                    r.confidences.append(c[len(r.confidences)])
            active = [a and len(r.confidences) < min(k, len(c))
                      for a, r, k, c in zip(active, reqs, planned, recorded, strict=True)]
            keep = policy.keep_drafting(batch, list(active))
            active = [a and bool(k) for a, k in zip(active, keep, strict=True)]
        verified = [max(0, min(int(n), len(r.confidences)))
                    for n, r in zip(policy.prune(batch), reqs, strict=True)]
        o = rec["outcome"]
        policy.observe(StepOutcome(
            o["request_ids"], [q["context"] for q in rec["requests"]], verified,
            [min(a, n) for a, n in zip(o["accepted"], verified, strict=True)],
            [r.confidences[:n] for r, n in zip(reqs, verified, strict=True)],
            max((len(r.confidences) for r in reqs), default=0), o["draft_time"], o["verify_time"],
            o["step_time"], o.get("draft_first_time")))
        out.append({"step": rec["step"], "recorded_verified": o["drafted"], "replayed_verified": verified,
                    "replayed_planned": planned})
    return out
