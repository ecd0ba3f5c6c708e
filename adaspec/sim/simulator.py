"""Discrete-event simulation of the engine: arrivals -> the engine's Scheduler -> prefill / decode
steps whose times come from a cost model and whose acceptances come from pre-drawn outcomes.

The step is the engine's `_decode_step` call for call (plan, draft token by token with
keep_drafting after each draft forward, prune, verify, observe), on the engine's own `Scheduler`,
`Sequence`, `request_view` and `fit_budget`, so admission, the KV-slot budget, hard caps and every
policy are exactly the engine's; only forwards are replaced by the cost model and token matching
by the request's draws. Time advances by each step's modelled duration (plus, for a cost model
fitted from telemetry, the measured gap to the next step); requests arriving during a step join at
the next step boundary, as in the engine. Output: per-request `RequestResult`s
(one streamed chunk per step, at the step's end) that `bench.metrics.summarize` takes as is.
"""

from __future__ import annotations

import bisect
import copy
import time
from dataclasses import dataclass, field

import numpy as np

from adaspec.bench.metrics import RequestResult
from adaspec.bench.workload import BenchRequest
from adaspec.engine.engine import StepRecord, fit_budget, request_view
from adaspec.engine.sampling import SamplingParams
from adaspec.engine.scheduler import Scheduler
from adaspec.engine.sequence import SLO, Sequence
from adaspec.sim.acceptance_sim import AcceptanceSpec, Draws
from adaspec.sim.fitted import FittedCostModel
from adaspec.sim.oracle import OraclePolicy
from adaspec.spec.cost_model import CostModel, StepShape, StepTime
from adaspec.spec.policy import BatchView, Policy, StepOutcome, WaitingView, make_policy


@dataclass
class SimConfig:
    num_speculative_tokens: int = 8
    max_num_seqs: int = 32
    max_model_len: int = 2048  # the paper: prompts <= 1024 tokens, 2048 in total
    max_num_batched_tokens: int | None = None  # None: the engine's default, max(max_model_len, 2048)
    max_prompt_tokens: int | None = 1024
    chars_per_token: float = 4.0  # prompt tokens = characters / this (no tokenizer in a simulation)
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    seed: int = 0
    time_noise: float = 0.0  # CV of a lognormal factor on each step's true time (0: deterministic)
    record_steps: bool = True

    @property
    def token_budget(self) -> int:
        return self.max_num_batched_tokens or max(self.max_model_len, 2048)


@dataclass
class SimResult:
    policy: str
    results: list[RequestResult]
    duration: float
    steps: list[StepRecord] = field(default_factory=list)
    series: dict = field(default_factory=dict)
    wall_s: float = 0.0
    assignment: list[int] | None = None  # replica of each result, when run by a `Cluster`


class Simulator:
    """`truth`: the cost model that times steps. Policies get their own copy of `policy_cost`
    (default: the truth, i.e. a perfect profile), online-corrected as in the engine. `stream`
    separates the step-time noise of replicas that share a config (0: the single-server stream)."""

    def __init__(self, truth: CostModel, acceptance: AcceptanceSpec, config: SimConfig | None = None,
                 policy_cost: CostModel | None = None, stream: int = 0):
        self.truth, self.acceptance, self.stream = truth, acceptance, stream
        self.cfg = config or SimConfig()
        self.policy_cost = policy_cost or truth
        self._draws: dict[str, Draws] = {}
        self._seqs: dict[str, Sequence] = {}

    # ------------------------------------------------------------------------------ policies

    def make_policy(self, spec: str | Policy) -> Policy:
        cm = copy.deepcopy(self.policy_cost)
        cm.window = 20
        cm.reset()
        if spec in ("oracle", "oracle-noslo"):
            return OraclePolicy(cm, self.run_length, slo_aware=spec == "oracle")
        pol = make_policy(spec, self.cfg.num_speculative_tokens, cm)
        if pol.needs_cost_model and pol.cost_model is None:
            pol.cost_model = cm
        if isinstance(cm, FittedCostModel):  # the policy's own time outside the forwards
            cm.use_policy(pol.name)
        pol.clock = lambda: self.now  # decisions cost no simulated time (Policy.clock)
        return pol

    def run_length(self, request_id: str, cap: int) -> int:
        """The future the oracle may see: accepted tokens if `request_id` drafted `cap` now."""
        s = self._seqs[request_id]
        return self._draws[request_id].run_length(s.num_output_tokens, cap)

    # ------------------------------------------------------------------------------ the run

    def _sequence(self, r: BenchRequest) -> Sequence:
        c = self.cfg
        n = max(1, round(len(r.prompt) / c.chars_per_token))
        room = [n, max(1, c.max_model_len - r.max_tokens)]
        if c.max_prompt_tokens:
            room.append(c.max_prompt_tokens)
        slo = SLO(None if c.slo_tpot_ms is None else c.slo_tpot_ms / 1e3,
                  None if c.slo_ttft_ms is None else c.slo_ttft_ms / 1e3)
        params = SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
        return Sequence(str(r.index), [0] * min(room), params, slo, r.arrival)

    def run(self, policy: str | Policy, requests: list[BenchRequest]) -> SimResult:
        self.start(policy)
        for r in sorted(requests, key=lambda r: (r.arrival, r.index)):
            self.advance(r.arrival)
            self.add(r)
        self.advance(float("inf"))
        return self.result()

    # The run in pieces, so that a `Cluster` can interleave several replicas on one clock: a request
    # is routed at its arrival time, which needs every replica advanced to that time first.

    def start(self, policy: str | Policy) -> None:
        """A fresh run: new policy, scheduler and records; the clock waits for the first request."""
        c = self.cfg
        self._wall = time.perf_counter()
        self.policy = self.make_policy(policy)
        self.cost = self.truth.for_policy(self.policy.name) if isinstance(self.truth, FittedCostModel) \
            else self.truth
        self.sched = Scheduler(c.max_num_seqs, c.max_model_len, c.token_budget)
        self.rng = np.random.default_rng([c.seed, 11, *([self.stream] if self.stream else [])])
        self.results: dict[str, RequestResult] = {}
        self._draws, self._seqs, self.steps, self._spec_log = {}, {}, [], []
        self._finish_times: list[float] = []
        self.now = -float("inf")

    def advance(self, t: float) -> None:
        """Run steps until the first step boundary at or after `t` (or until idle). Requests that
        arrive during a step join at the next boundary, as in the engine."""
        while self.now < t and self.sched.has_work():
            self.sched.compact()  # as the engine does (no cache rows to copy here)
            seqs = self.sched.schedule_prefill()
            if seqs:
                self.now = self._prefill(seqs, self.now)
            else:
                self.now = self._decode(list(self.sched.running), self.now)

    def add(self, r: BenchRequest) -> None:
        """Queue a request that has arrived (call `advance(r.arrival)` first); an idle replica's
        clock jumps to the arrival."""
        if not self.sched.has_work():
            self.now = max(self.now, r.arrival)
        self.results[str(r.index)] = RequestResult(r.index, r.arrival, r.arrival, r.category, r.max_tokens)
        self._add(r)

    def outstanding(self, t: float) -> int:
        """Requests added and not finished by time `t` (valid once advanced to `t`)."""
        return len(self.results) - bisect.bisect_right(self._finish_times, t)

    def result(self) -> SimResult:
        results = sorted(self.results.values(), key=lambda r: r.index)
        duration = max((r.sent + r.e2e for r in results if r.e2e is not None), default=0.0)
        return SimResult(self.policy.name, results, duration, self.steps, series(self._spec_log, duration),
                         time.perf_counter() - self._wall)

    def _add(self, r: BenchRequest) -> None:
        s = self._sequence(r)
        self.results[s.request_id].prompt_tokens = s.num_prompt_tokens
        n = r.max_tokens + self.cfg.num_speculative_tokens + 2
        self._draws[s.request_id] = self.acceptance.draw(r.index, r.category, n, self.cfg.seed)
        self._seqs[s.request_id] = s
        self.sched.add(s)

    def _time(self, t: float) -> float:
        cv = self.cfg.time_noise
        if not cv:
            return t
        sigma = np.sqrt(np.log1p(cv * cv))
        return t * float(self.rng.lognormal(-sigma * sigma / 2, sigma))

    def _prefill_time(self, lens: list[int]) -> StepTime:
        """One prefill-first step (the engine's: whole prompts, target then draft, decode waits)."""
        cm, uses_draft = self.cost, self.policy.uses_draft
        if isinstance(cm, FittedCostModel):
            return cm.predict_prefill(lens, uses_draft)
        width = cm._pick(lens)  # a profile of decode forwards, extrapolated to the prompt's width
        draft = cm.predict_draft(len(lens), width, width) if uses_draft else 0.0
        return StepTime(draft, cm.predict_verify(len(lens), width, width), cm.predict_overhead(len(lens), 0))

    def _gap(self, kind: str, batch: int, drafted: int) -> float:
        """Time between this step's end and the next step's start while there is work."""
        return self.cost.predict_gap(kind, batch, drafted) if isinstance(self.cost, FittedCostModel) else 0.0

    def _prefill(self, seqs: list[Sequence], now: float) -> float:
        lens = [s.num_prompt_tokens for s in seqs]
        st = self._prefill_time(lens)
        draft, verify = st.draft, st.verify
        step = self._time(st.total)
        end = now + step
        for s in seqs:
            s.target_len = len(s.tokens)
            s.draft_len = len(s.tokens) if self.policy.uses_draft else 0
            s.first_token_time = end
            self.results[s.request_id].ttft = end - s.arrival_time
            self._emit(s, 1, end)
        if self.cfg.record_steps:
            self.steps.append(StepRecord("prefill", now, len(seqs), len(self.sched.waiting), lens,
                                         [s.request_id for s in seqs], draft_time=draft, verify_time=verify,
                                         step_time=step))
        return end + self._gap("prefill", len(seqs), 0)

    def _decode(self, seqs: list[Sequence], now: float) -> float:
        c, pol = self.cfg, self.policy
        K, budget = c.num_speculative_tokens, c.token_budget
        views = [request_view(s, K, c.max_model_len, now) for s in seqs]
        batch = BatchView(views, K, len(self.sched.waiting), now, budget,
                          [WaitingView(now - w.arrival_time, w.slo.ttft) for w in self.sched.waiting])
        planned = fit_budget([max(0, min(int(k), v.max_draft))
                              for k, v in zip(pol.plan(batch), views, strict=True)], budget)
        draws = [self._draws[s.request_id] for s in seqs]
        outs = [s.num_output_tokens for s in seqs]
        drafted = [0] * len(seqs)
        active = [k > 0 for k in planned]
        draft_steps = 0
        while any(active):
            for i, a in enumerate(active):
                if a:
                    views[i].confidences.append(float(draws[i].conf[outs[i] + drafted[i]]))
                    drafted[i] += 1
                    active[i] = drafted[i] < planned[i]
            draft_steps += 1
            keep = pol.keep_drafting(batch, list(active))
            active = [a and bool(k) for a, k in zip(active, keep, strict=True)]
        lengths = [max(0, min(int(n), d)) for n, d in zip(pol.prune(batch), drafted, strict=True)]
        contexts = [v.context_len for v in views]
        st = self.cost.predict(StepShape(contexts, [v.draft_lag for v in views], drafted, lengths))
        step = self._time(st.total)
        scale = step / st.total if st.total > 0 else 1.0
        end = now + step
        accepted = []
        for i, s in enumerate(seqs):
            a = draws[i].run_length(outs[i], lengths[i])
            context = len(s.tokens)
            if drafted[i]:
                s.draft_len = context + drafted[i] - 1
            s.target_len = context + a
            s.draft_len = min(s.draft_len, context + a)
            s.stats.record(lengths[i], a)
            accepted.append(a)
        ids = [s.request_id for s in seqs]
        confidences = [v.confidences[:n] for v, n in zip(views, lengths, strict=True)]
        pol.observe(StepOutcome(ids, contexts, lengths, accepted, confidences, draft_steps,
                                st.draft * scale, st.verify * scale, step))
        for s, a in zip(seqs, accepted, strict=True):
            self._emit(s, a + 1, end)
        if c.record_steps:
            self.steps.append(StepRecord("decode", now, len(seqs), len(self.sched.waiting), contexts, ids,
                                         planned, lengths, accepted, confidences, draft_steps,
                                         st.draft * scale, st.verify * scale, step))
        self._spec_log.append((end, sum(lengths), len(seqs)))
        return end + self._gap("decode", len(seqs), sum(lengths))

    def _emit(self, s: Sequence, n: int, t: float) -> None:
        """Append up to n tokens; finish at max_tokens or max_model_len (no EOS: ignore_eos)."""
        n = min(n, s.params.max_tokens - s.num_output_tokens, self.cfg.max_model_len - len(s.tokens))
        s.tokens.extend([0] * n)
        res = self.results[s.request_id]
        res.chunk_times.append(t - s.arrival_time)
        res.chunk_tokens.append(float(n))
        if s.num_output_tokens >= s.params.max_tokens or len(s.tokens) >= self.cfg.max_model_len:
            s.finish_time = t
            self._finish_times.append(t)
            self.sched.finish(s, "length")
            res.success, res.finish_reason = True, "length"
            res.output_tokens, res.e2e = s.num_output_tokens, t - s.arrival_time
            res.spec_stats = s.stats.as_dict()
            del self._draws[s.request_id], self._seqs[s.request_id]


def series(spec_log: list[tuple[float, int, int]], duration: float) -> dict:
    """Mean draft tokens per request-step and running requests per time bin (the report's server
    view, which `bench` scrapes from /metrics), from (step end, drafted, batch) per decode step."""
    bin_s = max(1.0, duration / 60)
    n = max(1, int(np.ceil(duration / bin_s)))
    drafted, rows, steps = np.zeros(n), np.zeros(n), np.zeros(n)
    for t, d, b in spec_log:
        k = min(int(t / bin_s), n - 1)
        drafted[k] += d
        rows[k] += b
        steps[k] += 1
    return {"t": [(k + 0.5) * bin_s for k in range(n)],
            "mean_spec_length": [float(d / r) if r else None for d, r in zip(drafted, rows, strict=True)],
            "running": [float(r / s) if s else None for r, s in zip(rows, steps, strict=True)]}
