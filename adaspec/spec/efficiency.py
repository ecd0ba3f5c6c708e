"""The efficiency model: expected emitted tokens / predicted step time, and the SLO check.

Candidates are evaluated in bulk with numpy (a planning call weighs every (depth, number of
drafting requests) pair, which in Python loops would cost a noticeable share of a CPU step).
Every evaluator returns arrays of predicted step time T, expected tokens E and worst SLO
violation V over its candidates; `pick` chooses among them:

- efficiency only: the highest E / T;
- SLO-aware: the highest E / T among candidates whose predicted step keeps every running request's
  TPOT within its SLO (and every waiting request's TTFT, when a queue exists); if none does, the
  smallest worst violation.

Ties go to the first candidate, which every evaluator makes the least speculative one.
"""

from __future__ import annotations

import numpy as np

from adaspec.spec.cost_model import CostModel
from adaspec.spec.policy import BatchView


class SLOState:
    """Per-request SLO inputs of one step, as arrays.

    A request's TPOT after a step of time t that emits e tokens is (spent + t) / (done + e), where
    `spent` is the time since its first token and `done` the tokens after its first: slack earned
    earlier absorbs a longer step; a request already behind cannot absorb one. A waiting request
    gets the k-th slot to free up; a running request frees its slot in about remaining / e steps."""

    def __init__(self, batch: BatchView):
        reqs = batch.requests
        self.tpot = np.array([r.tpot_slo or np.inf for r in reqs], dtype=float)
        self.spent = np.array([r.since_first_token or 0.0 for r in reqs], dtype=float)
        self.done = np.array([max(r.output_tokens - 1, 0) for r in reqs], dtype=float)
        self.remaining = np.array([np.inf if r.remaining_tokens is None else r.remaining_tokens
                                   for r in reqs], dtype=float)
        queue = batch.waiting[:len(reqs)]
        self.wait_rank = np.array([k for k, w in enumerate(queue) if w.ttft_slo], dtype=int)
        self.waited = np.array([w.waited for w in queue if w.ttft_slo], dtype=float)
        self.ttft = np.array([w.ttft_slo for w in queue if w.ttft_slo], dtype=float)
        self.active = bool(np.isfinite(self.tpot).any() or len(self.ttft))

    def worst(self, t: np.ndarray, e: np.ndarray) -> np.ndarray:
        """Worst violation per candidate; t: [S] step times, e: [S, B] tokens per request."""
        if not self.active:
            return np.full(np.shape(t), -1.0)
        t = np.asarray(t, dtype=float)[..., None]
        v = ((self.spent + t) / np.maximum(self.done + e, 1e-9) / self.tpot - 1).max(-1)
        if len(self.ttft):
            frees = np.sort(self.remaining / e, axis=-1) * t  # seconds until the k-th slot frees
            wait = frees[..., self.wait_rank]
            vw = np.where(np.isfinite(wait), (self.waited + wait) / self.ttft - 1, -np.inf)
            v = np.maximum(v, vw.max(-1))
        return v


def pick(t: np.ndarray, e: np.ndarray, v: np.ndarray, slo_aware: bool) -> int:
    """Flat index of the chosen candidate (see the module docstring)."""
    eff = (e / t).ravel()
    v = v.ravel()
    if not slo_aware:
        return int(np.argmax(eff))
    feasible = v <= 0
    if feasible.any():
        return int(np.argmax(np.where(feasible, eff, -np.inf)))
    least = v <= v.min() + 1e-9
    return int(np.argmax(np.where(least, eff, -np.inf)))


def _cum_agg(values: np.ndarray, padded: bool) -> np.ndarray:
    """Aggregate over the first m rows, m = 1..M: max for a padded engine, mean for a packing one."""
    if padded:
        return np.maximum.accumulate(values)
    return np.cumsum(values) / np.arange(1, len(values) + 1)


def continuation_grid(cm: CostModel, slo: SLOState, contexts: np.ndarray, drafted: np.ndarray,
                      base_tokens: np.ndarray, prefix: np.ndarray, cont: np.ndarray, future: np.ndarray,
                      horizon: np.ndarray, first_width: np.ndarray, sunk: float):
    """Evaluate "the top m continuing requests draft up to h more tokens" for all h, m.

    Per request [B]: contexts, drafted so far, base_tokens (expected tokens from what is drafted),
    prefix (P(everything drafted so far is accepted)). Per continuing request, indices `cont`:
    future [len(cont), H] look-ahead conditional acceptances, horizon (tokens it may still draft),
    first_width (tokens per row in its next draft forward). sunk: draft time already spent.
    Requests join in order of the value of their next token. Returns (T, E, V, order), arrays
    [H+1, M+1] where row h=0 and column m=0 mean "stop now", and order[r] = request of rank r.
    """
    B, (M, H) = len(contexts), future.shape
    perm = np.argsort(-(prefix[cont] * future[:, 0]), kind="stable")
    order, horizon = cont[perm], horizon[perm]
    f = future[perm] * (np.arange(H)[None, :] < horizon[:, None])
    gain = np.zeros((M, H + 1))
    gain[:, 1:] = np.cumsum(prefix[order, None] * np.cumprod(f, axis=1), axis=1)  # [M, H+1]
    extra_tokens = np.zeros((H + 1, M + 1))
    extra_tokens[:, 1:] = np.cumsum(gain.T, axis=1)
    E = base_tokens.sum() + extra_tokens

    # Draft forwards still to run: forward t holds the top-m rows whose horizon exceeds t.
    in_fwd = (horizon[:, None] > np.arange(H)[None, :]).astype(float)  # [M, H]
    count = np.zeros((H, M + 1))
    count[:, 1:] = np.cumsum(in_fwd.T, axis=1)
    width = np.ones((H, M + 1))
    width[0, 1:] = _cum_agg(first_width[perm].astype(float), cm.padded)
    ctx_next = np.zeros(M + 1)
    ctx_next[1:] = _cum_agg((contexts + drafted)[order].astype(float), cm.padded)
    fwd = cm.predict_draft(count, width, ctx_next[None, :] + np.arange(H)[:, None])  # [H, M+1]
    draft_time = np.zeros((H + 1, M + 1))
    draft_time[1:] = np.cumsum(fwd, axis=0)

    # Verification of everyone: final lengths are drafted + min(h, horizon) for the top m.
    steps = np.minimum(np.arange(H + 1)[:, None], horizon[None, :])  # [H+1, M]
    new_len = drafted[order][None, :] + steps
    total_new = np.zeros((H + 1, M + 1))
    total_new[:, 1:] = np.cumsum(steps, axis=1)
    if cm.padded:
        width_v = np.full((H + 1, M + 1), float(drafted.max()))
        width_v[:, 1:] = np.maximum(width_v[:, 1:], np.maximum.accumulate(new_len, axis=1))
        ctx_top = contexts[order][None, :] + new_len
        ctx_v = np.full((H + 1, M + 1), float((contexts + drafted).max()))
        ctx_v[:, 1:] = np.maximum(ctx_v[:, 1:], np.maximum.accumulate(ctx_top, axis=1))
    else:
        width_v = (drafted.sum() + total_new) / B
        ctx_v = (contexts + drafted).mean() + total_new / B
    verify = cm.predict_verify(B, width_v + 1, ctx_v)
    overhead = cm.predict_overhead(B, drafted.sum() + total_new)
    T = sunk + draft_time + verify + overhead

    if slo.active:  # tokens per request for every candidate: [H+1, M+1, B]
        e = np.broadcast_to(base_tokens, (H + 1, M + 1, B)).copy()
        top = np.arange(M)[None, :] < np.arange(M + 1)[:, None]  # [M+1, M]: row r among top m
        e[:, :, order] += gain.T[:, None, :] * top[None, :, :]
        V = slo.worst(T, e)
    else:
        V = np.full(T.shape, -1.0)
    return T, E, V, order


def prune_sequence(cm: CostModel, slo: SLOState, contexts: np.ndarray, drafted: np.ndarray,
                   prefix_probs: list[list[float]], sunk: float):
    """Evaluate dropping the r globally least valuable draft positions, r = 0..N.

    A position's value is P(it and every position before it are accepted), which never grows along
    a request, so removing in ascending value (ties: later position first) always cuts tails.
    Returns (T, E, V, removals) with arrays [N+1] and removals[r] = (request, position) cut r-th."""
    B = len(contexts)
    removals = sorted(((p, -j, i) for i, ps in enumerate(prefix_probs) for j, p in enumerate(ps)))
    n = len(removals)
    lengths = drafted.astype(int).copy()
    widths, ctxs, totals = np.zeros(n + 1), np.zeros(n + 1), np.zeros(n + 1)
    e = np.zeros((n + 1, B))
    e[0] = 1 + np.array([sum(ps) for ps in prefix_probs])
    for r in range(n + 1):
        if r:
            p, neg_j, i = removals[r - 1]
            lengths[i] -= 1
            assert lengths[i] == -neg_j, "removal must cut a tail"
            e[r] = e[r - 1]
            e[r, i] -= p
        widths[r] = lengths.max() + 1 if cm.padded else lengths.mean() + 1
        ctxs[r] = (contexts + lengths).max() if cm.padded else (contexts + lengths).mean()
        totals[r] = lengths.sum()
    T = sunk + cm.predict_verify(B, widths, ctxs) + cm.predict_overhead(B, drafted.sum())
    E = e.sum(1)
    V = slo.worst(T, e)
    return T, E, V, [(i, -neg_j) for _, neg_j, i in removals]
