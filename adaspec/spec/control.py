"""Shared bookkeeping of the policies that learn: step shape, online model updates, decision log.

A `ControlledPolicy` keeps the `BatchView` it planned on (the engine hands the same object to every
call of a step and appends draft confidences to it), so at `observe` it knows exactly which draft
and verify forwards ran. It then corrects the cost model with the measured times, teaches the
acceptance model the verification results, and closes the step's decision record. From the start
times of consecutive decode steps it learns `between`, the time a running request waits between
them beyond the steps themselves, which a TPOT SLO pays for too.
"""

from __future__ import annotations

from adaspec.spec.acceptance import AcceptanceModel, expected_tokens
from adaspec.spec.cost_model import CostModel, StepShape
from adaspec.spec.decisions import DecisionLog
from adaspec.spec.policy import BatchView, Policy, StepOutcome

# Per decode step, the weight of the past in `between` (a moving average over ~20 steps). What a
# running request waits between its decode steps: the policy's own `observe`, the engine loop and
# the server's streaming after each step, and the prefill steps of arriving requests. On the code
# trace a request's life was a median 1.18 times (p90 1.32) the time of its decode steps (session 9).
BETWEEN_DECAY = 0.95


class ControlledPolicy(Policy):
    uses_draft = True

    def __init__(self, cost_model: CostModel | None = None, acceptance: AcceptanceModel | None = None,
                 log_size: int = 2_000):
        self.cost_model = cost_model
        self.acceptance = acceptance or AcceptanceModel()
        self.log = DecisionLog(log_size)
        self._batch: BatchView | None = None
        self.between = 0.0  # seconds a running request waits between decode steps, beyond the steps
        self._last: tuple[float, float, set[str]] | None = None  # last decode step: start, time, requests
        self._gaps = 0  # gaps learned

    @property
    def costs(self) -> CostModel:
        if self.cost_model is None:
            raise RuntimeError(f"policy {self.name!r} needs a cost model: build it with build_engine "
                               "(which profiles one) or pass cost_model=CostModel.load(path)")
        return self.cost_model

    def begin(self, batch: BatchView) -> None:
        """Call first in `plan`: remember the batch, drop finished requests' history, open a record,
        and learn the time since the last decode step beyond that step (`between`)."""
        self._batch = batch
        if self._last is not None:
            start, step_time, ids = self._last
            gap = batch.now - start - step_time
            if gap >= 0 and any(r.request_id in ids for r in batch.requests):  # a request waited it
                w = BETWEEN_DECAY if self._gaps else 0.0
                self.between = w * self.between + (1 - w) * gap
                self._gaps += 1
        self.acceptance.forget_except(r.request_id for r in batch.requests)
        self.log.begin(self.name, batch)

    @staticmethod
    def shape(batch: BatchView, verified: list[int] | None = None) -> StepShape:
        """The step's shape from the batch as drafted so far (verified defaults to all drafted)."""
        drafted = [len(r.confidences) for r in batch.requests]
        return StepShape([r.context_len for r in batch.requests], [r.draft_lag for r in batch.requests],
                         drafted, drafted if verified is None else list(verified))

    def observe(self, outcome: StepOutcome) -> None:
        batch, self._batch = self._batch, None
        ids, confidences = list(outcome.request_ids), [list(c) for c in outcome.confidences]
        # every verified token's predicted acceptance, before the step is learned: the log's expected
        # tokens and the calibration's scores (the policy's own, where it made them while drafting)
        predictions = self.acceptance.predictions(ids, confidences)
        predicted = None
        if batch is not None and [r.request_id for r in batch.requests] == ids:
            predicted = {"tokens": expected_tokens(predictions)}
            if self.cost_model is not None:
                shape = self.shape(batch, outcome.drafted)
                t = self.cost_model.observe(shape, outcome.draft_time, outcome.verify_time, outcome.step_time,
                                            outcome.draft_first_time)
                predicted.update(draft=t.draft, verify=t.verify, overhead=t.overhead, step_time=t.total)
        self.acceptance.observe_step(ids, confidences, list(outcome.accepted), predictions)
        if batch is not None:
            self._last = (batch.now, outcome.step_time, set(ids))
        self.log.finish(outcome, predicted,
                        None if batch is None else [list(r.confidences) for r in batch.requests])

    def reset(self) -> None:
        self.acceptance.reset()
        if self.cost_model is not None:
            self.cost_model.reset()
        self.log.clear()
        self._batch = None
        self.between, self._last, self._gaps = 0.0, None, 0

    def describe(self) -> dict:
        d = {"name": self.name}
        if self.cost_model is not None:
            d["cost_model"] = self.cost_model.error_report()
        d["acceptance"] = self.acceptance.report()
        d["between_ms"] = round(1e3 * self.between, 3)
        return d
