"""Is the plan worth re-running this step? Measured, like adapting within a step (`adaptation.py`).

AdaSpec's plan weighs every (depth h, top-m requests) candidate with look-ahead acceptance and the
SLO check. On this project's CPUs that costs 0.2-0.8 ms of Python a step, and the Python work also
slows the forwards around it: in session 10, on an Intel host where a batch-16 step takes ~18 ms,
running adaspec's computations alongside static:3's shapes made the step 1.5 ms (8.6%) longer, and
in closed loops most plans chose what the last one had chosen (depth 3 or 4 for every request).

So after a plan that chose a uniform decision (no speculation, or depth h for every request that may
draft), with every request comfortably inside its SLO, the next steps may reuse it without planning:
- when a step does plan, it prices the reused decision on the new grid; the regret is how much less
  efficient that is than the new choice (0 when the choice did not change);
- the cost is the plan's measured time over the predicted step time;
- the interval between plans doubles (up to `MAX_INTERVAL` steps) while the regret stays below the
  cost, and halves when it is more than twice the cost; both are moving averages.
A reused decision is dropped, and the next step plans, when the batch size moves by more than an
eighth (the best depth depends on it), or the last plan was not uniform, chose the adaptive mode,
or had a request near its SLO (`SLO_HEADROOM`).
"""

from __future__ import annotations

MAX_INTERVAL = 8  # steps a decision may serve, counting the step that planned it
DECAY = 0.8  # weight of the past in the regret and cost averages
SLO_HEADROOM = 0.1  # reuse only if every request's predicted time per token is this far under its rate


class ReplanSchedule:
    def __init__(self, max_interval: int = MAX_INTERVAL):
        self.max_interval = max_interval
        self.reset()

    def reset(self) -> None:
        self.interval = 1  # steps per plan
        self.regret: float | None = None  # moving average: efficiency lost to the reused decision
        self.cost: float | None = None  # moving average: plan time / step time
        self._decision: tuple[int, int] | None = None  # (depth, batch size) that may be reused
        self._since = 0  # steps served by the decision since its plan
        self.plans = self.reuses = 0

    @property
    def last_depth(self) -> int | None:
        """The depth of the last uniform decision (to price it on a new plan's grid), else None."""
        return None if self._decision is None else self._decision[0]

    def reusable(self, batch_size: int) -> int | None:
        """The depth to reuse at this step, or None: plan."""
        if self._decision is None or self._since + 1 >= self.interval:
            return None
        depth, size = self._decision
        if abs(batch_size - size) > max(1, size // 8):
            return None
        self._since += 1
        self.reuses += 1
        return depth

    def planned(self, depth: int | None, batch_size: int, regret: float | None, plan_time: float,
                step_time: float) -> None:
        """A plan ran: its uniform depth (None: not reusable), the regret of the last decision on
        its grid (None: nothing to compare), its own time and the predicted step time (seconds)."""
        self.plans += 1
        self._decision = None if depth is None else (depth, batch_size)
        self._since = 0
        cost = plan_time / max(step_time, 1e-6)
        self.cost = cost if self.cost is None else DECAY * self.cost + (1 - DECAY) * cost
        if regret is None:
            return
        self.regret = regret if self.regret is None else DECAY * self.regret + (1 - DECAY) * regret
        if self.regret < self.cost:
            self.interval = min(2 * self.interval, self.max_interval)
        elif self.regret > 2 * self.cost:
            self.interval = max(1, self.interval // 2)

    def report(self) -> dict:
        r = lambda x: None if x is None else round(x, 5)  # noqa: E731
        return {"interval": self.interval, "regret": r(self.regret), "cost": r(self.cost),
                "plans": self.plans, "reuses": self.reuses}
