"""Baselines the paper compares against, as faithful to their sources as our interface allows.

- `threshold` (Hugging Face assisted generation's confidence threshold): draft step by step up to K
  and stop after the step whose batch-mean draft probability of the chosen tokens falls below the
  threshold (0.6); never turns speculation off.
- `smartspec` (SmartSpec / DSD, Liu et al.): one server-wide acceptance rate alpha (starts at 0.7,
  measured from verification results, reset to 0.65 when it falls below 0.3); a request drafting k
  tokens is expected to emit (1 - alpha^(k+1)) / (1 - alpha); pick the uniform k in 0..K with the
  best expected tokens / predicted step time, where k = 0 wins only if it beats the best k >= 1 by
  10%. No early stop, no pruning.

Both log their decisions; `smartspec` needs a cost model, `threshold` uses one only to log
predicted step times.
"""

from __future__ import annotations

from collections import deque

from adaspec.spec.control import ControlledPolicy
from adaspec.spec.cost_model import CostModel, StepShape
from adaspec.spec.decisions import candidate
from adaspec.spec.policy import BatchView, StepOutcome, fit_limits


class ThresholdPolicy(ControlledPolicy):
    name = "threshold"

    def __init__(self, threshold: float = 0.6, cost_model: CostModel | None = None):
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        super().__init__(cost_model)
        self.threshold = threshold
        self.name = "threshold" if threshold == 0.6 else f"threshold:{threshold:g}"

    def plan(self, batch: BatchView) -> list[int]:
        self.begin(batch)
        planned = fit_limits(batch, [r.max_draft for r in batch.requests])
        self.log.add("plan", [], {"label": "draft up to K", "lengths": planned})
        return planned

    def keep_drafting(self, batch: BatchView, active: list[bool]) -> list[bool]:
        # The requests that drafted in the step just run are those with the most confidences.
        depth = max(len(r.confidences) for r in batch.requests)
        if not depth:
            return active
        last = [r.confidences[-1] for r in batch.requests if len(r.confidences) == depth]
        mean = sum(last) / len(last)
        if mean < self.threshold:
            self.log.add("draft", [], {"label": "stop", "mean_confidence": round(mean, 4)}, drafted=depth)
            return [False] * len(active)
        return active

    def describe(self) -> dict:
        return {**super().describe(), "threshold": self.threshold}


class SmartSpecPolicy(ControlledPolicy):
    name = "smartspec"
    needs_cost_model = True
    INITIAL_ALPHA, RESET_ALPHA, RESET_BELOW, NO_SPEC_MARGIN = 0.7, 0.65, 0.3, 1.1

    def __init__(self, cost_model: CostModel | None = None, window: int = 50):
        super().__init__(cost_model)
        self.window = window
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.alpha = self.INITIAL_ALPHA
        self._recent: deque[tuple[int, int]] = deque(maxlen=self.window)  # (accepted, drafted) per step

    def geometric_tokens(self, k: int) -> float:
        a = self.alpha
        return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)

    def plan(self, batch: BatchView) -> list[int]:
        self.begin(batch)
        reqs = batch.requests
        contexts, lags = [r.context_len for r in reqs], [1] * len(reqs)  # its model has no catch-up
        options = []
        for k in range(batch.num_speculative_tokens + 1):
            lengths = fit_limits(batch, [k] * len(reqs))
            t = self.costs.predict(StepShape(contexts, lags, lengths, lengths)).total
            options.append((sum(self.geometric_tokens(n) for n in lengths) / t, k, lengths, t))
            if k and not any(lengths):
                break
        goodput0 = options[0][0]
        best = max(options[1:], default=options[0], key=lambda o: o[0])  # first (smallest) k on ties
        chosen = options[0] if goodput0 >= self.NO_SPEC_MARGIN * best[0] or not any(best[2]) else best
        self.log.add("plan", [candidate(f"k={k}", g * t, t, k=k) for g, k, _, t in options],
                     candidate(f"k={chosen[1]}", chosen[0] * chosen[3], chosen[3], k=chosen[1]),
                     alpha=round(self.alpha, 4))
        return chosen[2]

    def observe(self, outcome: StepOutcome) -> None:
        super().observe(outcome)
        drafted = sum(outcome.drafted)
        if drafted:
            self._recent.append((sum(outcome.accepted), drafted))
            self.alpha = sum(a for a, _ in self._recent) / sum(d for _, d in self._recent)
            if self.alpha < self.RESET_BELOW:
                self.alpha = self.RESET_ALPHA
                self._recent.clear()

    def describe(self) -> dict:
        return {**super().describe(), "alpha": self.alpha}
