"""A cost model fitted from a real run's engine telemetry, so that a simulation's step times are
those of the run it is compared with (a start-up profile, timed on an idle machine, made the
simulated replay of a loaded server about twice too fast: docs/sim_validation.md).

Input: JSONL files of engine step records (`LLMEngine.export_telemetry`, `adaspec serve
--save-telemetry`; `adaspec bench sweep` keeps one per policy, telemetry-<policy>.jsonl). Fitted by
non-negative least squares, a few coefficients each (a fit, not a table):

- decode forwards, pooled over the files (they are the machine's): the profile's `ForwardTimeModel`
  form plus the fixed costs of the engine's code paths (`PathForward`); the target's fitted to each
  step's verify time, the draft's to each step's draft time as the sum of its draft forwards (the
  catch-up width of the first one rebuilt from each request's history, as the engine keeps it);
- prefill forwards (target; draft when the policy drafts), pooled: their own models, since a
  prefill computes logits for one position per row (the draft's for none), a verify for every token;
- time outside the forwards, per policy: inside a step (planning, sampling, bookkeeping) and the
  gap to the next step while the engine has work (the policy's observe, streaming, the server's
  event loop), each c0 + c1 * rows + c2 * drafted tokens, for decode and prefill steps. This part is
  descriptive: it is measured from that policy's own run. A file's policy is the <policy> of its
  name (or POLICY=PATH); a policy without a file gets the fit over all files.

A fit describes the shapes its telemetry saw (`meta["range"]`); far outside them it extrapolates
freely, so fit from a run whose batch sizes and contexts cover the simulated ones.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaspec.spec.cost_model import (
    CostModel,
    ForwardTimeModel,
    StepShape,
    StepTime,
    forward_features,
    nnls,
)

POOLED = "*"  # the outside-the-forwards fit over every file, for policies without their own
PARTS = ("decode", "decode_gap", "prefill", "prefill_gap")
MAX_GAP_S = 0.05  # a longer pause of a busy engine is a one-off stall (GC, the OS), not a step cost
_NUMBERS = ("start", "draft_time", "verify_time", "step_time")
_LISTS = ("context_lens", "request_ids", "drafted", "accepted")


@dataclass
class PathForward(ForwardTimeModel):
    """`ForwardTimeModel` plus the fixed costs of the engine's code paths, which a smooth form of
    the shape cannot have. Ours: one row of one token attends without a mask; anything else builds
    a mask (`paths[0]`); several tokens per row take the padded general path instead of the
    one-token fast path (`paths[1] + paths[2] * batch`): a draft's catch-up forward, a verification,
    a prefill. (vLLM has the like: CUDA graphs for decode-only batches.) In the code-trace telemetry
    the mask is about 6 of the target's 18 ms at batch 2."""

    paths: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def predict(self, batch, tokens_per_seq, context, attn_width=None):
        t = super().predict(batch, tokens_per_seq, context, attn_width)
        if isinstance(t, float):
            if batch <= 0:
                return t
            wide = tokens_per_seq > 1
            return t + self.paths[0] * (wide or batch > 1) + (self.paths[1] + self.paths[2] * batch) * wide
        return t + self._paths(batch, tokens_per_seq)

    def predict_elementwise(self, batch, tokens_per_seq, context, attn_width=None) -> np.ndarray:
        base = super().predict_elementwise(batch, tokens_per_seq, context, attn_width)
        return base + self._paths(batch, tokens_per_seq)

    def _paths(self, batch, tokens_per_seq) -> np.ndarray:
        b = np.asarray(batch, dtype=float)
        wide = np.asarray(tokens_per_seq) > 1
        t = self.paths[0] * (wide | (b > 1)) + (self.paths[1] + self.paths[2] * b) * wide
        return np.where(b > 0, t, 0.0)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "paths": list(self.paths),
                "path_features": ["masked", "multi_token", "multi_token_rows"]}


@dataclass
class Outside:
    """Seconds outside the forwards: c0 + c1 * rows + c2 * drafted tokens, coefficients >= 0."""

    coef: list[float]

    def predict(self, rows: float, drafted: float = 0.0) -> float:
        c0, c1, c2 = self.coef
        return c0 + c1 * rows + c2 * drafted

    @classmethod
    def fit(cls, samples: list[tuple[float, float, float]]) -> Outside:
        """Least squares (absolute: the mean is what step times add up) on (rows, drafted, s)."""
        rows, drafted, y = np.asarray(samples, dtype=float).reshape(-1, 3).T
        coef, _ = nnls(np.stack([np.ones_like(rows), rows, drafted], axis=1), y)
        return cls([float(c) for c in coef])


class FittedCostModel(CostModel):
    """A `CostModel` (decode forwards, policies ask it the same questions) plus prefill forwards and
    per-policy time outside the forwards. `use_policy` picks whose outside time applies."""

    def __init__(self, draft: PathForward, verify: PathForward, prefill_draft: PathForward | None,
                 prefill_target: PathForward, outside: dict[str, dict[str, Outside]], padded: bool = True,
                 meta: dict | None = None, window: int = 0):
        super().__init__(draft, verify, 0.0, padded, meta, window)
        self.prefill_draft, self.prefill_target, self.outside = prefill_draft, prefill_target, outside
        self.policy_key = POOLED

    def use_policy(self, name: str) -> FittedCostModel:
        """Apply `name`'s own outside-the-forwards times if it had a telemetry file (else pooled)."""
        from adaspec.bench.sweep import file_stem

        key = file_stem(name)
        self.policy_key = key if key in self.outside else POOLED
        return self

    def for_policy(self, name: str) -> FittedCostModel:
        """A copy for one run of policy `name` (the simulator's truth for that run)."""
        return copy.deepcopy(self).use_policy(name)

    def _outside(self, part: str, rows: float, drafted: float) -> float:
        return self.outside[self.policy_key][part].predict(rows, drafted)

    def predict_overhead(self, batch_size, drafted_tokens, draft_forwards=0):
        return self._outside("decode", batch_size, drafted_tokens)  # fitted per drafted token

    def predict(self, shape: StepShape, corrected: bool = True) -> StepTime:
        st = super().predict(shape, corrected)
        return StepTime(st.draft, st.verify, self.predict_overhead(len(shape.contexts), sum(shape.drafted)))

    def observe(self, shape: StepShape, draft_time: float, verify_time: float, step_time: float,
                draft_first: float | None = None) -> StepTime:
        t = super().observe(shape, draft_time, verify_time, step_time, draft_first)
        return StepTime(t.draft, t.verify, self.predict_overhead(len(shape.contexts), sum(shape.drafted)))

    # The grids through the vectorised path (the base class would call `predict` cell by cell).
    def predict_draft_grid(self, batch, tokens_per_seq, context, later=False) -> np.ndarray:
        return (self.draft.predict_elementwise(batch, tokens_per_seq, context)
                * self.draft_factor_grid(batch, later))

    def predict_verify_grid(self, batch, tokens_per_seq, context) -> np.ndarray:
        return self.verify.predict_elementwise(batch, tokens_per_seq, context) * self.verify_scale.grid(
            tokens_per_seq)

    def predict_prefill(self, prompt_lens: list[int], uses_draft: bool) -> StepTime:
        """A prefill step of these prompts (one padded forward each of target and, if drafting, draft)."""
        b, width = len(prompt_lens), self._pick(prompt_lens)
        draft = self.prefill_draft.predict(b, width, width) if uses_draft and self.prefill_draft else 0.0
        return StepTime(draft, self.prefill_target.predict(b, width, width), self._outside("prefill", b, 0))

    def predict_gap(self, kind: str, rows: int, drafted: int = 0) -> float:
        """Time from the end of a `kind` step to the start of the next one, while there is work."""
        return self._outside(f"{kind}_gap", rows, drafted)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(kind="telemetry-fit", prefill_target=self.prefill_target.to_dict(),
                 prefill_draft=self.prefill_draft.to_dict() if self.prefill_draft else None,
                 outside={k: {p: o.coef for p, o in v.items()} for k, v in self.outside.items()})
        return d


# ---------------------------------------------------------------------------------- reading


def _problem(r) -> str | None:
    """What is wrong with one step record, or None."""
    if not isinstance(r, dict):
        return "not a JSON object"
    missing = [k for k in ("kind", "batch_size", "draft_steps", *_NUMBERS, *_LISTS) if k not in r]
    if missing:
        return f"missing {', '.join(missing)} (not an engine step record?)"
    if not isinstance(r["draft_steps"], int) or r["draft_steps"] < 0:
        return f"draft_steps must be an integer >= 0, got {r['draft_steps']!r}"
    if r["kind"] not in ("prefill", "decode"):
        return f"kind must be 'prefill' or 'decode', got {r['kind']!r}"
    for k in _NUMBERS:
        v = r[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            return f"{k} must be a finite number >= 0, got {v!r}"
    if not all(isinstance(r[k], list) for k in _LISTS):
        return f"{', '.join(_LISTS)} must be lists"
    b = r["batch_size"]
    if not isinstance(b, int) or b < 1 or len(r["context_lens"]) != b or len(r["request_ids"]) != b:
        return f"batch_size {b!r} does not match context_lens / request_ids"
    if not all(isinstance(c, int) and c >= 1 for c in r["context_lens"]):
        return "context_lens must be integers >= 1"
    if r["kind"] == "decode":
        d, a = r["drafted"], r["accepted"]
        pairs = zip(d, a, strict=False)  # lengths checked first
        if len(d) != b or len(a) != b or not all(isinstance(x, int) and isinstance(y, int) and 0 <= y <= x
                                                 for x, y in pairs):
            return "drafted / accepted must be one integer per request, 0 <= accepted <= drafted"
    return None


def read_telemetry(path: str | Path) -> list[dict]:
    """Step records of one file, checked; ValueError names the file, the line and the problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read telemetry {path}: {exc.strerror or exc}") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
        problem = _problem(r)
        if problem:
            raise ValueError(f"{path}:{n}: {problem}")
        records.append(r)
    if not any(r["kind"] == "decode" for r in records):
        raise ValueError(f"{path}: no decode step records (an engine telemetry file has them)")
    return records


# ---------------------------------------------------------------------------------- fitting


def step_samples(records: list[dict], shaper: CostModel) -> dict[str, list]:
    """Measured times of one run's steps, by what the fit needs: forwards as ([(batch, tokens per
    row, context), ...], seconds); outside-the-forwards parts as (rows, drafted tokens, seconds)."""
    out = {k: [] for k in ("verify", "draft", "prefill_target", "prefill_draft", *PARTS)}
    last = {q: i for i, r in enumerate(records) for q in r["request_ids"]}
    lag: dict[str, int] = {}  # draft lag per request, kept as the engine keeps it
    for i, r in enumerate(records):
        ids, b = r["request_ids"], r["batch_size"]
        inside = max(0.0, r["step_time"] - r["draft_time"] - r["verify_time"])
        busy = i + 1 < len(records) and (r.get("num_waiting", 0) > 0 or any(last[q] > i for q in ids))
        gap = records[i + 1]["start"] - r["start"] - r["step_time"] if busy else None
        if r["kind"] == "prefill":
            width = shaper._pick(r["context_lens"])
            out["prefill_target"].append(([(b, width, width)], r["verify_time"]))
            if r["draft_time"] > 0:
                out["prefill_draft"].append(([(b, width, width)], r["draft_time"]))
            for q, c in zip(ids, r["context_lens"], strict=True):
                lag[q] = 1 if r["draft_time"] > 0 else c + 1
            drafted = 0
        else:
            d = r["drafted"]
            shape = StepShape(r["context_lens"], [lag.get(q, 1) for q in ids], d, d)
            out["verify"].append(([shaper.verify_forward(shape)], r["verify_time"]))
            forwards = shaper.draft_forwards(shape)
            if r["draft_steps"] and len(forwards) == r["draft_steps"]:  # else pruned: shapes unknown
                out["draft"].append((forwards, r["draft_time"]))
            for q, n, a in zip(ids, d, r["accepted"], strict=True):
                lag[q] = (2 if a == n else 1) if n else lag.get(q, 1) + 1
            drafted = sum(d)
        out[r["kind"]].append((b, drafted, inside))
        if gap is not None and 0 <= gap <= MAX_GAP_S:
            out[f"{r['kind']}_gap"].append((b, drafted, gap))
    return out


def _design(b, t, c, knee: float) -> np.ndarray:
    """`PathForward`'s features per forward: the profile's six, then the three path indicators."""
    wide = (t > 1).astype(float)
    masked = np.maximum(wide, (b > 1).astype(float))
    return np.stack([*forward_features(b, t, c, knee), masked, wide, wide * b], axis=1)


def fit_forwards(samples: list[tuple[list[tuple[float, float, float]], float]], what: str,
                 paths: bool = True) -> PathForward:
    """`PathForward` fitted (non-negative least squares) to measured times, each the sum of one or
    more forwards given as (batch, tokens per row, context). Absolute, not relative, error: step
    times add up, and a relative fit of noisy times is biased low. `paths=False` for prefills,
    which all take one path (their path costs are the constant and per-row terms)."""
    if len(samples) < 2:
        raise ValueError(f"telemetry has {len(samples)} {what} samples; the fit needs at least two")
    idx = np.repeat(np.arange(len(samples)), [len(f) for f, _ in samples])
    b, t, c = np.asarray([x for f, _ in samples for x in f], dtype=float).T
    y = np.asarray([s for _, s in samples], dtype=float)
    sizes = np.unique(b * t)[:-1]
    knees = np.unique(np.quantile(sizes, np.linspace(0, 1, 8))) if len(sizes) > 8 else sizes
    k, best = 9 if paths else 6, None
    for knee in [0.0, *knees]:
        x = np.zeros((len(y), k))
        np.add.at(x, idx, _design(b, t, c, knee)[:, :k])
        q, r = np.linalg.qr(x)  # the same least-squares solutions from k rows instead of thousands
        qy = q.T @ y
        coef, err = nnls(r, qy)
        err += float(y @ y - qy @ qy)  # the part of the error no coefficient can reach
        if best is None or err < best[0] - 1e-12:
            best = (err, coef, knee)
    coef = [float(v) for v in best[1]] + [0.0] * (9 - k)
    return PathForward(coef[:6], float(best[2]), (coef[6], coef[7], coef[8]))


def _fit_outside(samples: dict[str, list], fallback: dict[str, Outside] | None) -> dict[str, Outside]:
    out = {}
    for part in PARTS:
        s = samples[part]
        out[part] = Outside.fit(s) if len(s) >= 3 or fallback is None else fallback[part]
    return out


def _key(path: Path) -> str:
    stem = path.name.removesuffix(".jsonl")
    return stem.removeprefix("telemetry-") or stem


def fit_telemetry(paths: list[str], padded: bool = True) -> FittedCostModel:
    """Fit from telemetry files (entries 'PATH' or 'POLICY=PATH'); ValueError on bad input."""
    if not paths:
        raise ValueError("telemetry cost model: give at least one telemetry file")
    from adaspec.bench.sweep import file_stem

    shaper = CostModel(ForwardTimeModel([0.0] * 6), ForwardTimeModel([0.0] * 6), padded=padded)  # shapes
    runs: dict[str, dict[str, list]] = {}
    for entry in paths:
        name, sep, path = entry.partition("=")
        name, path = (name, path) if sep else ("", entry)
        key = file_stem(name) if sep else _key(Path(path))
        if key in runs:
            raise ValueError(f"telemetry cost model: two files for policy {key!r}")
        runs[key] = step_samples(read_telemetry(path), shaper)
    pooled = {k: [x for s in runs.values() for x in s[k]] for k in next(iter(runs.values()))}
    if not pooled["draft"]:
        raise ValueError("telemetry cost model: no draft forwards in the telemetry (add a run of a "
                         "speculating policy)")
    outside = {POOLED: _fit_outside(pooled, None)}
    outside |= {k: _fit_outside(s, outside[POOLED]) for k, s in runs.items()}
    shapes = np.asarray([f[0] for f, _ in pooled["verify"]], dtype=float)  # decode verify forwards
    meta = {"telemetry": list(paths), "decode_steps": len(pooled["verify"]),
            "prefill_steps": len(pooled["prefill_target"]), "draft_steps_fitted": len(pooled["draft"]),
            "range": {"batch": int(shapes[:, 0].max()), "tokens_per_row": int(shapes[:, 1].max()),
                      "context": int(shapes[:, 2].max())}}
    prefill_draft = fit_forwards(pooled["prefill_draft"], "draft prefill", paths=False) \
        if len(pooled["prefill_draft"]) >= 2 else None
    prefill_target = fit_forwards(pooled["prefill_target"], "prefill", paths=False)
    return FittedCostModel(fit_forwards(pooled["draft"], "draft"), fit_forwards(pooled["verify"], "verify"),
                           prefill_draft, prefill_target, outside, padded, meta)
