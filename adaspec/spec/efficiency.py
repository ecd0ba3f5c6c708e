"""The efficiency model: expected emitted tokens / predicted step time, and the SLO check.

Expected tokens of a request = 1 + sum over its drafted positions j of P(positions 1..j all
accepted), optionally weighted per request (`weighted`: what its token is worth for mean TPOT);
step time = draft forwards + one verification forward + overhead, from the cost model.
Every evaluator returns arrays of predicted step time T and expected tokens E over its candidates,
and a function giving a candidate's expected tokens per request for the SLO check; `choose` picks:

- efficiency only: the highest E / T;
- SLO-aware: the highest E / T, unless a candidate nearly as efficient (within RESCUE_LOSS) keeps
  on track the requests that it leaves off: running requests for their TPOT SLO over their
  remaining tokens (`SLOState`), waiting ones for their TTFT when a queue exists. A request that no
  such candidate keeps on track is late whatever we choose and does not count. When no candidate
  keeps all of them on track, one that keeps some (and puts no one else over) may still rescue
  those, at a cost of at most their share of the population (`partial`; session 21: without it a
  tight SLO over a batch of mixed acceptance never found a full rescue, and choosing for efficiency
  alone left the confident requests short of the depth that would have kept them on track).
  Measured, in closed-loop overload (concurrency 16): letting a rescue of k requests cost k / B of
  the efficiency (up to 12.5% to save 2 of 16), and drafting first for requests behind their SLO,
  slowed every step and left attainment lower than choosing for efficiency; taking the candidate
  with the fewest requests over their SLO, or the smallest worst violation, whatever it cost, did
  worse still. At a fixed load, more tokens a second is a lower TPOT for the batch as a whole.

Ties go to the first candidate, which every evaluator makes the least speculative one.
"""

from __future__ import annotations

import math
from itertools import compress

import numpy as np

from adaspec.spec.cost_model import CostModel
from adaspec.spec.policy import BatchView


class SLOState:
    """Per-request SLO inputs of one step.

    A request's TPOT is judged over its whole life, not step by step: after `spent` seconds for
    `done` tokens since its first, it may spend `budget = slo * (done + remaining) - spent` on its
    `remaining` tokens, so it keeps its SLO at a steady `rate = budget / remaining` seconds a
    token. A candidate step of time t that emits e tokens for it keeps it on track if t / e <= rate.
    Slack earned earlier lowers the bar, debt raises it, both spread over the request's remaining
    tokens (a request a little behind catches up over its life, not in one step; a request that
    cannot make its SLO at any speed is over for every candidate, so it does not steer the choice).
    Unknown remaining: the rate is the SLO itself. A waiting request gets the k-th slot to free up;
    a running request frees its slot in about remaining / e steps. Every step also costs its
    requests `between` seconds outside it (the policy's estimate of the wait between decode steps:
    prefills of arriving requests, the engine loop), so a candidate's step time counts as t + between:
    without it, on the code trace, requests the rule had kept on track at their decode steps' pace
    still lived a median 18% longer than those steps (docs/policies.md, session 9)."""

    def __init__(self, batch: BatchView, between: float = 0.0):
        reqs = batch.requests
        self.between = between
        inf = math.inf  # plain lists: most steps need a handful of scalar checks
        self._remaining = [inf if r.remaining_tokens is None else float(max(r.remaining_tokens, 1))
                           for r in reqs]
        self._rate = [self.rate(r.tpot_slo, r.since_first_token or 0.0, float(max(r.output_tokens - 1, 0)),
                                rem) for r, rem in zip(reqs, self._remaining, strict=True)]
        queue = batch.waiting[:len(reqs)]
        self._wait_rank = [k for k, w in enumerate(queue) if w.ttft_slo]
        self._waited = [w.waited for w in queue if w.ttft_slo]
        self._ttft = [w.ttft_slo for w in queue if w.ttft_slo]
        self.population = sum(1 for r in reqs if r.tpot_slo) + len(self._ttft)  # requests with an SLO
        self.active = self.population > 0
        self._arrays = None  # numpy copies for `worst`, made on first use (small batches never need them)

    def behind(self, requests) -> list[bool]:
        """Per running request: behind its TPOT SLO (it must from now on run faster than the SLO,
        or it is already lost)."""
        return [bool(r.tpot_slo) and rate < r.tpot_slo for r, rate in zip(requests, self._rate, strict=True)]

    @staticmethod
    def rate(slo: float | None, spent: float, done: float, remaining: float) -> float:
        """Seconds a token the request can afford from now on (inf: no SLO; <= 0: already lost)."""
        if not slo:
            return math.inf
        if math.isinf(remaining):
            return slo
        return (slo * (done + remaining) - spent) / remaining

    def _np(self):
        """Arrays for `worst`: the rates (1 where a request is already lost, so that dividing by
        them is safe), the lost requests (None if none), remaining tokens, the waiting ones'."""
        if self._arrays is None:
            f = lambda v: np.array(v, dtype=float)  # noqa: E731
            rate = f(self._rate)
            on = rate > 0
            self._arrays = (np.where(on, rate, 1.0), None if on.all() else ~on, f(self._remaining),
                            np.array(self._wait_rank, dtype=int), f(self._waited), f(self._ttft))
        return self._arrays

    def excess(self, t: float, e: list[float]) -> list[float]:
        """Per request (running, then waiting with a TTFT SLO): relative excess over its SLO if one
        candidate step of time t emits e[i] tokens for request i (<= 0: on track)."""
        inf = math.inf  # x if x > 1e-9 else 1e-9: the value of max(x, 1e-9), without a call per request
        t = t + self.between
        over = [t / (x if x > 1e-9 else 1e-9) / r - 1 if r > 0 else inf
                for x, r in zip(e, self._rate, strict=True)]
        rank, waited, ttft = self._wait_rank, self._waited, self._ttft
        if ttft:
            frees = [f * t for f in sorted(r / x for r, x in zip(self._remaining, e, strict=True))]
            over += [(w + frees[k]) / sl - 1 if math.isfinite(frees[k]) else -inf
                     for k, w, sl in zip(rank, waited, ttft, strict=True)]
        return over

    def worst_cells(self, t: list[float], e: list[list[float]]) -> list[float]:
        """`worst` over a list of candidates in plain Python, with the same arithmetic (identical
        values): cheaper than numpy for the few candidates of a small batch."""
        if not self.active:
            return [-1.0] * len(t)
        over = [self.excess(ti, ei) for ti, ei in zip(t, e, strict=True)]
        savable = [min(o) <= 0 for o in zip(*over, strict=True)]  # per request: kept on track by some
        out = []
        for o in over:
            kept = list(compress(o, savable))
            if not kept:
                out.append(-1.0)
                continue
            v = max(kept)
            out.append(float(len([x for x in kept if x > 0])) if v > 0 else v)
        return out

    def worst(self, t: np.ndarray, e: np.ndarray) -> np.ndarray:
        """Per candidate (t: [...] step times, e: [..., B] tokens per request), judged only on the
        requests that some candidate keeps on track (one that none can is late whatever we choose,
        and must not steer the choice): when all of those are on track, the worst margin (<= 0;
        -1 if there are none); otherwise how many of them are over their SLO (>= 1)."""
        return self.judge(t, e)[0]

    def judge(self, t: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`worst` per candidate, and from the same excesses which requests each candidate leaves
        off track ([..., requests], only the requests some candidate keeps on track; a partial
        rescue in `choose` needs both)."""
        if not self.active:
            return np.full(np.shape(t), -1.0), np.zeros((*np.shape(t), 0), dtype=bool)
        over = self._savable_excess(t, e)
        if over is None:
            return np.full(np.shape(t), -1.0), np.zeros((*np.shape(t), 0), dtype=bool)
        v = over.max(-1)
        return np.where(v > 0, (over > 0).sum(-1).astype(float), v), over > 0

    def _savable_excess(self, t: np.ndarray, e: np.ndarray) -> np.ndarray | None:
        """`excess` for every candidate, only of the requests that some candidate keeps on track
        (None if there are none)."""
        rate, lost, remaining, wait_rank, waited, ttft = self._np()
        t = np.asarray(t, dtype=float)[..., None] + self.between
        over = t / np.maximum(e, 1e-9) / rate - 1
        if lost is not None:
            over[..., lost] = np.inf
        if len(ttft):
            with np.errstate(divide="ignore", invalid="ignore"):
                frees = np.sort(remaining / e, axis=-1) * t  # seconds until the k-th slot frees
                wait = frees[..., wait_rank]
                vw = np.where(np.isfinite(wait), (waited + wait) / ttft - 1, -np.inf)
            over = np.concatenate([over, vw], axis=-1)
        savable = (over <= 0).reshape(-1, over.shape[-1]).any(0)
        return over[..., savable] if savable.any() else None


RESCUE_LOSS = 0.05  # efficiency a step may give up to keep more requests on track for their SLO
SMALL_SLO = 96  # candidate x request pairs up to which SLO checks run in plain Python
SMALL_CHOICE = 64  # candidates up to which `choose` ranks them in plain Python


def _efficiencies(t, e):
    """Step times and E / T per candidate, read flat: plain lists for a few candidates (numpy's
    per-call cost is most of the time there), arrays for many; the same IEEE divisions either way."""
    if isinstance(t, np.ndarray) and t.size > SMALL_CHOICE:
        t = t.ravel()
        return t, np.asarray(e, dtype=float).ravel() / np.maximum(t, 1e-12)
    t = t.ravel().tolist() if isinstance(t, np.ndarray) else list(t)
    e = e.ravel().tolist() if isinstance(e, np.ndarray) else e
    return t, [x / (y if y > 1e-12 else 1e-12) for x, y in zip(e, t, strict=True)]  # max(y, 1e-12)


def choose(t, e, tokens_of, slo: SLOState, slo_aware: bool, rescue_loss: float = RESCUE_LOSS,
           partial: bool = False, rescue_e=None) -> tuple[int, dict[int, float]]:
    """Index of the chosen candidate (t, e: step times and expected tokens, any shape, read flat;
    tokens_of(i): candidate i's expected tokens per request), and the SLO checks made, by index.

    The most efficient candidate, unless it leaves requests off track that a candidate at most
    `rescue_loss` less efficient keeps on track (and at most k / population less, when it saves k):
    then the most efficient such one. Only candidates within `rescue_loss` of the best can be
    chosen, so only they are checked against the SLOs (the plan weighs ~300 at batch 32).
    partial: a candidate that keeps some of those requests on track, not all, may rescue them too,
    if it puts no request over that the best keeps on track (at most k / population less efficient
    when it saves k, capped at `rescue_loss`); the one that leaves the fewest over, the most
    efficient of those. rescue_e: the candidates' tokens as the rescue judges them, where `e` has
    ruled some out of the efficiency choice (a uniform plan's grid: only one depth for all may be
    chosen for efficiency; every cell may rescue).
    Ties go to the first candidate (argmax, and the index of a list's max, are the first)."""
    t, eff = _efficiencies(t, e)
    small = isinstance(eff, list)
    best = eff.index(max(eff)) if small else int(np.argmax(eff))
    if not (slo_aware and slo.active):
        return best, {}
    tokens = tokens_of(best)
    margin = max(slo.excess(float(t[best]), tokens))
    if margin <= 0:  # every request on track: all are savable, so this is best's whole check
        return best, {best: margin}
    cut = (1 - rescue_loss) * eff[best]
    if rescue_e is not None:  # best stays the efficiency choice; the rescue may take any cell
        best_eff = eff[best]
        t, eff = _efficiencies(t if small else np.asarray(t), rescue_e)
        eff[best] = best_eff
        small = isinstance(eff, list)
    near = [i for i, x in enumerate(eff) if x >= cut] if small else np.flatnonzero(eff >= cut).tolist()
    off = None
    if partial:  # the rescue below reads who is off track: one pass gives both
        v, off = slo.judge(np.asarray(t)[near], _token_rows(tokens_of, near))
        v = v.tolist()
    elif len(near) * len(tokens) > SMALL_SLO:
        v = slo.worst(np.asarray(t)[near], _token_rows(tokens_of, near)).tolist()
    else:
        v = slo.worst_cells([float(t[i]) for i in near], [tokens_of(i) for i in near])
    checks = dict(zip(near, v, strict=True))
    over = checks[best]
    if over <= 0:
        return best, checks
    if off is not None:  # the fewest over, then the most efficient, of those that put no one else over
        mine = off[near.index(best)]
        left = off.sum(1)
        fair = ~(off & ~mine).any(1)
        saved = int(mine.sum()) - left
        rescues = [(n, -eff[i], i) for i, ok, k, n in zip(near, fair, saved, left, strict=True)
                   if ok and k > 0 and eff[i] >= (1 - min(k / slo.population, rescue_loss)) * eff[best]]
        return (min(rescues)[2] if rescues else best), checks
    floor = (1 - min(over / slo.population, rescue_loss)) * eff[best]
    rescues = [i for i in near if checks[i] <= 0 and eff[i] >= floor]
    return (max(rescues, key=eff.__getitem__) if rescues else best), checks


def _token_rows(tokens_of, cells: list[int]) -> np.ndarray:
    """[len(cells), B] expected tokens per request of the given candidates, for `SLOState.worst`:
    all at once from an evaluator's tokens (`CandidateTokens.rows`), else one candidate at a time."""
    if isinstance(tokens_of, CandidateTokens):
        return tokens_of.rows(cells)
    return np.array([tokens_of(i) for i in cells], dtype=float)


class CandidateTokens:
    """An evaluator's tokens_of: `tokens_of(i)`, candidate i's expected tokens per request as a
    list, and `rows(cells)`, many candidates as an array [len(cells), B] with the same values: at
    batch 32 the SLO check weighs dozens of candidates, which cost less built as one array than as
    one list each."""

    def __call__(self, i: int) -> list[float]:
        raise NotImplementedError

    def rows(self, cells: list[int]) -> np.ndarray:
        raise NotImplementedError


class GainedTokens(CandidateTokens):
    """The continuation evaluators': candidate h * width + m adds gains[r][h] to the base tokens of
    each of the top m ranked requests order[r] (one addition per request, so an array computes the
    very same values)."""

    def __init__(self, base: list[float], order: list[int], gains: list[list[float]], width: int):
        self.base, self.order, self.gains, self.width = base, order, gains, width
        self._table = None

    def __call__(self, cell: int) -> list[float]:
        h, m = divmod(cell, self.width)
        e = list(self.base)
        for i, g in zip(self.order[:m], self.gains, strict=False):
            e[i] += g[h]
        return e

    def rows(self, cells: list[int]) -> np.ndarray:
        if self._table is None:  # per depth h, every request's tokens if it is among the top m
            M, depths = len(self.order), len(self.gains[0]) if self.gains else 1
            table, rank = [list(self.base) for _ in range(depths)], [M] * len(self.base)
            for r, (i, g) in enumerate(zip(self.order, self.gains, strict=True)):
                rank[i] = r  # unranked requests keep rank M: never among the top m
                for h in range(depths):
                    table[h][i] += g[h]
            self._table = np.array(self.base, dtype=float), np.array(table), np.array(rank)
        base, table, rank = self._table
        h, m = np.divmod(np.array(cells), self.width)
        return np.where(rank < m[:, None], table[h], base)


class PrunedTokens(CandidateTokens):
    """`prune_sequence`'s: candidate r takes the value of each of the first r removals off its
    request's tokens, in removal order (`rows` walks the removals once, in that order)."""

    def __init__(self, sums: list[float], removals: list[tuple[float, int, int]]):
        self.sums, self.removals = sums, removals

    def __call__(self, r: int) -> list[float]:
        e = list(self.sums)
        for p, _, i in self.removals[:r]:
            e[i] -= p
        return e

    def rows(self, cells: list[int]) -> np.ndarray:
        ranked = sorted(range(len(cells)), key=cells.__getitem__)
        out = np.empty((len(cells), len(self.sums)))
        e, r = list(self.sums), 0
        for n, k in enumerate(ranked):  # fewest removals first: each row is the last plus changes
            changed = set()
            while r < cells[k]:
                p, _, i = self.removals[r]
                e[i] -= p
                r += 1
                changed.add(i)
            if n == 0:
                out[k] = e
            else:
                out[k] = out[ranked[n - 1]]
                for i in changed:
                    out[k, i] = e[i]
        return out


def _gains_small(prefixes: list[float], futures: list[list[float]], horizon: int) -> list[list[float]]:
    """`_gains` transposed ([M][H+1]), in plain Python with the same order of operations."""
    out = []
    for prefix, fu in zip(prefixes, futures, strict=False):
        p, total, row = prefix, 0.0, [0.0]
        for h in range(horizon):
            p *= fu[h] if h < len(fu) else 0.0
            total += p
            row.append(total)
        out.append(row)
    return out


def _gains(prefixes: list[float], futures: list[list[float]], horizon: int) -> np.ndarray:
    """[H+1, M]: expected extra tokens when request r, P(all its drafts accepted) = prefixes[r],
    drafts up to h = 0..horizon more tokens with conditional acceptances futures[r] (0 past its
    end): running products then running sums, accumulated in order."""
    f = np.zeros((len(futures), horizon + 1))
    f[:, 0] = prefixes
    for r, fu in enumerate(futures):
        f[r, 1:len(fu) + 1] = fu
    p = np.multiply.accumulate(f, axis=1)  # p[:, h+1]: P(drafts and h+1 more all accepted)
    p[:, 0] = 0.0
    return np.add.accumulate(p, axis=1).T


def _running(first, values: np.ndarray, op) -> np.ndarray:
    """[H+1, M+1]: `first`, then op accumulated left to right with each column of values [H+1, M]."""
    start = np.full((values.shape[0], 1), first, dtype=values.dtype)
    return op.accumulate(np.concatenate([start, values], axis=1), axis=1)


def weighted(requests, clamp: float = 2.0) -> list[float] | None:
    """What a token of each running request is worth, for the goal's metric, mean TPOT over requests.

    A step of time t that emits e_i tokens for request i changes i's lifetime by about
    t - e_i * tau_i, tau_i its time per token from now on; summed over the batch, B * t - sum(tau_i *
    e_i). So to minimise the mean TPOT, a token of request i is worth tau_i, estimated by its TPOT so
    far, relative to the batch's mean (clamped to [1/clamp, clamp]; 1 until a request has two
    intervals). Unweighted tokens per second would favour the requests whose drafts are accepted,
    and leave the others (one token a step, each as long as the others' drafts make it) with the
    longest TPOTs; measured in session 5: lowest median TPOT of all policies, highest P99. None when
    every weight is 1."""
    tau = [r.since_first_token / (r.output_tokens - 1) if r.since_first_token and r.output_tokens >= 3
           else None for r in requests]
    known = [x for x in tau if x]
    if len(known) < 2:
        return None
    mean = sum(known) / len(known)
    w = [1.0 if x is None else min(clamp, max(1 / clamp, x / mean)) for x in tau]
    return None if all(x == 1.0 for x in w) else w


def late_weighted(requests, slo: SLOState, clamp: float = 2.0) -> list[float] | None:
    """`weighted` for the requests behind their TPOT SLO only, never below 1; the others' tokens
    count 1. The SLO rule stops steering for a request no candidate can keep on track, and the
    efficiency then leaves it without drafts if its acceptance is low: one token a step, each step
    as long as the others' drafts make it. Measured on the conversation trace (session 10): the
    ten slowest requests of `adaspec` made its whole mean-TPOT gap to static:3, while its median
    request was 3% faster. None when every weight is 1."""
    w = weighted(requests, clamp)
    if w is None:
        return None
    out = [max(1.0, x) if late else 1.0 for x, late in zip(w, slo.behind(requests), strict=True)]
    return None if all(x == 1.0 for x in out) else out


SMALL_GRID = 24  # cells (M x H) up to which plain Python beats numpy's per-call cost
SMALL_PRUNE = 24  # draft positions up to which `prune_sequence` runs in plain Python


def continuation_grid(cm: CostModel, contexts: list[int], drafted: list[int], base_tokens: list[float],
                      prefix: list[float], cont: list[int], future: list[list[float]],
                      first_width: list[int], sunk: float, weights: list[float] | None = None,
                      rank_by: list[float] | None = None):
    """Evaluate "the top m requests of `cont` draft up to h more tokens" for every h and m.

    Per request (all B): contexts, drafted so far, base_tokens (expected tokens from its drafts),
    prefix (P(all its drafts accepted)). Per continuing request cont[k]: future[k], look-ahead
    conditional acceptances of the tokens it may still draft (its length is the horizon), and
    first_width[k], its tokens in the next draft forward (its lag at plan time, else 1). sunk: draft
    time already spent. weights: what a token of each request is worth (see `weighted`; None: 1).
    Requests join in order of the (weighted) value of their next token, its acceptance taken from
    rank_by[k] where given (a look-ahead that ranks better than `future`, which sums better).

    Small grids (every draft step at small batches) run cell by cell in plain Python, large ones as
    whole-grid numpy; both accumulate every sum in the same order, so they give identical values.
    Returns (T, E, order, tokens_of): arrays [H+1, M+1] (row h=0 and column m=0 meaning "stop
    now"), the ranked requests, and tokens_of(flat cell index) for the SLO check."""
    M, H = len(cont), max(len(f) for f in future)
    w = weights or [1.0] * len(contexts)
    first = [f[0] for f in future] if rank_by is None else rank_by
    rank = sorted(range(M), key=lambda k: -w[cont[k]] * prefix[cont[k]] * first[k])
    order = [cont[k] for k in rank]
    horizons, widths = [len(future[k]) for k in rank], [first_width[k] for k in rank]
    if M * H <= SMALL_GRID:
        gains = _gains_small([prefix[cont[k]] for k in rank], [future[k] for k in rank], H)  # [M][H+1]
        T, E = _cell_times(cm, contexts, drafted, base_tokens, order, gains, horizons, widths, sunk)
        T, E = np.array(T), np.array(E)
    else:
        gain = _gains([prefix[cont[k]] for k in rank], [future[k] for k in rank], H)  # [H+1, M]
        T, E = _grid_times(cm, contexts, drafted, base_tokens, order, gain, horizons, widths, sunk)
        gains = gain.T.tolist()
    tokens_of = GainedTokens(base_tokens, order, gains, M + 1)
    if weights is not None:
        E = tokens_of.rows(list(range(E.size))) @ np.asarray(weights, dtype=float)
        E = E.reshape(H + 1, M + 1)
    return T, E, order, tokens_of


def next_token_options(cm: CostModel, contexts: list[int], drafted: list[int], base_tokens: list[float],
                       prefix: list[float], cont: list[int], next_acc: list[float], sunk: float,
                       weights: list[float] | None = None):
    """`continuation_grid`'s h=1 row, as plain lists over m = 0..M: "the top m requests of `cont`
    draft one more token" (the drafter's question after every draft forward, so kept lean: only
    this row's cells, see `_next_token_times`; same values as the grid). next_acc[k]: look-ahead
    acceptance of cont[k]'s next token."""
    M = len(cont)
    w = weights or [1.0] * len(contexts)
    rank = sorted(range(M), key=lambda k: -w[cont[k]] * prefix[cont[k]] * next_acc[k])
    order = [cont[k] for k in rank]
    gains = [prefix[cont[k]] * next_acc[k] for k in rank]
    T, E = _next_token_times(cm, contexts, drafted, base_tokens, order, gains, sunk)
    if weights is not None:  # the same running sum, each token at its request's worth
        total = sum(x * y for x, y in zip(weights, base_tokens, strict=True))
        E = [total]
        for i, g in zip(order, gains, strict=True):
            total += weights[i] * g
            E.append(total)
    return T, E, order, GainedTokens(base_tokens, order, [[g] for g in gains], M + 1)  # cell m: h=0, m


def _next_token_times(cm: CostModel, contexts: list[int], drafted: list[int], base_tokens: list[float],
                      order: list[int], gains: list[float], sunk: float) -> tuple[list[float], list[float]]:
    """`_cell_times`' h=1 row alone, with its arithmetic: the top m requests (rank order) each draft
    one token in one forward of m rows."""
    B = len(contexts)
    ends = [c + d for c, d in zip(contexts, drafted, strict=True)]
    all_contexts, tokens, new_tokens = sum(contexts), sum(base_tokens), sum(drafted)
    longest, verify_ctx, ctx_max, ctx_sum = max(drafted), max(ends), 0, 0
    draft, T, E = 0.0, [], []
    for m in range(len(order) + 1):
        if m:
            i = order[m - 1]
            tokens += gains[m - 1]
            new_tokens += 1
            longest, verify_ctx = max(longest, drafted[i] + 1), max(verify_ctx, ends[i] + 1)
            ctx_max, ctx_sum = max(ctx_max, ends[i]), ctx_sum + ends[i]
            draft = cm.draft_time(m, 1, 1.0, ctx_max, ctx_sum / m, later=True)  # m widths of 1
        verify = cm.verify_time(B, new_tokens, longest, verify_ctx, all_contexts + new_tokens)
        T.append(sunk + draft + verify + cm.predict_overhead(B, new_tokens, longest))
        E.append(tokens)
    return T, E


def _grid_times(cm: CostModel, contexts: list[int], drafted: list[int], base_tokens: list[float],
                order: list[int], gain: np.ndarray, horizons: list[int], widths: list[int],
                sunk: float):
    """Step time T and tokens E [H+1, M+1] of `continuation_grid`, whole-grid numpy (requests in
    rank order: order, gain [H+1, M], horizons, first-forward widths)."""
    B, H = len(contexts), gain.shape[0] - 1
    ends = [c + d for c, d in zip(contexts, drafted, strict=True)]
    horizon = np.array(horizons)
    steps = np.minimum(np.arange(H + 1)[:, None], horizon[None, :])  # [H+1, M]: rank r drafts at depth h
    E = _running(sum(base_tokens), gain, np.add)
    longest = _running(max(drafted), np.array([drafted[i] for i in order]) + steps, np.maximum)
    order_ends = np.array([ends[i] for i in order])
    verify_ctx = _running(max(ends), order_ends + steps, np.maximum)
    new_tokens = _running(sum(drafted), steps, np.add)
    verify = cm.verify_time(B, new_tokens, longest, verify_ctx, sum(contexts) + new_tokens, grid=True)
    draft = _draft_times(cm, horizon, np.array(widths), order_ends, H)
    return sunk + draft + verify + cm.predict_overhead(B, new_tokens, longest), E


def _cell_times(cm: CostModel, contexts: list[int], drafted: list[int], base_tokens: list[float],
                order: list[int], gains: list[list[float]], horizons: list[int], widths: list[int],
                sunk: float):
    """`_grid_times` cell by cell with running sums (a cell costs a few scalar predictions); gains
    per rank ([M][H+1], from `_gains_small`). Returns plain lists [H+1][M+1]."""
    B, M, H = len(contexts), len(order), len(gains[0]) - 1 if gains else 0
    ends = [c + d for c, d in zip(contexts, drafted, strict=True)]
    all_contexts = sum(contexts)
    T = [[0.0] * (M + 1) for _ in range(H + 1)]
    E = [[0.0] * (M + 1) for _ in range(H + 1)]
    tokens = [sum(base_tokens)] * (H + 1)
    rows_in = [0] * H  # rows in draft forward t
    width_max = width_sum = ctx_max = ctx_sum = 0  # continuing rows: first-forward width, context
    longest = [max(drafted)] * (H + 1)  # per h: the longest draft after the step
    verify_ctx = [max(ends)] * (H + 1)
    new_tokens = [sum(drafted)] * (H + 1)
    for m in range(M + 1):
        if m:
            i, horizon = order[m - 1], horizons[m - 1]
            width_max, width_sum = max(width_max, widths[m - 1]), width_sum + widths[m - 1]
            ctx_max, ctx_sum = max(ctx_max, ends[i]), ctx_sum + ends[i]
            for h in range(H + 1):
                steps = min(h, horizon)
                tokens[h] += gains[m - 1][h]
                longest[h] = max(longest[h], drafted[i] + steps)
                verify_ctx[h] = max(verify_ctx[h], ends[i] + steps)
                new_tokens[h] += steps
            for t in range(horizon):
                rows_in[t] += 1
        draft = 0.0
        for h in range(H + 1):
            if h == 1 and m:  # the first draft forward catches up the lags (widths)
                draft += cm.draft_time(rows_in[0], width_max, width_sum / m, ctx_max, ctx_sum / m)
            elif h and m:  # draft forward t = h-1: one token a row
                t = h - 1
                draft += cm.draft_time(rows_in[t], 1, 1, ctx_max + t, ctx_sum / m + t, later=True)
            verify = cm.verify_time(B, new_tokens[h], longest[h], verify_ctx[h], all_contexts + new_tokens[h])
            T[h][m] = sunk + draft + verify + cm.predict_overhead(B, new_tokens[h], longest[h])
            E[h][m] = tokens[h]
    return T, E


def _draft_times(cm: CostModel, horizon: np.ndarray, width: np.ndarray, ends: np.ndarray, H: int):
    """[H+1, M+1] draft time of the top m ranked requests drafting up to h tokens: draft forward t
    runs the rows whose horizon exceeds t, the first one at the rows' first-forward widths."""
    M = len(horizon)
    t = np.arange(H)[:, None]
    rows = np.cumsum(horizon[None, :] > t, axis=1)  # [H, M]: rows in forward t among the top m
    m = np.arange(1, M + 1)
    first_max, first_mean = np.maximum.accumulate(width), np.cumsum(width) / m
    ctx_max, ctx_mean = np.maximum.accumulate(ends), np.cumsum(ends) / m
    per_forward = cm.draft_time(rows, np.where(t == 0, first_max[None, :], 1),  # [H, M]
                                np.where(t == 0, first_mean[None, :], 1), ctx_max[None, :] + t,
                                ctx_mean[None, :] + t, grid=True, later=t > 0)
    draft = np.zeros((H + 1, M + 1))
    draft[1:, 1:] = np.cumsum(per_forward, axis=0)
    return draft


def prune_sequence(cm: CostModel, contexts: list[int], drafted: list[int], prefix_probs: list[list[float]],
                   sunk: float, weights: list[float] | None = None):
    """Evaluate dropping the r globally least valuable draft positions, r = 0..N.

    A position's value is P(it and every position before it are accepted), which never grows along
    a request, so removing in ascending value (ties: later position first) always cuts tails; with
    weights (a request's worth per token, see `weighted`), the value is the weighted one.
    Returns (T, E, removals, tokens_of): arrays [N+1], removals[r] = request whose tail is cut
    r-th, and tokens_of(r) for the SLO check."""
    B = len(contexts)
    w = weights or [1.0] * B
    order = sorted((w[i] * p, -j, i, p) for i, ps in enumerate(prefix_probs) for j, p in enumerate(ps))
    removals = [(p, j, i) for _, j, i, p in order]
    who = [i for _, _, i in removals]
    if weights is None:
        tokens = B + sum(sum(ps) for ps in prefix_probs)
    else:
        tokens = sum(w[i] * (1 + sum(ps)) for i, ps in enumerate(prefix_probs))
    overhead = cm.predict_overhead(B, sum(drafted), max(drafted))
    if len(who) <= SMALL_PRUNE:  # a few positions: plain Python, same arithmetic
        T = np.array([sunk + v + overhead for v in _prune_verify_cells(cm, contexts, drafted, who)])
    else:
        T = sunk + _prune_verify_grid(cm, contexts, drafted, who) + overhead
    E = np.subtract.accumulate(np.array([tokens] + [v for v, _, _, _ in order]))  # in removal order
    return T, E, who, PrunedTokens([1 + sum(ps) for ps in prefix_probs], removals)


def _prune_verify_grid(cm: CostModel, contexts: list[int], drafted: list[int], who: list[int]):
    """[N+1] verification time after cutting the tails of who[:r], whole-sequence numpy."""
    B = len(contexts)
    cut = np.zeros((len(who) + 1, B), dtype=int)  # row r: positions each request lost so far
    cut[np.arange(1, len(who) + 1), who] = 1
    lengths = np.asarray(drafted) - np.cumsum(cut, axis=0)  # [N+1, B]
    ends = np.asarray(contexts) + lengths
    return cm.verify_time(B, sum(drafted) - np.arange(len(who) + 1), lengths.max(1), ends.max(1), ends.sum(1),
                          grid=True)


def _prune_verify_cells(cm: CostModel, contexts: list[int], drafted: list[int], who: list[int]):
    """`_prune_verify_grid` one removal at a time with running counts (cheaper for a few hundred):
    the padded width is the top draft length some request still holds, the context the longest
    end (looked for again only when the request that held it loses a token)."""
    B = len(contexts)
    lengths = list(drafted)
    at_length = [0] * (max(drafted) + 1)  # requests per draft length
    for n in lengths:
        at_length[n] += 1
    ends = [c + n for c, n in zip(contexts, lengths, strict=True)]
    width, longest_end, total, end_sum = max(lengths), max(ends), sum(lengths), sum(ends)
    out = []
    for r in range(len(who) + 1):
        if r:
            i = who[r - 1]
            at_length[lengths[i]] -= 1
            lengths[i] -= 1
            at_length[lengths[i]] += 1
            while not at_length[width]:
                width -= 1
            ends[i] -= 1
            if ends[i] + 1 == longest_end:
                longest_end = max(ends)
            total, end_sum = total - 1, end_sum - 1
        out.append(cm.verify_time(B, total, width, longest_end, end_sum))
    return out

