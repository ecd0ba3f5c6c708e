"""The engine loop: admit requests, prefill them, then run speculative decode steps.

`_decode_step` is the whole speculative step, top to bottom: the policy plans per-request draft
budgets, the draft proposes token by token (the policy may stop any request early), the policy may
prune, the target verifies every request in one batched forward, rejection sampling keeps a prefix
plus one token, and both caches roll back to what was kept.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import torch

from adaspec.engine.detok import find_stop, flush_text, tokens_through_stop, update_text
from adaspec.engine.runner import ModelRunner, Row
from adaspec.engine.sampling import SamplingParams, probs_from_logits, sample, verify
from adaspec.engine.scheduler import Scheduler
from adaspec.engine.sequence import SLO, Sequence
from adaspec.spec.policy import BatchView, Policy, RequestView, StepOutcome, WaitingView


@dataclass
class StepRecord:
    """Telemetry of one engine step; the cost and acceptance models learn from these."""

    kind: str  # "prefill" or "decode"
    start: float
    batch_size: int
    num_waiting: int
    context_lens: list[int]
    request_ids: list[str] = field(default_factory=list)
    planned: list[int] = field(default_factory=list)  # policy's draft budgets
    drafted: list[int] = field(default_factory=list)  # verified draft tokens per request
    accepted: list[int] = field(default_factory=list)
    confidences: list[list[float]] = field(default_factory=list)
    draft_steps: int = 0
    draft_time: float = 0.0
    verify_time: float = 0.0  # target forward (prefill forward for prefill steps)
    step_time: float = 0.0
    draft_first_time: float = 0.0  # the first draft forward's share of draft_time


def request_view(s: Sequence, K: int, max_model_len: int, now: float) -> RequestView:
    """What a policy sees of one running request at time `now` (shared with the simulator, so
    both apply the same hard caps)."""
    context = len(s.tokens)
    cap = min(K,
              max_model_len - context - 1,  # verified positions must fit the cache
              s.params.max_tokens - s.num_output_tokens - 1)  # no drafting past max_tokens
    return RequestView(
        s.request_id, context, s.num_output_tokens, max(0, cap), context - s.draft_len,
        temperature=s.params.temperature, tpot_slo=s.slo.tpot, ttft_slo=s.slo.ttft,
        since_first_token=None if s.first_token_time is None else now - s.first_token_time,
        drafted_total=s.stats.drafted, accepted_total=s.stats.accepted,
        remaining_tokens=s.params.max_tokens - s.num_output_tokens)


def fit_budget(planned: list[int], max_num_batched_tokens: int) -> list[int]:
    """Trim the longest drafts until sum(k_i + 1) fits the step's token budget."""
    planned = list(planned)
    while planned and sum(planned) + len(planned) > max_num_batched_tokens and max(planned) > 0:
        planned[planned.index(max(planned))] -= 1
    return planned


class LLMEngine:
    def __init__(self, target, draft, tokenizer, policy: Policy, *, num_speculative_tokens: int = 8,
                 max_num_seqs: int = 32, max_model_len: int = 1024,
                 max_num_batched_tokens: int | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", default_slo: SLO | None = None, seed: int = 0,
                 telemetry_size: int = 100_000):
        if policy.uses_draft and draft is None:
            raise ValueError(f"policy {policy.name!r} speculates and needs a draft_model")
        if num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        limit = target.config.max_position_embeddings
        if not 2 <= max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [2, {limit}] for this model, got {max_model_len}")
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.policy = policy
        self.K = num_speculative_tokens
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens or max(max_model_len, 2048)
        self.default_slo = default_slo or SLO()
        eos = target.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.vocab_size = target.config.vocab_size
        self.target = ModelRunner(target, max_num_seqs, max_model_len, dtype, self.device)
        self.draft = ModelRunner(draft, max_num_seqs, max_model_len, dtype, self.device) if draft else None
        self.scheduler = Scheduler(max_num_seqs, max_model_len, self.max_num_batched_tokens)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.telemetry: deque[StepRecord] = deque(maxlen=telemetry_size)
        self._ids = itertools.count()

    # ------------------------------------------------------------------------------ requests

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, slo: SLO | None = None,
                    arrival_time: float | None = None) -> Sequence:
        """Validate and queue a request. Raises ValueError (naming the field) and changes nothing
        when the request is invalid."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be ints in [0, {self.vocab_size})")
        if not ids:
            raise ValueError("prompt must not be empty")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if self.scheduler.find(request_id) is not None:
            raise ValueError(f"request_id {request_id!r} is already in use")
        slo = slo or self.default_slo
        seq = Sequence(request_id, ids, params, slo, arrival_time, self.device)
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its cache slot; False if it is not running or waiting."""
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        self._finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---------------------------------------------------------------------------------- steps

    def step(self) -> list[Sequence]:
        """Run one step; returns the requests that got tokens or finished in it."""
        for seq, old, new in self.scheduler.compact():  # keep the batch on contiguous cache slots
            written = len(seq.tokens) + self.K + 1  # the cache may hold drafts past the tokens
            for runner in (self.target, self.draft) if self.draft else (self.target,):
                runner.move_slot(old, new, written)
        seqs = self.scheduler.schedule_prefill()
        if seqs:
            return self._guarded(self._prefill_step, seqs)
        seqs = list(self.scheduler.running)
        return self._guarded(self._decode_step, seqs) if seqs else []

    def _guarded(self, fn, seqs: list[Sequence]) -> list[Sequence]:
        """A failed forward fails the requests in that batch, not the engine."""
        try:
            return fn(seqs)
        except Exception as exc:  # noqa: BLE001 - reported on each request, the engine goes on
            for s in seqs:
                if not s.finished:
                    s.error = f"{type(exc).__name__}: {exc}"
                    self._finish(s, "error")
            return seqs

    def _prefill_step(self, seqs: list[Sequence]) -> list[Sequence]:
        start = time.perf_counter()
        logits = self.target.run([Row(s.slot, s.tokens, 0, want=1) for s in seqs])
        draft_time = 0.0
        if self.draft is not None and self.policy.uses_draft:
            self.draft.run([Row(s.slot, s.tokens, 0, want=0) for s in seqs])
            draft_time = self.draft.last_time
        now = time.perf_counter()
        for i, s in enumerate(seqs):
            s.target_len = len(s.tokens)
            s.draft_len = len(s.tokens) if draft_time else 0
            s.first_token_time = now
            self._emit(s, [self._sample_one(logits[i], s)])
        self.telemetry.append(StepRecord(
            "prefill", start, len(seqs), self.num_waiting, [s.num_prompt_tokens for s in seqs],
            [s.request_id for s in seqs], draft_time=draft_time, verify_time=self.target.last_time,
            step_time=time.perf_counter() - start))
        return seqs

    def _decode_step(self, seqs: list[Sequence]) -> list[Sequence]:
        start = time.perf_counter()
        views = [self._view(s) for s in seqs]
        batch = BatchView(views, self.K, self.num_waiting, start, self.max_num_batched_tokens,
                          [WaitingView(start - w.arrival_time, w.slo.ttft) for w in self.scheduler.waiting])

        # 1. Plan: per-request draft budgets, clipped to the hard limits.
        planned = self._fit_budget([max(0, min(int(k), v.max_draft))
                                    for k, v in zip(self.policy.plan(batch), views, strict=True)])

        # 2. Draft token by token; the policy may stop any request after each draft step.
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [k > 0 for k in planned]
        draft_steps, draft_time, draft_first = 0, 0.0, 0.0
        while any(active):
            idx = [i for i, a in enumerate(active) if a]
            rows = []
            for i in idx:
                s, d = seqs[i], drafts[i]
                if d:  # feed the previous draft token
                    rows.append(Row(s.slot, [d[-1]], len(s.tokens) - 1 + len(d), want=1))
                else:  # catch the draft cache up to the pending token (>= 1 token)
                    rows.append(Row(s.slot, s.tokens[s.draft_len:], s.draft_len, want=1))
            logits = self.draft.run(rows)
            draft_steps += 1
            draft_time += self.draft.last_time
            draft_first = draft_first or self.draft.last_time
            # Confidence = the draft's own probability of its token (untempered when greedy).
            # Softmax is monotone, so its max is the argmax token's probability: one op fewer than
            # argmax + softmax + gather (~70 us of each draft step at batch 16 on 1 CPU thread,
            # docs/policies.md session 12).
            greedy_conf, greedy_toks = torch.softmax(logits, -1).max(-1)
            greedy_toks, greedy_conf = greedy_toks.tolist(), greedy_conf.tolist()
            sampled = [r for r, i in enumerate(idx) if not seqs[i].params.greedy]
            if sampled:
                probs = probs_from_logits(logits[sampled], [seqs[idx[r]].params for r in sampled])
                row_of = {r: j for j, r in enumerate(sampled)}
            for r, i in enumerate(idx):
                s = seqs[i]
                s.draft_len = rows[r].start + len(rows[r].tokens)
                if s.params.greedy:
                    tok, conf = greedy_toks[r], greedy_conf[r]
                else:  # q (the processed draft distribution) is kept for rejection sampling
                    q = probs[row_of[r]]
                    tok = sample(q, self._gen(s))
                    conf = float(q[tok])
                    qs[i].append(q)
                drafts[i].append(tok)
                views[i].confidences.append(conf)
                active[i] = len(drafts[i]) < planned[i]
            keep = self.policy.keep_drafting(batch, list(active))
            active = [a and bool(k) for a, k in zip(active, keep, strict=True)]

        # 3. Prune: verify only a prefix of each request's draft.
        lengths = [max(0, min(int(n), len(d)))
                   for n, d in zip(self.policy.prune(batch), drafts, strict=True)]

        # 4. Verify all requests in one target forward: pending token + kept drafts.
        rows = [Row(s.slot, [s.tokens[-1]] + drafts[i][:lengths[i]], len(s.tokens) - 1, lengths[i] + 1)
                for i, s in enumerate(seqs)]
        logits = self.target.run(rows)

        # 5. Accept a prefix plus one token per request; roll both caches back to it.
        accepted, offset = [], 0
        argmax = logits.argmax(-1).tolist()
        for i, s in enumerate(seqs):
            n, d = lengths[i], drafts[i][:lengths[i]]
            lg = logits[offset:offset + n + 1]
            target_tokens = argmax[offset:offset + n + 1]
            offset += n + 1
            if s.params.greedy:
                a = 0
                while a < n and d[a] == target_tokens[a]:
                    a += 1
                emitted = d[:a] + [target_tokens[a]]
            else:
                q = torch.stack(qs[i][:n]) if n else None
                a, emitted = verify(d, q, probs_from_logits(lg, [s.params] * (n + 1)), self._gen(s))
            context = len(s.tokens)
            s.target_len = context + a
            s.draft_len = min(s.draft_len, context + a)
            s.stats.record(n, a)
            accepted.append(a)
            self._emit(s, emitted)

        step_time = time.perf_counter() - start
        confidences = [v.confidences[:n] for v, n in zip(views, lengths, strict=True)]
        self.policy.observe(StepOutcome(
            [s.request_id for s in seqs], [v.context_len for v in views], lengths, accepted,
            confidences, draft_steps, draft_time, self.target.last_time, step_time, draft_first))
        self.telemetry.append(StepRecord(
            "decode", start, len(seqs), self.num_waiting, [v.context_len for v in views],
            [s.request_id for s in seqs], planned,
            lengths, accepted, confidences, draft_steps, draft_time, self.target.last_time,
            step_time, draft_first))
        return seqs

    # -------------------------------------------------------------------------------- helpers

    def _view(self, s: Sequence) -> RequestView:
        return request_view(s, self.K, self.max_model_len, time.perf_counter())

    def _fit_budget(self, planned: list[int]) -> list[int]:
        return fit_budget(planned, self.max_num_batched_tokens)

    def _gen(self, s: Sequence) -> torch.Generator:
        return s.generator if s.generator is not None else self.generator

    def _sample_one(self, logits: torch.Tensor, s: Sequence) -> int:
        if s.params.greedy:
            return int(logits.argmax())
        return sample(probs_from_logits(logits[None], [s.params])[0], self._gen(s))

    def _emit(self, s: Sequence, tokens: list[int]) -> None:
        """Append accepted tokens one by one, applying EOS, max_tokens, max_model_len and stop."""
        try:
            reason, committed = None, s.read_offset  # output tokens whose text is already final
            for t in tokens:
                s.tokens.append(t)
                if t in self.eos_ids and not s.params.ignore_eos:
                    reason = "stop"
                elif s.num_output_tokens >= s.params.max_tokens or len(s.tokens) >= self.max_model_len:
                    reason = "length"
                if reason:
                    break
            old_len = len(s.text)
            update_text(self.tokenizer, s)
            if s.params.stop_strings:
                cut = find_stop(s, old_len)
                if cut is not None:
                    s.text = s.text[:cut]
                    keep = tokens_through_stop(self.tokenizer, s, committed)
                    del s.tokens[s.num_prompt_tokens + keep:]
                    s.prefix_offset = s.read_offset = s.num_output_tokens
                    self._finish(s, "stop")
                    return
            if reason:
                flush_text(self.tokenizer, s)
                self._finish(s, reason)
        except Exception as exc:  # noqa: BLE001 - one request's failure must not stop the others
            s.error = f"{type(exc).__name__}: {exc}"
            self._finish(s, "error")

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finish_time = time.perf_counter()
        self.scheduler.finish(s, reason)

    def export_telemetry(self, path) -> None:
        import json

        with open(path, "w") as f:
            for rec in self.telemetry:
                f.write(json.dumps(asdict(rec)) + "\n")
