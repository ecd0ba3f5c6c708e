"""Simulated acceptance: which draft tokens the target accepts, and the draft's confidences.

Under greedy verification a drafted token is accepted iff the draft's choice, given the accepted
(= true) prefix, matches the target's. Whether that holds is a property of the output *position*,
not of how steps are cut: so each request draws, once, a match bit and a confidence per output
position, and a step that drafts positions m..m+k-1 accepts the run of matches starting at m.
Every policy of a run (and the oracle) then sees the same draws: comparisons are paired.

Synthetic: per-request propensity a ~ Beta(mean_c * conc, (1 - mean_c) * conc), mean_c per
Spec-Bench category; match bits a Markov chain with mean a and lag-1 correlation rho (easy spans
come in runs); confidence ~ Beta around a + s (1 - a) for a match and a (1 - s) for a miss
(s = sharpness: 0 uninformative, 1 perfect; calibrated on average), then shifted by `bias` in
logit (> 0: over-confident). Empirical (`fit_telemetry`): the same generator with propensities
resampled from the per-request acceptance rates of an engine run, rho from its P(accept | previous
accepted), and confidences bootstrapped from its accepted / rejected tokens' draft probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Relative acceptance by Spec-Bench category (assumption, after Spec-Bench's finding that drafts do
# best on extraction-like tasks (summarization, RAG, math) and worst on open writing/translation).
CATEGORY_ACCEPT = {"writing": 0.85, "roleplay": 0.85, "reasoning": 0.95, "math": 1.1, "coding": 1.0,
                   "extraction": 1.1, "stem": 0.95, "humanities": 0.9, "translation": 0.85,
                   "summarization": 1.1, "qa": 0.9, "math_reasoning": 1.1, "rag": 1.1}


@dataclass
class Draws:
    """One request's future: match bit and draft confidence per output position."""

    propensity: float
    match: np.ndarray
    conf: np.ndarray

    def run_length(self, start: int, cap: int) -> int:
        """Consecutive matches from position `start`, at most `cap`: what a step drafting `cap`
        tokens there would have accepted."""
        seg = self.match[start:start + cap]
        miss = np.flatnonzero(~seg)
        return int(miss[0]) if len(miss) else len(seg)


def _logit(p):
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def markov_bits(mean: float, rho: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n bits with stationary mean `mean` and lag-1 correlation `rho`, drawn as alternating runs."""
    mean = min(max(mean, 1e-4), 1 - 1e-4)
    p11, p01 = mean + rho * (1 - mean), mean * (1 - rho)
    out, total, bit = [], 0, rng.random() < mean
    while total < n:
        m = max(8, (n - total) // 2)
        ones = rng.geometric(max(1 - p11, 1e-9), m)  # run of matches ends with P(miss | match)
        zeros = rng.geometric(max(p01, 1e-9), m)
        runs = np.empty(2 * m, dtype=np.int64)
        first, second = (ones, zeros) if bit else (zeros, ones)
        runs[0::2], runs[1::2] = first, second
        vals = np.tile([bit, not bit], m)
        out.append(np.repeat(vals, runs))
        total += int(runs.sum())
    return np.concatenate(out)[:n].astype(bool)


@dataclass
class AcceptanceSpec:
    mean: float = 0.7
    concentration: float = 10.0
    correlation: float = 0.3
    sharpness: float = 0.5
    bias: float = 0.0
    conf_concentration: float = 8.0
    per_category: bool = True
    propensities: list[float] | None = None  # empirical mode: pool to resample from
    conf_accepted: list[float] = field(default_factory=list)
    conf_rejected: list[float] = field(default_factory=list)
    source: str = "synthetic"

    def __post_init__(self):
        checks = [("mean", 0 < self.mean < 1), ("concentration", self.concentration > 0),
                  ("correlation", 0 <= self.correlation < 1), ("sharpness", 0 <= self.sharpness <= 1),
                  ("conf_concentration", self.conf_concentration > 0)]
        bad = [n for n, ok in checks if not ok]
        if bad:
            raise ValueError(f"acceptance model: bad {', '.join(bad)} (mean in (0,1), correlation in "
                             "[0,1), sharpness in [0,1], concentrations > 0)")

    @classmethod
    def parse(cls, spec: str, **overrides) -> AcceptanceSpec:
        """`synthetic[:MEAN[:CONC]]` or `empirical:TELEMETRY.jsonl`; `overrides` set other fields."""
        kind, _, rest = spec.partition(":")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if kind == "empirical" and rest:
            return cls.fit_telemetry(rest, **overrides)
        if kind == "synthetic":
            try:
                vals = [float(x) for x in rest.split(":")] if rest else []
            except ValueError:
                vals = [-1.0]
            if len(vals) <= 2:
                kw = dict(zip(("mean", "concentration"), vals, strict=False))
                return cls(**{**kw, **overrides})
        raise ValueError(f"acceptance model must be synthetic[:MEAN[:CONC]] or empirical:TELEMETRY.jsonl, "
                         f"got {spec!r}")

    def request_mean(self, category: str) -> float:
        f = CATEGORY_ACCEPT.get(category, 1.0) if self.per_category else 1.0
        return float(min(max(self.mean * f, 0.02), 0.98))

    def draw(self, key: int, category: str, n: int, seed: int = 0) -> Draws:
        """Request `key`'s draws; the same (seed, key) always gives the same draws."""
        rng = np.random.default_rng([seed, key, 7])
        if self.propensities:
            a = float(rng.choice(self.propensities))
        else:
            m = self.request_mean(category)
            a = float(rng.beta(m * self.concentration, (1 - m) * self.concentration))
        a = min(max(a, 1e-3), 1 - 1e-3)
        match = markov_bits(a, self.correlation, n, rng)
        if self.conf_accepted and self.conf_rejected:
            conf = np.where(match, rng.choice(self.conf_accepted, n), rng.choice(self.conf_rejected, n))
        else:
            s, c = self.sharpness, self.conf_concentration
            mu = np.clip(np.where(match, a + s * (1 - a), a * (1 - s)), 0.01, 0.99)
            conf = rng.beta(mu * c, (1 - mu) * c)
        if self.bias:
            conf = 1 / (1 + np.exp(-(_logit(conf) + self.bias)))
        return Draws(a, match, np.clip(conf, 1e-4, 1.0).astype(float))

    def describe(self) -> str:
        if self.propensities:
            return (f"{self.source}: {len(self.propensities)} per-request rates (resampled), correlation "
                    f"{self.correlation:.3f}, confidences bootstrapped from {len(self.conf_accepted)} "
                    f"accepted / {len(self.conf_rejected)} rejected tokens, bias {self.bias}")
        return (f"synthetic: per-request propensity Beta(mean {self.mean}"
                f"{' x category factor' if self.per_category else ''}, concentration {self.concentration}), "
                f"lag-1 correlation {self.correlation}, confidence sharpness {self.sharpness}, "
                f"bias {self.bias} (logit), confidence concentration {self.conf_concentration}")

    @classmethod
    def fit_telemetry(cls, source, min_tested: int = 4, **overrides) -> AcceptanceSpec:
        """Fit from engine telemetry: a JSONL path (`LLMEngine.export_telemetry`) or StepRecords."""
        records = source
        name = "engine telemetry"
        if isinstance(source, (str, Path)):
            name = f"empirical from {source}"
            try:
                lines = Path(source).read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read telemetry {source}: {exc.strerror or exc}") from None
            records = []
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    raise ValueError(f"{source} line {n}: not JSON") from None
        per_req: dict[str, list[int]] = {}
        ok_after_ok = [0, 0]
        acc_conf, rej_conf = [], []
        for n, rec in enumerate(records, 1):
            rec = rec if isinstance(rec, dict) else vars(rec)
            if rec.get("kind") != "decode":
                continue
            try:
                rows = zip(rec["request_ids"], rec["confidences"], rec["accepted"], strict=True)
                for rid, conf, acc in rows:
                    tested = min(int(acc) + 1, len(conf))
                    st = per_req.setdefault(str(rid), [0, 0])
                    st[0] += min(int(acc), tested)
                    st[1] += tested
                    for j in range(tested):
                        (acc_conf if j < acc else rej_conf).append(float(conf[j]))
                        if j > 0:  # position j was tested only because j-1 was accepted
                            ok_after_ok[0] += int(j < acc)
                            ok_after_ok[1] += 1
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"telemetry record {n}: missing or bad request_ids/confidences/accepted "
                                 f"({exc})") from None
        rates = [a / t for a, t in per_req.values() if t >= min_tested]
        if not rates or not acc_conf or not rej_conf:
            raise ValueError("telemetry has too few speculative decode steps to fit acceptance (need "
                             f"requests with >= {min_tested} tested draft tokens, accepted and rejected)")
        total_a = sum(a for a, _ in per_req.values())
        total_t = sum(t for _, t in per_req.values())
        alpha = total_a / total_t
        p11 = ok_after_ok[0] / ok_after_ok[1] if ok_after_ok[1] else alpha
        rho = float(min(max((p11 - alpha) / max(1 - alpha, 1e-6), 0.0), 0.95))
        kw = dict(mean=min(max(alpha, 0.01), 0.99), correlation=rho, propensities=rates,
                  conf_accepted=acc_conf, conf_rejected=rej_conf, source=name, per_category=False)
        return cls(**{**kw, **overrides})
