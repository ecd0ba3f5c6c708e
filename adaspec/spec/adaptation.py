"""Is adapting within a step worth its own time? Measured per batch size, decided per step.

AdaSpec's drafter asks after every draft forward which requests draft one more token, and its
verifier then prunes the drafts. Both use the real draft confidences, so they can only improve the
step's predicted efficiency over the plan's (a fixed depth h for the plan's m requests, priced with
look-ahead acceptance), but they are not free: on this project's CPU at batch 16 the two cost
~2.2 ms of a ~55 ms step, while the decision logs of session 5 showed them raising the predicted
efficiency by 0-3% at batch >= 12. So the policy keeps, per batch-size bucket:
- the gain: predicted efficiency of the shape it verified / that of the fixed plan, both priced at
  the end of drafting with what was learned (the plan's shape uses the real confidences where they
  were drafted, look-ahead acceptance beyond), averaged over recent adaptive steps (a mean, not a
  median: in most steps adapting changes nothing, gain 1, and what it is worth is in the others);
- the cost: median time outside the forwards of adaptive steps minus that of fixed steps (what the
  engine measured, so a simulator that charges nothing for the decisions sees no cost);
and adapts when gain - 1 > cost / step time. Each mode is still tried now and then (every
`explore`-th speculating step of a bucket runs the other one), so both figures stay current.
"""

from __future__ import annotations

import statistics
from collections import deque


def bucket(batch_size: int) -> int:
    """Batch sizes 1 | 2-3 | 4-7 | 8-15 | 16-31 | 32+ share their figures."""
    return min(max(batch_size, 1).bit_length() - 1, 5)


class _Bucket:
    def __init__(self, window: int):
        self.gains: deque[float] = deque(maxlen=window)
        self.outside = {True: deque(maxlen=window), False: deque(maxlen=window)}
        self.steps: deque[float] = deque(maxlen=window)
        self.count = 0  # speculating steps decided here


class AdaptationValue:
    MIN_SAMPLES = 5  # steps of each mode before the rule decides

    def __init__(self, window: int = 50, explore: int = 10):
        self.window, self.explore = window, explore
        self.reset()

    def reset(self) -> None:
        self._buckets: dict[int, _Bucket] = {}

    def _bucket(self, batch_size: int) -> _Bucket:
        return self._buckets.setdefault(bucket(batch_size), _Bucket(self.window))

    def estimate(self, batch_size: int) -> dict | None:
        """The bucket's gain (ratio), cost and step time (seconds), once both modes have samples."""
        b = self._bucket(batch_size)
        if min(len(b.outside[True]), len(b.outside[False]), len(b.gains)) < self.MIN_SAMPLES:
            return None
        return {"gain": sum(b.gains) / len(b.gains), "step": statistics.median(b.steps),
                "cost": statistics.median(b.outside[True]) - statistics.median(b.outside[False])}

    def preferred(self, batch_size: int) -> bool:
        """The rule alone: adapt unless the measured cost exceeds the predicted gain."""
        e = self.estimate(batch_size)
        return e is None or (e["gain"] - 1) * e["step"] > e["cost"]

    def decide(self, batch_size: int) -> bool:
        """Adapt this speculating step? The mode with too few samples first, then the rule, with
        every `explore`-th step running the other mode."""
        b = self._bucket(batch_size)
        b.count += 1
        n_adapt, n_fixed = len(b.outside[True]), len(b.outside[False])
        if min(n_adapt, n_fixed) < self.MIN_SAMPLES:
            return n_adapt <= n_fixed
        rule = self.preferred(batch_size)
        return (not rule) if self.explore and b.count % self.explore == 0 else rule

    def observe(self, batch_size: int, adapted: bool, outside: float, step_time: float,
                gain: float | None) -> None:
        """One speculating step's outcome: its mode, time outside the forwards, step time, and (an
        adaptive step's) predicted gain over the fixed plan."""
        b = self._bucket(batch_size)
        b.outside[adapted].append(outside)
        b.steps.append(step_time)
        if adapted and gain is not None and gain > 0:
            b.gains.append(min(max(gain, 0.5), 2.0))  # one odd step must not decide for 50

    def report(self) -> dict:
        out = {}
        for k, b in sorted(self._buckets.items()):
            lo = 1 << k
            e = self.estimate(lo)
            out[f"batch {lo}+"] = {
                "adaptive_steps": len(b.outside[True]), "fixed_steps": len(b.outside[False]),
                **({key: round(v, 5) for key, v in e.items()} if e else {}), "adapts": self.preferred(lo)}
        return out
