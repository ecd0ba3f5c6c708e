"""A request as the engine tracks it: tokens, cache positions, stop state, SLO and statistics."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from adaspec.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SLO:
    """Per-request service-level objectives, in seconds (None: not set)."""

    tpot: float | None = None
    ttft: float | None = None

    def __post_init__(self) -> None:
        for name in ("tpot", "ttft"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or v <= 0):
                raise ValueError(f"slo.{name} must be a positive number of seconds, got {v!r}")


@dataclass
class SpecStats:
    """Speculation statistics of one request (vLLM's per-request spec metrics, plus positions)."""

    drafted: int = 0  # draft tokens sent to verification
    accepted: int = 0  # of those, accepted by the target
    steps: int = 0  # decode steps (verification passes), speculative or not
    spec_steps: int = 0  # steps in which at least one token was drafted
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        if drafted:
            self.spec_steps += 1
        for j in range(drafted):
            if j >= len(self.drafted_per_position):
                self.drafted_per_position.append(0)
                self.accepted_per_position.append(0)
            self.drafted_per_position[j] += 1
            self.accepted_per_position[j] += int(j < accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_length(self) -> float:
        """Mean tokens emitted per verification step: 1 + accepted / steps (vLLM's definition)."""
        return 1 + self.accepted / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {
            "drafted": self.drafted, "accepted": self.accepted, "steps": self.steps,
            "spec_steps": self.spec_steps, "acceptance_rate": round(self.acceptance_rate, 4),
            "acceptance_length": round(self.acceptance_length, 4),
            "accepted_per_position": list(self.accepted_per_position),
            "drafted_per_position": list(self.drafted_per_position),
        }


class Sequence:
    """One request. Cache invariant between steps: the target cache holds KV for every token but
    the last (`target_len == len(tokens) - 1`); the draft cache holds a prefix of that
    (`draft_len <= target_len`) and catches up the next time the request drafts, so a step without
    speculation never leaves a hole in the draft's cache."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 slo: SLO | None = None, arrival_time: float | None = None,
                 device: str | torch.device = "cpu"):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.tokens = list(prompt_token_ids)
        self.params = params
        self.slo = slo or SLO()
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.slot: int | None = None
        self.target_len = 0
        self.draft_len = 0
        self.text = ""
        self.prefix_offset = self.read_offset = 0  # incremental detokenization (see detok.py)
        self.stats = SpecStats()
        self.arrival_time = arrival_time if arrival_time is not None else time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def tpot_so_far(self, now: float) -> float | None:
        """Mean time per output token after the first, if at least two tokens exist."""
        if self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (now - self.first_token_time) / (self.num_output_tokens - 1)
