"""What a benchmark sends and when: prompts, output lengths and arrival times, all seeded.

Every run of a sweep sends the same requests (same prompts, same output lengths) so policies and
load levels compare; only the arrival times are scaled. A trace is read by path (`Timestamp`
column, seconds) and replayed as is: request i leaves `Timestamp[i]` after the start (shifted so
the first one leaves at 0 unless asked otherwise), times `time_scale`, divided by `rate_scale`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Relative answer lengths by Spec-Bench category (a writing answer runs about three times a QA one);
# `sampled:MEAN` scales these so the workload mean is MEAN. Unknown categories get 1.0.
CATEGORY_LENGTH = {"writing": 1.5, "roleplay": 1.2, "reasoning": 1.0, "math": 1.0, "coding": 1.3,
                   "extraction": 0.7, "stem": 1.3, "humanities": 1.5, "translation": 0.5,
                   "summarization": 0.7, "qa": 0.5, "math_reasoning": 0.9, "rag": 0.7, "python": 1.0}

_WORDS = ("value", "items", "result", "count", "index", "node", "path", "total", "data", "key", "left",
          "right", "name", "size", "buffer", "queue", "state", "config", "limit", "offset")


@dataclass
class Prompt:
    text: str
    category: str = "default"


@dataclass
class BenchRequest:
    """One request of a workload; `arrival` is in seconds after the start, before the rate scale."""

    index: int
    prompt: str
    category: str
    max_tokens: int
    ignore_eos: bool
    arrival: float

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------ prompts


def load_prompts(path: str | Path) -> list[Prompt]:
    """Spec-Bench rows (`turns[0]`, `category`); also accepts a `prompt` field. Names the bad line."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["turns"][0] if "turns" in row else row["prompt"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{path} line {n}: not a Spec-Bench row with turns[0] ({exc})") from None
        if not isinstance(text, str) or not text:
            raise ValueError(f"{path} line {n}: the first turn is empty or not a string")
        out.append(Prompt(text, str(row.get("category", "default"))))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def builtin_prompts() -> list[Prompt]:
    """The embedded pair's held-out prompts (shipped with the package, category 'python')."""
    from adaspec.llm import DEFAULT_PAIR

    return load_prompts(DEFAULT_PAIR / "prompts.jsonl")


def synthetic_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """Code-like prompts from a seeded template: needs no file and no trained model."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = [str(x) for x in rng.choice(_WORDS, size=4, replace=False)]
        body = f"def {w[0]}_{w[1]}({w[2]}, {w[3]}):\n    {w[2]} = {w[2]} or []\n    for {w[3]} in {w[2]}:\n"
        out.append(Prompt(body * int(rng.integers(1, 4)), "python"))
    return out


def resolve_prompts(source: str, seed: int = 0) -> tuple[list[Prompt], str]:
    """`builtin`, `synthetic[:N]` or a JSONL path -> (prompts, description for the report)."""
    if source == "builtin":
        return builtin_prompts(), "built-in prompts of the embedded pair"
    if source.startswith("synthetic"):
        n = int(source.partition(":")[2] or 64)
        return synthetic_prompts(n, seed), f"synthetic code-like prompts (n={n}, seed={seed})"
    return load_prompts(source), f"{source} (first turns)"


# ------------------------------------------------------------------------------ output lengths


@dataclass
class LengthRule:
    """`eos:CAP` (natural EOS, at most CAP), `fixed:N` or `sampled:MEAN[:CV]` (lognormal around
    MEAN times the category's relative length, CV 0.5 by default); the last two set ignore_eos."""

    kind: str
    value: int
    cv: float = 0.5

    @classmethod
    def parse(cls, spec: str) -> LengthRule:
        kind, _, rest = spec.partition(":")
        parts = rest.split(":") if rest else []
        try:
            if kind in ("eos", "fixed") and len(parts) == 1 and int(parts[0]) >= 1:
                return cls(kind, int(parts[0]))
            if kind == "sampled" and 1 <= len(parts) <= 2 and int(parts[0]) >= 1:
                cv = float(parts[1]) if len(parts) == 2 else 0.5
                if cv >= 0:
                    return cls(kind, int(parts[0]), cv)
        except ValueError:
            pass
        raise ValueError(f"output length rule must be eos:CAP, fixed:N or sampled:MEAN[:CV], got {spec!r}")

    @property
    def ignore_eos(self) -> bool:
        return self.kind != "eos"

    def describe(self) -> str:
        if self.kind == "eos":
            return f"natural EOS, capped at {self.value} tokens (ignore_eos=false)"
        if self.kind == "fixed":
            return f"fixed {self.value} tokens per request (ignore_eos=true)"
        return (f"sampled per category: lognormal, mean {self.value} x category factor, CV {self.cv}, "
                f"clipped to [1, {4 * self.value}] (ignore_eos=true)")

    def sample(self, categories: list[str], rng: np.random.Generator) -> list[int]:
        if self.kind != "sampled":
            return [self.value] * len(categories)
        sigma = math.sqrt(math.log1p(self.cv ** 2))
        out = []
        for c in categories:
            mean = self.value * CATEGORY_LENGTH.get(c, 1.0)
            x = rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma) if sigma else mean
            out.append(int(min(max(round(x), 1), 4 * self.value)))
        return out


# ------------------------------------------------------------------------------------ arrivals


def load_trace(path: str | Path) -> list[float]:
    """Arrival times (s) from a CSV with a `Timestamp` column; errors name the file and line."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or "Timestamp" not in [h.strip() for h in header]:
            raise ValueError(f"{path} line 1: expected a header with a 'Timestamp' column, got {header!r}")
        col = [h.strip() for h in header].index("Timestamp")
        times: list[float] = []
        for row in reader:
            line = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            try:
                t = float(row[col])
            except (ValueError, IndexError):
                cell = row[col] if col < len(row) else ""
                raise ValueError(f"{path} line {line}: Timestamp {cell!r} is not a number") from None
            if not math.isfinite(t) or t < 0:
                raise ValueError(f"{path} line {line}: Timestamp {t} must be a finite number >= 0")
            if times and t < times[-1]:
                raise ValueError(f"{path} line {line}: Timestamp {t} is earlier than the previous "
                                 f"{times[-1]} (arrivals must be ascending)")
            times.append(t)
    if not times:
        raise ValueError(f"{path}: no arrivals after the header")
    return times


def gamma_arrivals(rate: float, cv: float, rng: np.random.Generator, n: int | None = None,
                   duration: float | None = None, start: float = 0.0) -> list[float]:
    """Renewal process with Gamma inter-arrivals of mean 1/rate and the given CV (1 = Poisson);
    the first request arrives at `start`. Stops after n requests or past start + duration."""
    if rate <= 0 or cv <= 0:
        raise ValueError("arrival rate and CV must be > 0")
    if n is None and duration is None:
        raise ValueError("generated arrivals need a number of requests or a duration")
    shape = 1.0 / cv ** 2
    out, t = [], start
    while (n is None or len(out) < n) and (duration is None or t < start + duration):
        out.append(t)
        t += float(rng.gamma(shape, 1.0 / (rate * shape)))
    return out


_PHASE = re.compile(r"^\s*([0-9.]+)\s*@\s*([0-9.]+)\s*$")


def parse_arrivals(spec: str, rng: np.random.Generator, n: int | None,
                   duration: float | None) -> tuple[list[float], str]:
    """`poisson:RATE`, `gamma:RATE:CV` or `phases:RATE@SECONDS,...[:CV]` (Poisson unless CV given,
    e.g. a quiet phase then a burst) -> (arrival times, description)."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "poisson":
            return gamma_arrivals(float(rest), 1.0, rng, n, duration), f"Poisson, {float(rest)} req/s"
        if kind == "gamma":
            rate, cv = (float(x) for x in rest.split(":"))
            return gamma_arrivals(rate, cv, rng, n, duration), f"Gamma, {rate} req/s, CV {cv}"
        if kind == "phases":
            body, _, cv_s = rest.partition(":")
            cv = float(cv_s) if cv_s else 1.0
            out, start, parts = [], 0.0, []
            for p in body.split(","):
                m = _PHASE.match(p)
                if not m:
                    raise ValueError(p)
                rate, secs = float(m[1]), float(m[2])
                out += gamma_arrivals(rate, cv, rng, duration=secs, start=start)
                start += secs
                parts.append(f"{rate} req/s for {secs} s")
            return out, "phases: " + ", then ".join(parts) + f" (Gamma inter-arrivals, CV {cv})"
    except ValueError:
        pass
    raise ValueError(f"arrivals must be poisson:RATE, gamma:RATE:CV or phases:RATE@SECONDS,...[:CV] "
                     f"(rates and CV > 0), got {spec!r}")


# ------------------------------------------------------------------------------------ workload


def sha256(path: str | None) -> str | None:
    """Content hash of a data file, so a report says exactly which trace or prompt set it used."""
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Workload:
    requests: list[BenchRequest]
    description: dict  # prompts, arrivals, scales, output-length rule, seed: goes into the report

    def at_rate_scale(self, rate_scale: float) -> list[BenchRequest]:
        if rate_scale <= 0:
            raise ValueError("rate scale must be > 0")
        return [BenchRequest(**{**r.as_dict(), "arrival": r.arrival / rate_scale}) for r in self.requests]


def build_workload(prompts: str = "builtin", arrivals: str | None = None, trace: str | None = None,
                   num_requests: int | None = None, duration: float | None = None,
                   time_scale: float = 1.0, output_len: str = "fixed:64", seed: int = 0,
                   shift_trace: bool = True) -> Workload:
    """Seeded: the same arguments give the same prompts, lengths and times, request for request."""
    if time_scale <= 0:
        raise ValueError("--time-scale must be > 0")
    rng = np.random.default_rng(seed)
    pool, prompt_desc = resolve_prompts(prompts, seed)
    rule = LengthRule.parse(output_len)
    if trace is not None:
        raw = load_trace(trace)
        offset = raw[0] if shift_trace else 0.0
        times = [(t - offset) * time_scale for t in raw]
        arr_desc = f"trace {trace} ({len(raw)} arrivals, shifted by -{offset:g} s), time scale {time_scale}"
    else:
        spec = arrivals or "poisson:1"
        n_gen = num_requests if duration is None else None
        if n_gen is None and duration is None:
            n_gen = 100
        times, arr_desc = parse_arrivals(spec, rng, n_gen, duration / time_scale if duration else None)
        times = [t * time_scale for t in times]
        arr_desc += f", time scale {time_scale}"
    if duration is not None:
        times = [t for t in times if t < duration]
    if num_requests is not None:
        times = times[:num_requests]
    if not times:
        raise ValueError("the workload has no requests (check --duration / --num-requests)")
    order = rng.permutation(len(pool))
    chosen = [pool[order[i % len(pool)]] for i in range(len(times))]
    lengths = rule.sample([p.category for p in chosen], rng)
    reqs = [BenchRequest(i, p.text, p.category, n, rule.ignore_eos, t)
            for i, (p, n, t) in enumerate(zip(chosen, lengths, times, strict=True))]
    desc = {"prompts": prompt_desc, "num_prompts_in_pool": len(pool), "arrivals": arr_desc,
            "trace": trace, "trace_sha256": sha256(trace), "prompts_sha256": sha256(prompts),
            "time_scale": time_scale, "duration_cut_s": duration,
            "num_requests": len(reqs), "span_s": times[-1] - times[0], "output_len_rule": output_len,
            "output_len": rule.describe(), "ignore_eos": rule.ignore_eos, "seed": seed,
            "mean_output_tokens": float(np.mean(lengths))}
    return Workload(reqs, desc)
