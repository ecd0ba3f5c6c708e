"""Sampling parameters, logits processing, and lossless speculative verification.

Verification follows the standard rejection-sampling scheme (Leviathan et al.; Chen et al.): a
drafted token d with draft probability q(d) is kept with probability min(1, p(d) / q(d)); on the
first rejection a replacement is drawn from normalize(max(0, p - q)); if every drafted token is kept
a bonus token is drawn from p. The emitted tokens are then distributed exactly as the target's
samples. At temperature 0 both distributions are one-hot, which reduces to exact greedy matching.
Top-k / top-p are applied identically to draft and target logits, so p and q are the distributions
actually sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """Per-request sampling controls, named as in vLLM."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    max_tokens: int = 16
    stop: list[str] | str | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an int, -1 or 0 to disable, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_strings = stops

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW decode greedily (as vLLM does): dividing logits by a
        temperature such as 1e-80 overflows to inf and the softmax to NaN."""
        return self.temperature < GREEDY_BELOW


def probs_from_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Row i of `logits` [N, V] -> the distribution request params[i] samples from (float32).

    Greedy rows become one-hot on the argmax, so verification treats both modes alike.
    """
    logits = logits.float()
    out = torch.empty_like(logits)
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    if greedy.any():
        g = logits[greedy]
        out[greedy] = torch.zeros_like(g).scatter_(-1, g.argmax(-1, keepdim=True), 1.0)
    if not greedy.all():
        idx = (~greedy).nonzero().squeeze(-1).tolist()
        temps = torch.tensor([params[i].temperature for i in idx], device=logits.device)
        x = logits[idx] / temps[:, None]
        top_k = [params[i].top_k for i in idx]
        top_p = [params[i].top_p for i in idx]
        if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
            x = _filter_top_k_top_p(x, top_k, top_p)
        out[idx] = torch.softmax(x, dim=-1)
    return out


def _filter_top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus (the top token is always kept)."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    v = x.size(-1)
    ks = torch.tensor([k if 0 < k < v else v for k in top_k], device=x.device)
    ranks = torch.arange(v, device=x.device)[None, :]
    drop = ranks >= ks[:, None]
    ps = torch.tensor(top_p, device=x.device)
    probs = torch.softmax(sorted_x.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(-1) - probs
    drop |= (mass_before >= ps[:, None]) & (ranks > 0)  # a top_p below float32's range rounds to 0
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from a 1-D distribution."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def verify(draft_tokens: list[int], q: torch.Tensor, p: torch.Tensor,
           generator: torch.Generator | None) -> tuple[int, list[int]]:
    """Rejection-sample one request's draft. q: [k, V] draft probs, p: [k+1, V] target probs.

    Returns (number of drafted tokens accepted, emitted tokens = accepted prefix + one more).
    """
    k = len(draft_tokens)
    if k:
        d = torch.tensor(draft_tokens, device=p.device)
        ar = torch.arange(k, device=p.device)
        p_d, q_d = p[ar, d], q[ar, d]
        u = torch.rand(k, generator=generator, device=p.device)
        # u < p/q written without division; q_d > 0 because d was drawn from q.
        rejected = (u * q_d >= p_d).nonzero()
        if rejected.numel():
            j = int(rejected[0, 0])
            residual = (p[j] - q[j]).clamp_min(0)
            total = residual.sum()
            # total == 0 only if p == q exactly, where rejection has probability 0; guard anyway.
            fix = sample(residual / total, generator) if total > 0 else sample(p[j], generator)
            return j, draft_tokens[:j] + [fix]
    return k, draft_tokens + [sample(p[k], generator)]
