"""The speculation policy interface, and the two simplest policies.

A policy never sees tensors or models. Each decode step the engine (or a simulator, or another
engine's integration) shows it a `BatchView` and asks, in order:

1. `plan(batch)`: how many tokens may each request draft this step (0 = no speculation)?
2. after each draft step, `keep_drafting(batch, active)`: which requests draft one more token? The
   draft probabilities of the tokens drafted so far are in `RequestView.confidences`.
3. `prune(batch)`: how many of each request's drafted tokens go to verification (a prefix)?
4. `observe(outcome)`: what verification accepted and what the step cost.

The caller enforces hard limits (K, max_model_len, max_tokens, token budget) on every answer, so a
policy can never break them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RequestView:
    request_id: str
    context_len: int  # tokens in the request so far (prompt + output)
    output_tokens: int
    max_draft: int  # hard cap on this step's draft length for this request
    draft_lag: int = 1  # tokens the draft must consume before its first proposal (>= 1)
    confidences: list[float] = field(default_factory=list)  # draft probs of this step's drafts
    temperature: float = 0.0
    tpot_slo: float | None = None  # seconds
    ttft_slo: float | None = None
    since_first_token: float | None = None  # seconds since this request's first token
    drafted_total: int = 0  # request history: tokens drafted and accepted on earlier steps
    accepted_total: int = 0
    remaining_tokens: int | None = None  # output tokens left before max_tokens (None: unknown)


@dataclass
class WaitingView:
    """A queued request: how long it has waited (seconds) and its TTFT SLO, if any."""

    waited: float
    ttft_slo: float | None = None


@dataclass
class BatchView:
    requests: list[RequestView]
    num_speculative_tokens: int  # K
    num_waiting: int = 0
    now: float = 0.0
    max_batched_tokens: int | None = None  # cap on sum(k_i + 1) verified this step
    waiting: list[WaitingView] = field(default_factory=list)  # queued requests, in admission order


@dataclass
class StepOutcome:
    """What a decode step did, per request in BatchView order, and what it cost (seconds)."""

    request_ids: list[str]
    context_lens: list[int]
    drafted: list[int]  # tokens verified per request (after pruning)
    accepted: list[int]
    confidences: list[list[float]]  # draft probs of the verified tokens
    draft_steps: int  # batched draft forwards run
    draft_time: float
    verify_time: float
    step_time: float  # wall time of the whole step, overheads included
    draft_first_time: float | None = None  # the first draft forward's share of draft_time (if timed)


def fit_limits(batch: BatchView, lengths: list[int]) -> list[int]:
    """Clip draft budgets to each request's cap, then trim the longest until sum(k_i + 1) fits the
    step's token budget: the same rule the engine applies, so a policy can record what will run."""
    out = [max(0, min(int(k), r.max_draft)) for k, r in zip(lengths, batch.requests, strict=True)]
    budget = batch.max_batched_tokens
    while budget is not None and out and sum(out) + len(out) > budget and max(out) > 0:
        out[out.index(max(out))] -= 1
    return out


class Policy:
    """Base class: no speculation. Subclasses override what they decide."""

    name = "none"
    uses_draft = False  # False: the engine need not keep a draft model's cache at all
    # What a policy times its own work with (adaspec's plan reuse weighs the plan's cost). A
    # simulator sets its own clock, which a decision does not advance (it charges nothing for
    # decisions): there such costs are zero and the runs deterministic.
    clock = staticmethod(time.perf_counter)
    needs_cost_model = False  # True: `cost_model` must be set (build_engine profiles one)
    cost_model = None

    def plan(self, batch: BatchView) -> list[int]:
        return [0] * len(batch.requests)

    def keep_drafting(self, batch: BatchView, active: list[bool]) -> list[bool]:
        return active

    def prune(self, batch: BatchView) -> list[int]:
        return [len(r.confidences) for r in batch.requests]

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def reset(self) -> None:
        """Forget learned state (between benchmark runs)."""

    def describe(self) -> dict:
        return {"name": self.name}


class NoSpec(Policy):
    """Plain decoding: the baseline every speculative policy must beat."""


class StaticK(Policy):
    """Always draft k tokens per request (vLLM's, SGLang's and TensorRT-LLM's default mode)."""

    uses_draft = True

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"policy static:k needs k >= 1, got {k}")
        self.k = k
        self.name = f"static:{k}"

    def plan(self, batch: BatchView) -> list[int]:
        return [min(self.k, r.max_draft) for r in batch.requests]

    def describe(self) -> dict:
        return {"name": self.name, "k": self.k}


POLICY_NAMES = ["none", "static:K", "threshold", "smartspec", "adaspec", "adaspec-drafter",
                "adaspec-noslo", "adaspec-always", "adaspec-tpot", "adaspec-meantpot", "adaspec-everystep",
                "adaspec-late", "adaspec-uniformreuse", "adaspec-uniform", "adaspec-steady", "adaspec-ragged",
                "adaspec-strict"]


def make_policy(spec: str | Policy, num_speculative_tokens: int, cost_model=None) -> Policy:
    """Build a policy from its name as used by the API and the CLI ('none', 'static:3', 'adaspec').

    Policies that predict step times take `cost_model` (a `CostModel`); when it is None the caller
    (`build_engine`) sets `policy.cost_model` from a start-up profile."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"policy must be a name such as {POLICY_NAMES}, got {spec!r}")
    name, _, arg = spec.partition(":")
    if name == "none" and not arg:
        return NoSpec()
    if name == "static":
        try:
            k = int(arg) if arg else num_speculative_tokens
        except ValueError:
            raise ValueError(f"policy 'static:K' needs an integer K, got {spec!r}") from None
        if k > num_speculative_tokens:
            raise ValueError(f"policy {spec!r}: k exceeds num_speculative_tokens={num_speculative_tokens}")
        return StaticK(k)
    if name == "threshold":
        from adaspec.spec.baselines import ThresholdPolicy

        try:
            return ThresholdPolicy(float(arg) if arg else 0.6, cost_model=cost_model)
        except ValueError:
            raise ValueError(f"policy 'threshold[:P]' needs P in (0, 1), got {spec!r}") from None
    if name == "smartspec" and not arg:
        from adaspec.spec.baselines import SmartSpecPolicy

        return SmartSpecPolicy(cost_model)
    if name.startswith("adaspec") and not arg:
        from adaspec.spec.adaspec_policy import AdaSpecPolicy

        if name in AdaSpecPolicy.VARIANTS:
            return AdaSpecPolicy.variant(name, cost_model)
    raise ValueError(f"unknown policy {spec!r}; known: {', '.join(POLICY_NAMES)}")
