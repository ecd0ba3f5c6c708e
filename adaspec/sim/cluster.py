"""Several simulated replicas behind a least-loaded router, and the capacity curve built on it.

Each replica is a whole `Simulator` (the engine's scheduler, KV budget and its own copy of the
policy); the cluster only decides where each request goes. Routing is least-outstanding: at a
request's arrival time, every replica is advanced to that time and the request goes to the one
with the fewest requests sent to it and not yet finished (ties: the lowest index), which is what a
load balancer that counts open streams sees. Requests keep their index, so acceptance draws are the
same whichever replica serves them and whatever the number of replicas: comparisons stay paired.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from adaspec.bench.metrics import summarize
from adaspec.bench.workload import BenchRequest
from adaspec.sim.acceptance_sim import AcceptanceSpec
from adaspec.sim.simulator import SimConfig, SimResult, Simulator, series
from adaspec.spec.cost_model import CostModel
from adaspec.spec.policy import Policy


class Cluster:
    """`replicas` copies of one server (same cost model, acceptance model and config)."""

    def __init__(self, truth: CostModel, acceptance: AcceptanceSpec, config: SimConfig | None = None,
                 replicas: int = 1, policy_cost: CostModel | None = None):
        if replicas < 1:
            raise ValueError(f"a cluster needs at least 1 replica, got {replicas}")
        self.replicas = [Simulator(truth, acceptance, config, policy_cost, stream=i) for i in range(replicas)]

    def route(self, t: float) -> int:
        """The replica a request arriving at `t` goes to (replicas already advanced to `t`)."""
        return min(range(len(self.replicas)), key=lambda j: (self.replicas[j].outstanding(t), j))

    def run(self, policy: str | Policy, requests: list[BenchRequest]) -> SimResult:
        """All requests through the router; results merged in request order, `assignment` names
        each one's replica. With one replica this is `Simulator.run` step for step."""
        wall = time.perf_counter()
        for sim in self.replicas:
            sim.start(policy)
        where: dict[int, int] = {}
        for r in sorted(requests, key=lambda r: (r.arrival, r.index)):
            for sim in self.replicas:
                sim.advance(r.arrival)
            where[r.index] = j = self.route(r.arrival)
            self.replicas[j].add(r)
        parts = []
        for sim in self.replicas:
            sim.advance(float("inf"))
            parts.append(sim.result())
        results = sorted((r for p in parts for r in p.results), key=lambda r: r.index)
        duration = max((p.duration for p in parts), default=0.0)
        steps = sorted((s for p in parts for s in p.steps), key=lambda s: s.start)
        log = [e for sim in self.replicas for e in sim._spec_log]
        return SimResult(parts[0].policy, results, duration, steps, series(log, duration),
                         time.perf_counter() - wall, [where[r.index] for r in results])


def requests_at_rate(requests: list[BenchRequest], rate: float, window: float) -> list[BenchRequest]:
    """`window` seconds of the arrival pattern offered at `rate` req/s on average: the first
    round(rate x window) requests, their times scaled by one factor so that the next arrival would
    land at `window`. The pattern's bursts keep their shape; only its speed changes."""
    if rate <= 0 or window <= 0:
        raise ValueError("rate and window must be > 0")
    reqs = sorted(requests, key=lambda r: (r.arrival, r.index))
    n = max(1, round(rate * window))
    if n >= len(reqs):
        raise ValueError(f"{rate:g} req/s for {window:g} s needs {n + 1} arrivals, the pattern has "
                         f"{len(reqs)} (more requests, a longer trace or a shorter window)")
    t0, span = reqs[0].arrival, reqs[n].arrival - reqs[0].arrival
    if span <= 0:
        raise ValueError("scaling to a rate needs arrivals at different times")
    return [BenchRequest(**{**r.as_dict(), "arrival": (r.arrival - t0) * window / span}) for r in reqs[:n]]


@dataclass
class CapacityPoint:
    policy: str
    replicas: int
    rate: float
    summary: dict  # `bench.metrics.summarize` of the run
    per_replica: list[int]  # requests each replica served
    wall_s: float


def capacity_curve(truth: CostModel, acceptance: AcceptanceSpec, config: SimConfig,
                   requests: list[BenchRequest], policies: list[str], replica_counts: list[int],
                   rates: list[float], window: float, stop_below: float = 0.0,
                   progress=None) -> list[CapacityPoint]:
    """SLO attainment (and the rest of the summary) per policy, replica count and offered rate.
    Rates run in increasing order; once attainment falls below `stop_below`, the higher rates of
    that policy and replica count are skipped (they only cost time; 0 runs them all)."""
    out = []
    for policy in policies:
        for n in replica_counts:
            cluster = Cluster(truth, acceptance, config, n)
            for rate in sorted(rates):
                reqs = requests_at_rate(requests, rate, window)
                res = cluster.run(policy, reqs)
                s = summarize(res.results, res.duration, config.slo_ttft_ms, config.slo_tpot_ms)
                point = CapacityPoint(policy, n, rate, s, [res.assignment.count(j) for j in range(n)],
                                      res.wall_s)
                out.append(point)
                if progress:
                    progress(point)
                if (s["slo"]["attainment"] or 0.0) < stop_below:
                    break
    return out


def max_rate_meeting(points: list[CapacityPoint], policy: str, replicas: int, target: float) -> float | None:
    """The highest rate run at which attainment is still >= target, below the first rate that misses
    it (a capacity figure: the load this many replicas carry within the SLO)."""
    best = None
    mine = [p for p in points if p.policy == policy and p.replicas == replicas]
    for p in sorted(mine, key=lambda p: p.rate):
        if (p.summary["slo"]["attainment"] or 0.0) < target:
            break
        best = p.rate
    return best


def capacity_markdown(points: list[CapacityPoint], target: float = 0.9) -> str:
    """Per policy, one row per replica count: its capacity and the attainment at every rate run."""
    lines = []
    for policy in dict.fromkeys(p.policy for p in points):
        lines += [f"`{policy}`: capacity = the highest offered rate run with SLO attainment >= {target:.0%} "
                  "(below the first rate that misses it)", "",
                  "| replicas | capacity (req/s) | per replica | SLO attainment at offered rate (req/s) |",
                  "|---|---|---|---|"]
        for n in sorted({p.replicas for p in points if p.policy == policy}):
            mine = sorted((p for p in points if p.policy == policy and p.replicas == n), key=lambda p: p.rate)
            cap = max_rate_meeting(points, policy, n, target)
            runs = ", ".join(f"{p.rate:.3g}: {p.summary['slo']['attainment']:.2f}" for p in mine)
            lines.append(f"| {n} | {'-' if cap is None else f'{cap:.3g}'} | "
                         f"{'-' if cap is None else f'{cap / n:.3g}'} | {runs} |")
        lines.append("")
    return "\n".join(lines)


def plot_capacity(points: list[CapacityPoint], path, title: str = "", target: float | None = 0.9) -> None:
    """Attainment vs offered rate, one line per replica count (one panel per policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(p.policy for p in points))
    fig, axes = plt.subplots(1, len(policies), figsize=(6.5 * len(policies), 4.2), squeeze=False)
    for ax, policy in zip(axes[0], policies, strict=True):
        pts = [p for p in points if p.policy == policy]
        for n in sorted({p.replicas for p in pts}):
            line = sorted((p.rate, p.summary["slo"]["attainment"] or 0.0) for p in pts if p.replicas == n)
            ax.plot([x for x, _ in line], [y for _, y in line], marker="o", ms=3, label=f"{n} replica(s)")
        if target:
            ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{policy}" + (f" - {title}" if title else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
