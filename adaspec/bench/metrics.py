"""Serving metrics, with the formulas of vLLM's benchmark_serving so numbers compare.

TTFT = send -> first non-empty chunk. E2E = send -> end of stream. TPOT = (E2E - TTFT) / (tokens - 1)
over successful requests with more than one token. ITL = gaps between content chunks; since one
chunk carries several tokens under speculation, ITL per token divides each gap by the tokens that
chunk carried. Throughputs divide by the run's duration (first scheduled send to last finish).
SLO attainment = requests meeting every set objective / all requests (failed ones miss); a 1-token
request has TPOT 0 for the SLO check, as in vLLM's goodput. Request goodput = those requests / s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds (`scheduled`/`sent` from the run start,
    `chunk_times` from this request's send)."""

    index: int
    scheduled: float
    sent: float = 0.0
    category: str = ""
    max_tokens: int = 0
    success: bool = False
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[float] = field(default_factory=list)  # tokens each content chunk carried (est.)
    finish_reason: str | None = None
    spec_stats: dict | None = None
    server_slo: dict | None = None
    text: str = ""
    request_id: str | None = None  # the server's completion id (its telemetry's request id)
    # The server's target forward for this request's prompt when it was prefilled alone (from its
    # telemetry): the same work under every policy, so it measures the machine (`host_speed`).
    prefill_s: float | None = None

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens <= 1 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def itl_per_token(self) -> list[float]:
        """Each gap divided by the tokens its chunk carried, once per such token."""
        out: list[float] = []
        for gap, n in zip(self.itl, self.chunk_tokens[1:], strict=False):
            k = max(1, round(n))
            out += [gap / k] * k
        return out

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(tpot=self.tpot, itl=self.itl)
        return d


def meets_slo(r: RequestResult, ttft_slo: float | None, tpot_slo: float | None) -> bool:
    """Every set objective met (seconds); a failed request never meets it."""
    if not r.success:
        return False
    if ttft_slo is not None and (r.ttft is None or r.ttft > ttft_slo):
        return False
    tpot = r.tpot if r.tpot is not None else 0.0  # 1-token outputs: TPOT 0, as vLLM's goodput
    return tpot_slo is None or tpot <= tpot_slo


def dist(values: list[float], scale: float = 1e3) -> dict:
    """mean, median, p90, p99 (ms by default); NaN-free: an empty list gives None."""
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=float) * scale
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def sign_test(wins: int, n: int) -> float:
    """Two-sided binomial sign test: the chance of a split at least this uneven under p = 1/2."""
    if n == 0:
        return 1.0
    k = min(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_ratio(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> dict | None:
    """A against B measured in pairs (a[i] and b[i] in the same repeat, minutes apart): on a shared
    machine whose speed drifts by more than the difference between policies, the ratio within each
    pair cancels most of the drift. Geometric mean of a[i] / b[i], its 95% percentile-bootstrap
    interval (seeded, so a report is reproducible), the pairs where A was lower, and the sign test.
    None without a positive pair."""
    logs = np.log([x / y for x, y in zip(a, b, strict=False) if x > 0 and y > 0])
    if not logs.size:
        return None
    means = np.random.default_rng(seed).choice(logs, size=(resamples, logs.size)).mean(axis=1)
    wins = int((logs < 0).sum())
    return {"pairs": int(logs.size), "lower": wins, "geomean": float(np.exp(logs.mean())),
            "ci95": [float(np.exp(np.percentile(means, 2.5))), float(np.exp(np.percentile(means, 97.5)))],
            "min": float(np.exp(logs.min())), "max": float(np.exp(logs.max())),
            "sign_test_p": sign_test(wins, int(logs.size))}


def spec_summary(results: list[RequestResult]) -> dict:
    """Acceptance statistics pooled over tokens and averaged over requests, plus per position."""
    st = [r.spec_stats for r in results if r.success and r.spec_stats]
    drafted = sum(s["drafted"] for s in st)
    accepted = sum(s["accepted"] for s in st)
    steps = sum(s["steps"] for s in st)
    per_req_rate = [s["accepted"] / s["drafted"] for s in st if s["drafted"]]
    per_req_len = [1 + s["accepted"] / s["steps"] for s in st if s["steps"]]
    per_req_spec = [s["drafted"] / s["steps"] for s in st if s["steps"]]
    width = max((len(s.get("drafted_per_position") or []) for s in st), default=0)
    pos_d = [sum(_at(s, "drafted_per_position", j) for s in st) for j in range(width)]
    pos_a = [sum(_at(s, "accepted_per_position", j) for s in st) for j in range(width)]
    return {
        "drafted": drafted, "accepted": accepted, "steps": steps,
        "acceptance_rate": _ratio(accepted, drafted),
        "acceptance_length": 1 + accepted / steps if steps else None,
        "mean_spec_length": _ratio(drafted, steps),
        "acceptance_rate_per_request": float(np.mean(per_req_rate)) if per_req_rate else None,
        "acceptance_length_per_request": float(np.mean(per_req_len)) if per_req_len else None,
        "mean_spec_length_per_request": float(np.mean(per_req_spec)) if per_req_spec else None,
        "acceptance_per_position": [_ratio(a, d) for a, d in zip(pos_a, pos_d, strict=True)],
    }


def _at(s: dict, key: str, j: int) -> int:
    v = s.get(key) or []
    return v[j] if j < len(v) else 0


def summarize(results: list[RequestResult], duration: float, ttft_slo_ms: float | None = None,
              tpot_slo_ms: float | None = None) -> dict:
    """The run's summary (latencies in ms, throughputs per second) from per-request results."""
    ok = [r for r in results if r.success]
    ttft_slo = None if ttft_slo_ms is None else ttft_slo_ms / 1e3
    tpot_slo = None if tpot_slo_ms is None else tpot_slo_ms / 1e3
    good = [r for r in results if meets_slo(r, ttft_slo, tpot_slo)]
    has_slo = ttft_slo is not None or tpot_slo is not None
    out_tokens = sum(r.output_tokens for r in ok)
    lag = [r.sent - r.scheduled for r in results]
    return {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_throughput": out_tokens / duration if duration > 0 else None,
        "ttft_ms": dist([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": dist([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": dist([g for r in ok for g in r.itl]),
        "itl_per_token_ms": dist([g for r in ok for g in r.itl_per_token]),
        "e2e_ms": dist([r.e2e for r in ok if r.e2e is not None]),
        "slo": {"ttft_ms": ttft_slo_ms, "tpot_ms": tpot_slo_ms,
                "attainment": len(good) / len(results) if has_slo and results else None,
                "goodput": len(good) / duration if has_slo and duration > 0 else None,
                "met": len(good) if has_slo else None},
        "spec": spec_summary(results),
        "send_lag_ms": {"max": max(lag) * 1e3 if lag else None,
                        "mean": float(np.mean(lag)) * 1e3 if lag else None},
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def host_speed(prefills: dict, min_common: int = 10) -> dict:
    """How fast the machine ran during each run, from work every policy does alike: each run's median
    over prompts of its prefill time / that prompt's median over all runs (`prefills`: run key ->
    {request index: prefill seconds}; prompts timed in at least two runs). 1.25: the same prompts
    took 25% longer than usual, so that run's latencies are inflated by a slow machine, not only by
    its policy (session 18: one policy's prefills ran 25-40% slower than the others' in a sweep of
    three). A run with fewer than `min_common` such prompts gets None."""
    by_index: dict = {}
    for times in prefills.values():
        for i, t in times.items():
            if t and t > 0:
                by_index.setdefault(i, []).append(t)
    ref = {i: float(np.median(v)) for i, v in by_index.items() if len(v) >= 2}
    out = {}
    for key, times in prefills.items():
        ratios = [t / ref[i] for i, t in times.items() if i in ref and t and t > 0]
        out[key] = ({"relative": float(np.median(ratios)), "prompts": len(ratios)}
                    if len(ratios) >= min_common else None)
    return out


def timeline(results: list[RequestResult], duration: float, bin_s: float | None = None) -> dict:
    """Arrivals (req/s) and output throughput (tok/s) per time bin of the run, from the client."""
    bin_s = bin_s or max(1.0, duration / 60)
    n = max(1, math.ceil(duration / bin_s))
    arrivals, tokens = np.zeros(n), np.zeros(n)
    for r in results:
        arrivals[min(int(r.scheduled / bin_s), n - 1)] += 1
        for t, k in zip(r.chunk_times, r.chunk_tokens, strict=False):
            tokens[min(int((r.sent + t) / bin_s), n - 1)] += k
    return {"bin_s": bin_s, "t": [(i + 0.5) * bin_s for i in range(n)],
            "arrival_rate": (arrivals / bin_s).tolist(), "output_throughput": (tokens / bin_s).tolist()}
