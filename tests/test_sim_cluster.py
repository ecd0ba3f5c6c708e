"""Replicas behind the least-loaded router: where requests go, that one replica is the plain
simulator, that more replicas help on the same draws, rate rescaling, and `adaspec capacity`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adaspec.bench.metrics import summarize
from adaspec.bench.workload import BenchRequest, build_workload
from adaspec.sim.acceptance_sim import AcceptanceSpec, Draws
from adaspec.sim.cluster import Cluster, capacity_curve, max_rate_meeting, requests_at_rate
from adaspec.sim.hardware import pair_cost_model
from adaspec.sim.simulator import SimConfig, Simulator
from adaspec.spec.cost_model import CostModel


class AllMatch:
    def draw(self, key, category, n, seed=0):
        return Draws(1.0, np.ones(n, dtype=bool), np.full(n, 0.9))


def req(i, arrival, max_tokens=7, prompt="x" * 40):
    return BenchRequest(i, prompt, "qa", max_tokens, True, arrival)


def test_router_sends_each_request_to_the_replica_with_fewest_outstanding():
    """10 ms per step, policy none. r0 (long) -> replica 0; r1 -> 1 (0 has one open), whose idle
    clock jumps to 1 ms: r1 ends at 21 ms. r4 arrives at 20 ms, r0 and r1 both open: tie, lowest
    index -> 0. At 0.5 s only r0 is open (on 0): r2 -> 1; r3 then sees 1 and 1: tie -> 0."""
    cm = CostModel.linear(draft_step=0.001, verify_step=0.010)
    cluster = Cluster(cm, AllMatch(), SimConfig(), replicas=2)
    reqs = [req(0, 0.0, 200), req(1, 0.001, 2), req(4, 0.020, 2), req(2, 0.5, 5), req(3, 0.5, 5)]
    res = cluster.run("none", reqs)
    assert [r.index for r in res.results] == [0, 1, 2, 3, 4]
    assert res.assignment == [0, 1, 1, 0, 0]
    assert all(r.success for r in res.results)
    r1 = res.results[1]
    assert r1.ttft == pytest.approx(0.010) and r1.e2e == pytest.approx(0.020)


def test_a_request_finishing_after_the_arrival_still_counts_as_outstanding():
    """r0 finishes at 20 ms, mid-way past r1's arrival at 15 ms: r1 must see it open and go to 1."""
    cm = CostModel.linear(draft_step=0.001, verify_step=0.010)
    res = Cluster(cm, AllMatch(), SimConfig(), replicas=2).run("none", [req(0, 0.0, 2), req(1, 0.015, 2)])
    assert res.assignment == [0, 1]
    res = Cluster(cm, AllMatch(), SimConfig(), replicas=2).run("none", [req(0, 0.0, 2), req(1, 0.020, 2)])
    assert res.assignment == [0, 0]  # finished at exactly 20 ms: no longer outstanding


@pytest.mark.parametrize("policy", ["none", "static:3", "smartspec", "adaspec", "oracle"])
def test_one_replica_is_the_plain_simulator(policy):
    wl = build_workload("synthetic:16", arrivals="gamma:30:2", num_requests=40, output_len="sampled:48")
    cm = pair_cost_model("L40", "vicuna-7b/vicuna-68m")
    cfg = SimConfig(max_num_seqs=8, slo_tpot_ms=40, time_noise=0.1)
    plain = Simulator(cm, AcceptanceSpec(), cfg).run(policy, wl.requests)
    one = Cluster(cm, AcceptanceSpec(), cfg, replicas=1).run(policy, wl.requests)
    assert one.assignment == [0] * 40
    assert [r.as_dict() for r in one.results] == [r.as_dict() for r in plain.results]
    assert [vars(s) for s in one.steps] == [vars(s) for s in plain.steps]
    assert one.duration == plain.duration and one.series == plain.series


def test_more_replicas_never_lower_attainment_on_the_same_draws():
    """Step time grows with the batch (10 ms + 5 ms per row); a burst of 12 requests: one replica
    runs them 12 wide and misses a 45 ms TPOT, more replicas split the burst."""
    cm = CostModel.linear(draft_step=0.001, verify_step=0.010, verify_per_row=0.005)
    reqs = [req(i, 0.002 * i, 20 + 3 * i) for i in range(12)]
    cfg = SimConfig(slo_tpot_ms=45)
    for policy in ["none", "static:2"]:
        att = []
        for n in [1, 2, 3, 4, 6]:
            res = Cluster(cm, AcceptanceSpec(mean=0.6), cfg, replicas=n).run(policy, reqs)
            assert all(r.success for r in res.results) and len(set(res.assignment)) == n
            att.append(summarize(res.results, res.duration, None, 45)["slo"]["attainment"])
        assert att == sorted(att) and att[-1] > att[0], (policy, att)


def test_requests_at_rate_keeps_the_pattern_and_fills_the_window():
    reqs = [req(i, 10.0 + 2.0 * t, 4) for i, t in enumerate([0, 1, 3, 4, 8])]
    two = requests_at_rate(reqs, 1.0, 2.0)  # 2 requests; the third would land at 2 s
    assert [r.arrival for r in two] == pytest.approx([0, 2 / 3]) and [r.index for r in two] == [0, 1]
    four = requests_at_rate(reqs, 0.5, 8.0)  # 4 requests; the fifth (at 16 s) lands at 8 s
    assert [r.arrival for r in four] == pytest.approx([0, 1, 3, 4])
    with pytest.raises(ValueError, match="needs 6 arrivals"):
        requests_at_rate(reqs, 1.0, 5.0)


def test_capacity_curve_stops_after_attainment_falls_and_reports_capacity():
    cm = CostModel.linear(draft_step=0.001, verify_step=0.010, verify_per_row=0.005)
    reqs = [req(i, 0.1 * i, 30) for i in range(200)]
    cfg = SimConfig(slo_tpot_ms=30, max_num_seqs=8)
    pts = capacity_curve(cm, AcceptanceSpec(), cfg, reqs, ["none"], [1, 2], [1, 2, 4, 8, 16], 4.0,
                         stop_below=0.5)
    by = {(p.replicas, p.rate): p.summary["slo"]["attainment"] for p in pts}
    for n in (1, 2):
        run = sorted(r for m, r in by if m == n)
        assert by[(n, run[-1])] < 0.5 and all(by[(n, r)] >= 0.5 for r in run[:-1])  # stops at a miss
    assert (1, 16) not in by and (2, 16) in by
    assert max_rate_meeting(pts, "none", 1, 0.5) == 4 and max_rate_meeting(pts, "none", 2, 0.5) == 8
    assert all(sum(p.per_replica) == p.summary["num_requests"] for p in pts)


@pytest.mark.slow
def test_cli_capacity_writes_table_plot_and_json(tmp_path):
    from adaspec.cli import main

    out = tmp_path / "cap"
    rc = main(["capacity", "--prompts", "synthetic:8", "--arrivals", "poisson:5", "--num-requests", "200",
               "--output-len", "fixed:24", "--policies", "none,static:2", "--replicas", "1,2",
               "--rates", "5,40", "--window", "3", "--slo-tpot-ms", "auto:1.5",
               "--cost-model", "analytic:L40:vicuna-7b/vicuna-68m", "--output-dir", str(out), "--quiet"])
    assert rc == 0
    data = json.loads((out / "capacity.json").read_text())
    assert [(p["policy"], p["replicas"], p["rate"]) for p in data["points"]] == [
        ("none", 1, 5), ("none", 1, 40), ("none", 2, 5), ("none", 2, 40),
        ("static:2", 1, 5), ("static:2", 1, 40), ("static:2", 2, 5), ("static:2", 2, 40)]
    assert data["meta"]["slo_tpot_ms"] > 0 and "lone requests under none" in data["meta"]["slo_note"]
    text = (out / "capacity.md").read_text()
    assert "| replicas | capacity (req/s) |" in text and "| 2 |" in text and (out / "capacity.png").exists()
    assert main(["capacity", "--rates", "5", "--output-dir", str(out)]) == 2  # no SLO: a clear error
