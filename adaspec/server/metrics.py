"""Prometheus metrics, one registry per app, names following vLLM's with an `adaspec:` prefix.

Everything is fed from the engine thread (`AsyncEngine` observer calls); prometheus_client is
thread-safe, so `/metrics` only renders. Counters appear with the `_total` suffix on the wire.

    adaspec:requests_total{outcome}      stop | length | abort | error (finished in the engine),
                                         rejected_invalid | rejected_auth | rejected_not_found |
                                         rejected_overload | rejected_unavailable (refused at the door)
    adaspec:time_to_first_token_seconds, adaspec:time_per_output_token_seconds (per request:
        (finish - first token) / (tokens - 1)), adaspec:e2e_request_latency_seconds  (histograms)
    adaspec:prompt_tokens_total, adaspec:generation_tokens_total
    adaspec:num_requests_waiting, adaspec:num_requests_running, adaspec:kv_cache_usage_perc
        (fraction of KV slots in use; one slot per running request)
    adaspec:spec_decode_num_drafts_total, _num_draft_tokens_total, _num_accepted_tokens_total,
        _num_accepted_tokens_per_pos_total{position}, _num_draft_tokens_per_pos_total{position}
    adaspec:spec_decode_draft_length     histogram of tokens verified per request per decode step
    adaspec:slo_requests_total{result}   met | missed, over finished requests that carry an SLO
                                         (failed and aborted ones count as missed)
    adaspec:slo_attainment               met / (met + missed); NaN until the first such request
    adaspec:cost_model_prediction_error{stat}  the policy's `cost_model.error_report()` (step-time
        prediction error: mape, median_ape, bias, ..., as adaspec.spec.cost_model reports it), read on
        the engine thread at most every 0.5 s; absent when the policy has no cost model
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

P = "adaspec:"
OUTCOMES = ("stop", "length", "abort", "error", "rejected_invalid", "rejected_auth",
            "rejected_not_found", "rejected_overload", "rejected_unavailable")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0,
               120.0, 240.0, 480.0, 960.0)


class _CostModelError:
    """Custom collector: reports the latest snapshot taken on the engine thread, or nothing."""

    def __init__(self):
        self.stats: dict[str, float] | None = None

    def describe(self):
        return []

    def collect(self):
        stats = self.stats
        if not stats:
            return
        g = GaugeMetricFamily(P + "cost_model_prediction_error",
                              "speculation cost model prediction error, as the policy reports it",
                              labels=["stat"])
        for k, v in stats.items():
            g.add_metric([k], v)
        yield g


def cost_model_stats(policy) -> dict[str, float] | None:
    """`policy.cost_model.error_report()` as {name: float} (numbers only), or None."""
    report = getattr(getattr(policy, "cost_model", None), "error_report", None)
    stats = report() if callable(report) else None
    if not isinstance(stats, Mapping):
        return None
    return {str(k): float(v) for k, v in stats.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class ServerMetrics:
    def __init__(self, num_speculative_tokens: int = 8):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(P + "requests", "requests by outcome", ["outcome"], registry=r)
        for o in OUTCOMES:
            self.requests.labels(o)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "arrival to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds",
                              "per request: (finish - first token) / (output tokens - 1)",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "arrival to finish", buckets=E2E_BUCKETS,
                             registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "output tokens of finished requests",
                                         registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "admitted, not yet running", registry=r)
        self.running = Gauge(P + "num_requests_running", "in the running batch", registry=r)
        self.kv_usage = Gauge(P + "kv_cache_usage_perc", "fraction of KV cache slots in use", registry=r)
        sd = P + "spec_decode_"
        self.num_drafts = Counter(sd + "num_drafts", "request-steps that verified >= 1 draft token",
                                  registry=r)
        self.num_draft_tokens = Counter(sd + "num_draft_tokens", "draft tokens verified", registry=r)
        self.num_accepted = Counter(sd + "num_accepted_tokens", "draft tokens accepted", registry=r)
        self.accepted_pos = Counter(sd + "num_accepted_tokens_per_pos", "accepted draft tokens by position",
                                    ["position"], registry=r)
        self.drafted_pos = Counter(sd + "num_draft_tokens_per_pos", "verified draft tokens by position",
                                   ["position"], registry=r)
        # children looked up once, not a labels() call per drafted token on the engine thread
        self._accepted_at = [self.accepted_pos.labels(str(j)) for j in range(num_speculative_tokens)]
        self._drafted_at = [self.drafted_pos.labels(str(j)) for j in range(num_speculative_tokens)]
        self.draft_len = Histogram(sd + "draft_length", "draft tokens verified per request per decode step",
                                   buckets=tuple(range(num_speculative_tokens + 1)), registry=r)
        self.slo = Counter(P + "slo_requests", "finished requests with an SLO, by result", ["result"],
                           registry=r)
        self.slo.labels("met")
        self.slo.labels("missed")
        self.attainment = Gauge(P + "slo_attainment", "fraction of requests with an SLO that met it",
                                registry=r)
        self.attainment.set(math.nan)
        self._met = self._missed = 0
        self._cost = _CostModelError()
        r.register(self._cost)
        self._cost_read = 0.0

    # ---------------------------------------------------------------- observer interface

    def rejected(self, reason: str) -> None:
        self.requests.labels(f"rejected_{reason}").inc()

    def finished(self, seq, report: dict) -> None:
        self.requests.labels(seq.finish_reason or "error").inc()
        self.prompt_tokens.inc(seq.num_prompt_tokens)
        self.generation_tokens.inc(seq.num_output_tokens)
        if report["measured_ttft_ms"] is not None:
            self.ttft.observe(report["measured_ttft_ms"] / 1e3)
        if report["measured_tpot_ms"] is not None:
            self.tpot.observe(report["measured_tpot_ms"] / 1e3)
        if report["measured_e2e_ms"] is not None:
            self.e2e.observe(report["measured_e2e_ms"] / 1e3)
        if report["met"] is not None:
            self.slo.labels("met" if report["met"] else "missed").inc()
            self._met += bool(report["met"])
            self._missed += not report["met"]
            self.attainment.set(self._met / (self._met + self._missed))

    def step(self, rec) -> None:
        """One decode step's drafts, counted per step (one increment per series, not per token)."""
        if rec.kind != "decode":
            return
        width = max(rec.drafted, default=0)
        drafted, accepted = [0] * width, [0] * width
        rows = 0
        for n, a in zip(rec.drafted, rec.accepted, strict=False):
            self.draft_len.observe(n)
            if n:
                rows += 1
                for j in range(n):
                    drafted[j] += 1
                for j in range(a):
                    accepted[j] += 1
        if not rows:
            return
        self.num_drafts.inc(rows)
        self.num_draft_tokens.inc(sum(drafted))
        self.num_accepted.inc(sum(accepted))
        for j in range(width):
            self._child(self._drafted_at, self.drafted_pos, j).inc(drafted[j])
            if accepted[j]:
                self._child(self._accepted_at, self.accepted_pos, j).inc(accepted[j])

    @staticmethod
    def _child(children: list, counter, j: int):
        """Position j's series (a draft past K, which the engine never makes, gets its own)."""
        while len(children) <= j:
            children.append(counter.labels(str(len(children))))
        return children[j]

    def tick(self, engine, num_queued: int) -> None:
        self.waiting.set(num_queued)
        self.running.set(engine.num_running)
        sch = engine.scheduler
        self.kv_usage.set(1 - len(sch.free_slots) / sch.max_num_seqs)
        now = time.monotonic()
        if now - self._cost_read > 0.5:  # the policy's stats may be costly to compute
            self._cost_read = now
            self._cost.stats = cost_model_stats(engine.policy)
