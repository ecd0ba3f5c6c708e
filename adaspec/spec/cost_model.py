"""Step-time model: how long a draft forward, a verification forward and a whole step take.

Each forward's time is fitted from start-up measurements (see `profiler.py`) as a combination of
physically meaningful terms with non-negative slopes, so it is smooth, monotone in every input and
extrapolates linearly past the profiled range instead of falling off a table's edge:

    t(B, T, L) = c0 + c1*B + c2*N + c3*max(0, N - knee) + c4*B*L + c5*N*L,   N = B*T

c0: launch/framework overhead; B: per-row work; N: tokens through the linear layers (the knee lets
a GPU stay flat while memory-bound, then grow, and a CPU's cost per token fall as its matrix
multiplies get more rows: c3 may be negative, down to -c2); B*L: reading each row's KV cache; N*L: attention
scores. Online, measured step times scale the fitted curves (an EWMA of measured/predicted per
component), so the model follows drift: a busy CPU, thermal throttling, a new context mix.

A `CostModel` is a plain object (no engine, no torch): a simulator or another engine can load one
from a JSON profile and ask it the same questions.
"""

from __future__ import annotations

import bisect
import itertools
import json
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES = ("const", "rows", "tokens", "tokens_over_knee", "rows_x_context", "tokens_x_context")
FIT_VERSION = 3  # 2: token slopes below and above the knee fitted apart; 3: spiked samples timed again
# (profiler.retime_spikes). Part of a profile's cache key


def forward_features(batch, tokens_per_seq, context, knee: float):
    b = np.asarray(batch, dtype=float)
    n = b * np.asarray(tokens_per_seq, dtype=float)
    ctx = np.asarray(context, dtype=float)
    over = np.maximum(n - knee, 0.0) if knee > 0 else np.zeros_like(n)
    return [np.ones_like(n), b, n, over, b * ctx, n * ctx]


def nnls(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact non-negative least squares for a handful of features: the best subset whose
    unconstrained solution is non-negative (2^6 small solves, simpler than an active-set loop)."""
    best, best_err = np.zeros(x.shape[1]), float(np.sum(y * y))
    for size in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), size):
            c, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if np.all(c >= 0):
                err = float(np.sum((x[:, cols] @ c - y) ** 2))
                if err < best_err:
                    best_err, best = err, np.zeros(x.shape[1])
                    best[list(cols)] = c
    return best, best_err


@dataclass
class ForwardTimeModel:
    """Seconds for one batched forward of `batch` rows, `tokens_per_seq` tokens each (padded),
    attending over `context` positions."""

    coef: list[float]
    knee: float = 0.0

    def predict(self, batch, tokens_per_seq, context, attn_width=None):
        """Works on scalars and on numpy arrays (planning evaluates many candidates at once).
        attn_width: the query width attention runs at, when it differs from the tokens per row (a
        packed forward pads attention alone to its longest row, see `CostModel.layout`)."""
        if not isinstance(batch, np.ndarray) and not isinstance(tokens_per_seq, np.ndarray) \
                and not isinstance(context, np.ndarray) and not isinstance(attn_width, np.ndarray):
            if batch <= 0:  # scalar fast path: no numpy overhead
                return 0.0
            c0, c1, c2, c3, c4, c5 = self.coef
            n = batch * tokens_per_seq
            over = max(n - self.knee, 0.0) if self.knee > 0 else 0.0
            attn = n if attn_width is None else batch * attn_width
            return float(c0 + c1 * batch + c2 * n + c3 * over + (c4 * batch + c5 * attn) * context)
        if attn_width is not None:
            return self.predict_elementwise(batch, tokens_per_seq, context, attn_width)
        f = forward_features(batch, tokens_per_seq, context, self.knee)
        t = sum(c * v for c, v in zip(self.coef, f, strict=True))
        t = np.where(np.asarray(batch) > 0, t, 0.0)  # an empty forward does not run
        return float(t) if t.ndim == 0 else t

    def predict_elementwise(self, batch, tokens_per_seq, context, attn_width=None) -> np.ndarray:
        """`predict` over arrays with the scalar path's exact arithmetic (bit-identical results, so a
        decision does not depend on which path computed it)."""
        b = np.asarray(batch, dtype=float)
        n = b * np.asarray(tokens_per_seq, dtype=float)
        c0, c1, c2, c3, c4, c5 = self.coef
        over = np.maximum(n - self.knee, 0.0) if self.knee > 0 else 0.0
        attn = n if attn_width is None else b * np.asarray(attn_width, dtype=float)
        t = c0 + c1 * b + c2 * n + c3 * over + (c4 * b + c5 * attn) * np.asarray(context, dtype=float)
        return np.where(b > 0, t, 0.0)

    @classmethod
    def fit(cls, samples: list[tuple[int, int, int, float]]) -> ForwardTimeModel:
        """Fit to (batch, tokens_per_seq, context, seconds) samples, minimising relative error.

        With a knee, the token slope below it and the slope above it are fitted, each
        non-negative: a GPU stays flat while memory-bound, then grows (steeper above), while a CPU's
        matrix multiplies get more efficient with more rows (flatter above; measured on the embedded
        target at batch 32: ~0.23 ms per extra token up to ~90 tokens, ~0.13 ms past it). Stored as
        c2 = slope below and c3 = slope above - slope below, so c3 may be negative; the time stays
        monotone in every input and extrapolates along the last slope."""
        if len(samples) < 2:
            raise ValueError("need at least two timing samples to fit a forward-time model")
        arr = np.asarray(samples, dtype=float)
        b, tps, ctx, y = arr.T
        w = 1.0 / np.maximum(y, 1e-9)
        n = b * tps
        best = None
        knees = np.unique(n)[:-1]  # a knee at a sampled size; at most ~24 tried
        knees = np.unique(np.quantile(knees, np.linspace(0, 1, 24))) if len(knees) > 24 else knees
        for knee in [0.0, *knees]:
            f = forward_features(b, tps, ctx, knee)
            if knee > 0:  # fit the slopes below and above the knee, each >= 0 (see `_knee_basis`)
                f[2] = np.minimum(n, knee)
            x = np.stack(f, axis=1) * w[:, None]
            coef, err = nnls(x, y * w)
            if best is None or err < best[0] - 1e-12:
                best = (err, coef, knee)
        _, coef, knee = best
        if knee > 0:  # back to the stored basis: slope c2 below the knee, c2 + c3 above it
            coef[3] -= coef[2]
        return cls([float(c) for c in coef], float(knee))

    def check(self) -> None:
        """ValueError unless the model is a valid forward time: six finite coefficients, every slope
        non-negative (c3 down to -c2: the token slope above the knee may be flatter, never negative)."""
        if len(self.coef) != len(FEATURES):
            raise ValueError(f"coef must have {len(FEATURES)} values")
        c0, c1, c2, c3, c4, c5 = self.coef
        if not all(np.isfinite(self.coef)) or not np.isfinite(self.knee):
            raise ValueError("coefficients must be finite")
        if min(c0, c1, c2, c2 + c3, c4, c5, self.knee) < 0:
            raise ValueError("coefficients must be >= 0 (c3 >= -c2) and the knee >= 0")

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "coef": self.coef, "knee": self.knee}

    @classmethod
    def from_dict(cls, d: dict) -> ForwardTimeModel:
        return cls([float(c) for c in d["coef"]], float(d.get("knee", 0.0)))


@dataclass
class StepShape:
    """What a decode step runs, per request: context length, draft lag (tokens the draft must catch
    up on in its first forward), tokens drafted, tokens verified (a prefix of the drafted)."""

    contexts: list[int]
    lags: list[int]
    drafted: list[int]
    verified: list[int]


@dataclass
class StepTime:
    draft: float
    verify: float
    overhead: float

    @property
    def total(self) -> float:
        return self.draft + self.verify + self.overhead


def _elementwise(model, batch, tokens_per_seq, context, attn_width=None) -> np.ndarray:
    """model.predict over arrays, with its scalar path's values: a forward model other than ours
    (the simulator's roofline) is called once per element."""
    if type(model).predict is ForwardTimeModel.predict:
        return model.predict_elementwise(batch, tokens_per_seq, context, attn_width)
    if attn_width is None:
        b, n, c = np.broadcast_arrays(batch, tokens_per_seq, context)
        cells = zip(b.ravel().tolist(), n.ravel().tolist(), c.ravel().tolist(), strict=True)
    else:
        b, n, c, a = np.broadcast_arrays(batch, tokens_per_seq, context, attn_width)
        cells = zip(b.ravel().tolist(), n.ravel().tolist(), c.ravel().tolist(), a.ravel().tolist(),
                    strict=True)
    t = [model.predict(*x) for x in cells]
    return np.array(t, dtype=float).reshape(b.shape)


MIN_SAMPLES = 3  # an online figure fed only by some steps counts with at least this many samples

# An online window's samples further than this factor from their median are outliers (`robust_mean`).
OUTLIER_FACTOR = 3.0


def robust_mean(values) -> float:
    """Mean of the values within OUTLIER_FACTOR of their median (from a third of it to three times
    it). The online corrections use it instead of the median they used until session 16: step
    times on a shared machine are skewed to the slow side, so a median of measured/predicted ratios
    sits below their mean and the corrected model predicted a run's steps low on the whole (see
    `_Scale`); a step stalled several times over (a page fault, a first call) is still left out, so
    it does not skew the next dozens."""
    med = statistics.median(values)
    lo, hi = med / OUTLIER_FACTOR, med * OUTLIER_FACTOR
    kept = [v for v in values if lo <= v <= hi]
    return sum(kept) / len(kept)


def _fresh(samples: int, steps_since_latest: int, window: int) -> bool:
    """Enough samples of its own, the latest within the last 2 * window steps. A figure fed only by
    some steps (a verification width, drafting) stops being corrected when those steps stop, so a
    thin or stale one must give way to one every step updates (or to the profile's): else a slow
    spell could keep a policy away from those steps for good."""
    return samples >= MIN_SAMPLES and steps_since_latest <= 2 * max(window, 1)


class _Scale:
    """Online multiplicative correction: the mean of the last `window` measured/predicted ratios
    without outliers (`robust_mean`). A median until session 16: replayed over that session's trace
    telemetry (`benchmarks/cost_replay.py --median`), the corrected model predicted 6.5% less step
    time than was measured, against 1.3% with the mean (its mean absolute error 10.9% against 9.9%:
    the median is the better guess of one step, the mean of a request's many)."""

    def __init__(self, window: int):
        self.window = window
        self.ratios: deque[float] = deque(maxlen=max(window, 1))
        self.value = 1.0

    def update(self, measured: float, predicted: float) -> None:
        if self.window and measured > 0 and predicted > 0:
            self.ratios.append(measured / predicted)
            self.value = min(20.0, max(0.05, robust_mean(self.ratios)))

    def trusted(self, steps_since_latest: int) -> bool:
        """`_fresh` for its ratios."""
        return _fresh(len(self.ratios), steps_since_latest, self.window)


class _BucketScale:
    """An online correction with a factor of its own per bucket of one figure of the forward (lower
    edges BUCKETS) and one shared by all. A bucket uses the shared factor while it has too few
    steps of its own, or none in the last `2 * window` updates: a stale factor (say, from a slow
    spell) must not keep a policy away from a bucket for good, since only steps there correct it."""

    BUCKETS: tuple[int, ...] = (1,)

    def __init__(self, window: int):
        self.shared = _Scale(window)
        self.buckets = [_Scale(window) for _ in self.BUCKETS]
        self.edges = tuple(b - 0.5 for b in self.BUCKETS[1:])  # a mean figure rounds to a bucket
        self.steps = 0
        self.last = [-(10**9)] * len(self.BUCKETS)  # update of each bucket's latest ratio

    @property
    def value(self) -> float:
        return self.shared.value

    @value.setter
    def value(self, v: float) -> None:
        self.shared.value = v

    def _bucket(self, x: float) -> int:
        return bisect.bisect_right(self.edges, x)

    def update(self, measured: float, predicted: float, x: float) -> None:
        self.steps += 1
        self.shared.update(measured, predicted)
        b = self._bucket(x)
        self.buckets[b].update(measured, predicted)
        self.last[b] = self.steps

    def at(self, x: float) -> float:
        b = self._bucket(x)
        s = self.buckets[b]
        return s.value if s.trusted(self.steps - self.last[b]) else self.shared.value

    def grid(self, x) -> np.ndarray:
        """`at` elementwise over an array."""
        idx = np.searchsorted(self.edges, np.asarray(x, dtype=float), side="right")
        return np.array([self.at(edge) for edge in self.BUCKETS])[idx]

    def report(self) -> dict:
        return {f"{lo}+": round(self.at(lo), 4) for lo in self.BUCKETS}


class _WidthScale(_BucketScale):
    """The verification's online correction, apart for plain decode forwards (width 1) and
    verifications (width 2+): the start-up profile can be off by different factors for the two, and
    one shared factor learned from wide steps would misprice narrow ones (and the choice between
    speculating and not).

    Verification widths share one factor: with one per width range (2-3 | 4-6 | 7+, sessions 4-5)
    each range's factor followed the steps the policy happened to run there, and on a noisy machine
    the ranges drifted apart by up to 20% (measured at batch 16: depth 3 priced below depth 2),
    which swung the plan's depth between runs. The profile is fitted over widths, so what drifts
    online is mostly the whole machine's speed: one factor keeps the prices monotone in width."""

    BUCKETS = (1, 2)  # lower edges: widths 1 | 2+


class _RowScale(_BucketScale):
    """The draft's online correction per rows of a step's first draft forward (1 | 2-3 | 4-7 | 8+).
    Measured over the telemetry of session 16's trace replays (`benchmarks/cost_replay.py`, 10,693
    decode steps of adaspec and static:3), the draft's time over the start-up profile's grew with
    the batch (median 1.09 at batch 1, 1.28 at 2-5, 1.41 at 6-15, 1.63 at 16+) where the
    verification's did not (1.09-1.15). The cause was not traced: draft forwards timed as in a step
    (after a target verification, three at advancing positions) came within 3-8% of the profile's
    at batch 1-16 (a scratch probe). A window of steps at one batch size hides most of it, but the
    plan also prices drafts for a few of many requests, and one factor priced those at the full
    batch's."""

    BUCKETS = (1, 2, 4, 8)


LAYOUTS = ("padded", "packed", "mean")


class CostModel:
    """Predicts draft, verification and per-step overhead times; corrected online.

    `layout`: how a forward of ragged rows (unequal tokens or contexts) costs, from the profile's
    equal rows:
    - "padded": every op padded to the longest row and the longest context (batch, max tokens,
      max context);
    - "packed" (our runner's default): the linear layers run the real tokens only (their sum),
      attention pads queries to the longest row and reads every row's cache up to the longest
      context (docs/packed_forward.md: at batch 16, 0.22 ms per token over all rows plus 1.3 ms
      per token of the longest);
    - "mean": every row costs its own tokens and context (paged attention, as in vLLM).
    `padded=False` (the older flag) means "mean"."""

    def __init__(self, draft: ForwardTimeModel, verify: ForwardTimeModel, overhead_per_row: float = 0.0,
                 padded: bool = True, meta: dict | None = None, window: int = 20, layout: str | None = None):
        self.draft, self.verify = draft, verify
        self.layout = layout or ("padded" if padded else "mean")
        self.meta = dict(meta or {})
        self.base_overhead_per_row = overhead_per_row
        self.window = window  # steps the online correction looks back over; 0 freezes the model
        self.reset()

    @property
    def layout(self) -> str:
        return self._layout

    @layout.setter
    def layout(self, value: str) -> None:
        if value not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {value!r}")
        self._layout = value

    @property
    def padded(self) -> bool:
        return self._layout == "padded"

    @padded.setter
    def padded(self, value: bool) -> None:
        self._layout = "padded" if value else "mean"

    def reset(self) -> None:
        """Forget online corrections (keep the profile)."""
        self.draft_scale = _RowScale(self.window)  # the first draft forward of a step (see `later_scale`)
        self.later_scale = _RowScale(self.window)  # the draft forwards after it, when measured apart
        self.verify_scale = _WidthScale(self.window)
        self._steps, self._draft_seen = 0, -(10**9)  # steps observed; the latest that drafted
        self._later_seen = -(10**9)  # the latest step whose later draft forwards were timed apart
        self._per_request: deque[float] = deque(maxlen=max(self.window, 1))  # from plain steps
        self._per_forward: deque[float] = deque(maxlen=max(self.window, 1))  # from speculative steps
        self._plain_seen = False
        self._forward_seen = -(10**9)  # the latest step that taught the per-forward rate
        self.overhead_per_request, self._overhead_per_forward = self.base_overhead_per_row, 0.0
        self._errors: deque[tuple[float, float, float]] = deque(maxlen=5000)  # (measured, ours, base)

    # ------------------------------------------------------------------------------ predictions

    # A forward is (batch, tokens per row, context[, attention width]): tokens per row is the mean
    # under the packed and mean layouts, the attention width the longest row (packed only).

    @property
    def draft_factor(self) -> float:
        """The draft's online correction. Only speculating steps teach it, so a policy that stops
        speculating stops correcting it: two slow first steps (first-call work) once priced a draft
        at 5x and kept `smartspec` from speculating for a whole run (session 7). So it counts only
        while `_Scale.trusted`; otherwise drafts are priced with the verification's shared factor,
        which every step updates (the machine's speed). This is the factor over all row counts;
        a forward is priced at its rows' own (`draft_factor_at`)."""
        return self.draft_scale.value if self._draft_trusted() else self.verify_scale.value

    def _draft_trusted(self) -> bool:
        return self.draft_scale.shared.trusted(self._steps - self._draft_seen)

    def draft_factor_at(self, rows: int, later: bool = False) -> float:
        """The draft's online correction for a forward of `rows` rows (`_RowScale`), or the
        verification's shared factor while the draft's is not trusted (`draft_factor`).

        `later`: a draft forward after the step's first. The first runs right after the previous
        step's target forward, the later ones right after a draft forward, and they are off the
        start-up profile (timed back to back) by different factors: measured at batch 1 on the AMD
        host of session 18, ~1.7 ms for the first against ~0.8 ms for each later one, where one
        factor over whole steps, learned mostly from shallow drafts, priced 8 drafts 20-33% above
        what they took at batch 1-4. Once steps report their first forward's time apart
        (`observe(draft_first=...)`), later forwards get a factor of their own (`later_scale`)."""
        if later and self._later_trusted():
            return self.later_scale.at(rows)
        return self.draft_scale.at(rows) if self._draft_trusted() else self.verify_scale.value

    def _later_trusted(self) -> bool:
        return self._draft_trusted() and self.later_scale.shared.trusted(self._steps - self._later_seen)

    def predict_draft(self, batch_size, tokens_per_seq, context_len, attn_width=None, later: bool = False):
        scale = self.draft_factor_at(batch_size, later)
        return self.draft.predict(batch_size, tokens_per_seq, context_len, attn_width) * scale

    def predict_verify(self, batch_size, tokens_per_seq, context_len, attn_width=None):
        scale = self.verify_scale.at(tokens_per_seq)
        return self.verify.predict(batch_size, tokens_per_seq, context_len, attn_width) * scale

    def predict_draft_grid(self, batch_size, tokens_per_seq, context_len, attn_width=None,
                           later=False) -> np.ndarray:
        """`predict_draft` elementwise over arrays (same values as scalar calls; `later` a bool or
        a bool array broadcast against the others)."""
        return (_elementwise(self.draft, batch_size, tokens_per_seq, context_len, attn_width)
                * self.draft_factor_grid(batch_size, later))

    def draft_factor_grid(self, rows, later=False):
        """`draft_factor_at` elementwise over an array of row counts (and of `later` flags)."""
        first = self.draft_scale.grid(rows) if self._draft_trusted() else self.verify_scale.value
        if not self._later_trusted() or not np.any(later):
            return first
        return np.where(later, self.later_scale.grid(rows), first)

    def predict_verify_grid(self, batch_size, tokens_per_seq, context_len, attn_width=None) -> np.ndarray:
        """`predict_verify` elementwise over arrays (same values as scalar calls)."""
        return (_elementwise(self.verify, batch_size, tokens_per_seq, context_len, attn_width)
                * self.verify_scale.grid(tokens_per_seq))

    def predict_overhead(self, batch_size, drafted_tokens, draft_forwards=0):
        """Engine work outside the forwards: per request (sampling, detokenising, bookkeeping; the
        profile's per-row figure until measured) and per draft forward (the drafting loop's work
        and the policy's decision after each draft forward). Measured at batch 16: plain steps
        spent 2.7 ms outside the forwards, static:3 steps (48 drafts, 3 draft forwards) the same,
        adaspec's 7-8 ms. One rate per row of (1 + batch + drafted tokens) learned from plain steps
        priced speculation's overhead at 4x its cost; a rate per drafted token learned at batch 1
        priced a batch-32 step's at 30 ms and locked speculation out there (session 4)."""
        del drafted_tokens  # kept for models that price by it (the simulator's fitted one)
        return self.overhead_per_request * (1 + batch_size) + self.overhead_per_forward * draft_forwards

    @property
    def overhead_per_forward(self) -> float:
        """The per-draft-forward rate while `_fresh`, else 0 (the start-up profile's). Only
        speculating steps teach it, so a rate that stops speculation stops its own correction: one
        warm-up step (first calls, batch 3) once set it to 0.96 ms, where 0.05-0.1 ms is usual at
        batch 1, and `adaspec` ran a whole concurrency-1 level without a draft (session 13)."""
        fresh = _fresh(len(self._per_forward), self._steps - self._forward_seen, self.window)
        return self._overhead_per_forward if fresh else 0.0

    def verify_time(self, batch, new_tokens, longest, ctx_max, ctx_sum, grid: bool = False):
        """Predicted verification of `batch` rows holding `new_tokens` drafts in all, `longest` the
        most in one row, their contexts (drafts included) at most ctx_max and ctx_sum in all, priced
        under the layout. Scalars, or arrays with grid=True (the same values): the planners track
        these running figures for every candidate and leave the pricing to this one place."""
        f = self.predict_verify_grid if grid else self.predict_verify
        return f(*self._priced(batch, longest + 1, new_tokens / batch + 1, ctx_max, ctx_sum / batch))

    def draft_time(self, rows, width_max, width_mean, ctx_max, ctx_mean, grid: bool = False, later=False):
        """Predicted draft forward of `rows` rows, their widths (tokens) and contexts given by max and
        mean, priced under the layout (as `verify_time`); `later`: not the step's first forward."""
        f = self.predict_draft_grid if grid else self.predict_draft
        return f(*self._priced(rows, width_max, width_mean, ctx_max, ctx_mean), later=later)

    def _priced(self, rows, width_max, width_mean, ctx_max, ctx_mean) -> tuple:
        """The one place the layout decides which figures of ragged rows a forward is priced at:
        (rows, tokens per row, context) or, packed, (rows, mean tokens, max context, max width)."""
        if self._layout == "padded":
            return rows, width_max, ctx_max
        if self._layout == "mean":
            return rows, width_mean, ctx_mean
        return rows, width_mean, ctx_max, width_max

    def _pick(self, values: list[int]) -> float:
        """A ragged list's one figure for a profile of equal rows: the longest (padded) or the mean."""
        return max(values) if self._layout == "padded" else sum(values) / len(values)

    def forward(self, widths: list[int], contexts: list[float]) -> tuple:
        """How a forward of rows with these widths (tokens) and contexts is priced (`_priced`)."""
        n = len(widths)
        return self._priced(n, max(widths), sum(widths) / n, max(contexts), sum(contexts) / n)

    def draft_forward(self, drafted: list[int], lags: list[int], contexts: list[int], j: int) -> tuple:
        """`forward` of draft forward j of a step with these draft lengths: the rows that drafted
        more than j tokens, the first forward catching up their lags."""
        rows = [i for i, d in enumerate(drafted) if d > j]
        widths = [lags[i] for i in rows] if j == 0 else [1] * len(rows)
        return self.forward(widths, [contexts[i] + j for i in rows])

    def draft_forwards(self, shape: StepShape) -> list[tuple]:
        """`draft_forward` of each draft forward the shape implies."""
        return [self.draft_forward(shape.drafted, shape.lags, shape.contexts, j)
                for j in range(max(shape.drafted, default=0))]

    def verify_forward(self, shape: StepShape) -> tuple:
        return self.forward([n + 1 for n in shape.verified],
                            [c + n for c, n in zip(shape.contexts, shape.verified, strict=True)])

    def _draft_parts(self, shape: StepShape) -> tuple[float, float, list[tuple]]:
        """The step's draft time as profiled and as corrected (each forward at its rows' factor), and
        its draft forwards."""
        base = corrected = 0.0
        forwards = self.draft_forwards(shape)
        for j, f in enumerate(forwards):
            t = self.draft.predict(*f)
            base += t
            corrected += t * self.draft_factor_at(f[0], later=j > 0)
        return base, corrected, forwards

    def predict(self, shape: StepShape, corrected: bool = True) -> StepTime:
        base, draft, _ = self._draft_parts(shape)
        forward = self.verify_forward(shape)
        verify = self.verify.predict(*forward)
        if corrected:
            overhead = self.predict_overhead(len(shape.contexts), sum(shape.drafted),
                                             max(shape.drafted, default=0))
            verify = verify * self.verify_scale.at(forward[1])
        else:
            draft, overhead = base, self._base_overhead(shape)
        return StepTime(float(draft), float(verify), float(overhead))

    def _base_overhead(self, shape: StepShape) -> float:
        """The start-up profile's time outside the forwards: a rate per row of (1 + batch + drafts)."""
        return self.base_overhead_per_row * (1 + len(shape.contexts) + sum(shape.drafted))

    # ------------------------------------------------------------------------------ online fit

    def observe(self, shape: StepShape, draft_time: float, verify_time: float, step_time: float,
                draft_first: float | None = None) -> StepTime:
        """Learn from one measured step (the prediction error is recorded first, prequentially);
        returns what was predicted for it before learning (= `predict(shape)`). `draft_first`: the
        time of the step's first draft forward, if measured apart (`draft_factor_at`'s `later`)."""
        draft_base, draft, forwards_ = self._draft_parts(shape)
        forward = self.verify_forward(shape)
        verify_base, width = self.verify.predict(*forward), forward[1]
        rows, forwards = 1 + len(shape.contexts), max(shape.drafted, default=0)
        base_total = draft_base + verify_base + self._base_overhead(shape)
        ours = StepTime(float(draft), float(verify_base * self.verify_scale.at(width)),
                        self.predict_overhead(rows - 1, 0, forwards))  # = predict(shape), not predicted twice
        self._errors.append((step_time, ours.total, float(base_total)))
        self._steps += 1
        if ours.draft > 0 and draft_time > 0:
            first_rows = forwards_[0][0]
            if draft_first and len(forwards_) > 1 and draft_time > draft_first:
                first_base = self.draft.predict(*forwards_[0])
                self.draft_scale.update(draft_first, first_base, first_rows)
                self.later_scale.update(draft_time - draft_first, draft_base - first_base, forwards_[1][0])
                self._later_seen = self._steps
            else:
                self.draft_scale.update(draft_time, draft_base, first_rows)
            self._draft_seen = self._steps
        self.verify_scale.update(verify_time, verify_base, width)
        if self.window:
            self._learn_overhead(rows, forwards, max(0.0, step_time - draft_time - verify_time))
        return ours

    def _learn_overhead(self, rows: int, forwards: int, outside: float) -> None:
        """Per-request rate from plain steps; per-forward rate from what speculating steps spend
        beyond it. Until a plain step is seen, speculating steps teach the per-request rate alone
        (pricing a plain step's overhead like a speculating one's: a small bias towards drafting,
        which the next plain step removes)."""
        if forwards and self._plain_seen:
            self._per_forward.append(max(0.0, outside - self.overhead_per_request * rows) / forwards)
            self._overhead_per_forward = robust_mean(self._per_forward)
            self._forward_seen = self._steps
            return
        if not forwards and not self._plain_seen:
            self._plain_seen = True
            self._per_request.clear()  # those came from speculating steps
        self._per_request.append(outside / rows)
        self.overhead_per_request = robust_mean(self._per_request)

    @property
    def observed_steps(self) -> int:
        return len(self._errors)

    def error_report(self, last: int | None = None) -> dict:
        """Predicted vs measured step time (over the last `last` steps, or all kept): mean absolute
        and signed relative error, online (ours) and for the start-up profile alone (uncorrected)."""
        errors = list(self._errors)[-last:] if last else list(self._errors)
        if not errors:
            return {"steps": 0}
        m, ours, base = (np.asarray(v) for v in zip(*errors, strict=True))
        rel, rel_base = (ours - m) / m, (base - m) / m
        return {"steps": len(m), "mape": float(np.mean(np.abs(rel))),
                "median_ape": float(np.median(np.abs(rel))), "bias": float(np.mean(rel)),
                "mape_uncorrected": float(np.mean(np.abs(rel_base))),
                "bias_uncorrected": float(np.mean(rel_base)),
                "draft_scale": self.draft_factor, "draft_scale_by_rows": self.draft_scale.report(),
                "later_draft_scale_by_rows": self.later_scale.report() if self._later_trusted() else None,
                "verify_scale": self.verify_scale.value,
                "verify_scale_by_width": self.verify_scale.report(),
                "overhead_per_request_s": self.overhead_per_request,
                "overhead_per_forward_s": self.overhead_per_forward}

    # ------------------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        return {"draft": self.draft.to_dict(), "verify": self.verify.to_dict(),
                "overhead_per_row": self.base_overhead_per_row, "padded": self.padded, "layout": self.layout,
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        return cls(ForwardTimeModel.from_dict(d["draft"]), ForwardTimeModel.from_dict(d["verify"]),
                   float(d.get("overhead_per_row", 0.0)), bool(d.get("padded", True)), d.get("meta"),
                   layout=d.get("layout"))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)  # atomic: a concurrent reader never sees half a profile

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def linear(cls, draft_step: float, verify_step: float, verify_per_token: float = 0.0,
               draft_per_row: float = 0.0, verify_per_row: float = 0.0, overhead_per_row: float = 0.0,
               padded: bool = True, window: int = 0, correction_rate: float | None = None) -> CostModel:
        """A synthetic model for tests and simulations: fixed per-forward costs plus per-row and
        per-token terms, no context dependence; frozen unless given a correction window
        (`correction_rate`, kept for callers written against the first version: window 2/rate)."""
        if correction_rate:
            window = max(1, round(2 / correction_rate))
        draft = ForwardTimeModel([draft_step, draft_per_row, 0.0, 0.0, 0.0, 0.0])
        verify = ForwardTimeModel([verify_step, verify_per_row, verify_per_token, 0.0, 0.0, 0.0])
        return cls(draft, verify, overhead_per_row, padded, {"synthetic": True}, window)
