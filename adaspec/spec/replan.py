"""Is the plan worth re-running this step? Measured, like adapting within a step (`adaptation.py`).

AdaSpec's plan weighs every (depth h, top-m requests) candidate with look-ahead acceptance and the
SLO check. On this project's CPUs that costs 0.2-0.8 ms of Python a step, and the Python work also
slows the forwards around it: in session 10, on an Intel host where a batch-16 step takes ~18 ms,
running adaspec's computations alongside static:3's shapes made the step 1.5 ms (8.6%) longer, and
in closed loops most plans chose what the last one had chosen (depth 3 or 4 for all or nearly all
requests).

So after a plan in fixed mode (depth h for the top m requests, or no speculation), with every
request comfortably inside its SLO, the next steps may reuse its depths by request id without
planning; a request that joins gets depth h if the plan would have ranked a request without history
among its top m, else none. When a step does plan, it prices the last decision with its own
predictions: the regret is how much less efficient that is than the new choice (0 when the choice
did not change). The cost is the plan's measured time over the predicted step time. The interval
between plans doubles (up to `MAX_INTERVAL` steps) while the regret stays below the cost, and
halves when it is more than twice the cost; both are moving averages. The next step plans when the
batch size moves by more than an eighth (the best depth depends on it), or the last plan chose the
adaptive mode or had a request near its SLO (`SLO_HEADROOM`).
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
        self._decision: tuple[dict[str, int], int, int] | None = None  # depths by id, newcomers', batch size
        self._since = 0  # steps served by the decision since its plan
        self.plans = self.reuses = 0

    def depths(self, request_ids: list[str]) -> list[int] | None:
        """The last reusable decision applied to these requests (newcomers get its default depth), to
        price it on a new plan's grid; None if there is none."""
        if self._decision is None:
            return None
        by_id, default, _ = self._decision
        return [by_id.get(rid, default) for rid in request_ids]

    def reusable(self, request_ids: list[str]) -> list[int] | None:
        """The depths to reuse at this step, or None: plan."""
        if self._decision is None or self._since + 1 >= self.interval:
            return None
        size = self._decision[2]
        if abs(len(request_ids) - size) > max(1, size // 8):
            return None
        self._since += 1
        self.reuses += 1
        return self.depths(request_ids)

    def planned(self, decision: tuple[dict[str, int], int] | None, batch_size: int, regret: float | None,
                plan_time: float, step_time: float) -> None:
        """A plan ran: its decision (depth by request id and the depth of requests that join later;
        None: not reusable), the regret of the last decision priced with this plan's predictions
        (None: nothing to compare), its own time and the predicted step time (seconds)."""
        self.plans += 1
        self._decision = None if decision is None else (*decision, batch_size)
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
