"""End to end on the tiny pair: `adaspec bench sweep` starts one `adaspec serve` process per policy
on loopback, replays a trace and writes the results folder; `adaspec demo` does the same for its
bursty synthetic workload."""

from __future__ import annotations

import csv
import json

import pytest

from adaspec.cli import main

SERVER = ["--max-model-len", "128", "--num-speculative-tokens", "4", "--max-num-seqs", "8", "--threads", "1"]


@pytest.mark.slow
def test_sweep_two_policies_writes_report(tiny_pair, tmp_path):
    target, draft, _ = tiny_pair
    trace = tmp_path / "trace.csv"
    trace.write_text("Timestamp\n3.0\n3.1\n3.3\n3.35\n9.0\n")
    out = tmp_path / "res"
    rc = main(["bench", "sweep", "--policies", "none,static:9,static:2", "--model", str(target),
               "--draft-model", str(draft), *SERVER, "--prompts", "synthetic:4", "--trace", str(trace),
               "--duration", "2", "--rate-scale", "0.5,1", "--output-len", "fixed:6",
               "--slo-tpot-ms", "auto:2", "--warmup", "1", "--output-dir", str(out), "--quiet"])
    assert rc == 1  # static:9 (k > K) could not start; the other two still ran and are reported
    for name in ("report.md", "summary.json", "summary.csv", "requests.jsonl", "tpot_cdf.png",
                 "slo_vs_level.png", "timeline.png", "server-none.log", "server-static-2.log",
                 "server-static-9.log", "telemetry-none.jsonl", "telemetry-static_2.jsonl"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4  # policies x rate scales x requests (the 9 s arrival is cut)
    assert all(r["success"] and r["output_tokens"] == 6 for r in rows)
    # each request's id is the server's, and the prompts prefilled alone carry that prefill's time
    # from the server's telemetry (the report's machine-speed check)
    telemetry = [json.loads(x) for x in (out / "telemetry-none.jsonl").read_text().splitlines()]
    alone = {t["request_ids"][0]: t["verify_time"] for t in telemetry
             if t["kind"] == "prefill" and t["batch_size"] == 1}
    mine = [r for r in rows if r["policy"] == "none"]
    assert all(r["request_id"].startswith("cmpl-") for r in rows) and alone
    timed = {r["request_id"]: r["prefill_s"] for r in mine if r["request_id"] in alone}
    assert timed and timed == {i: alone[i] for i in timed}  # alone also holds the warm-up's
    assert all(r["prefill_s"] is None for r in mine if r["request_id"] not in alone)
    assert all("host_speed" in r for r in json.loads((out / "summary.json").read_text())["runs"])
    summary = json.loads((out / "summary.json").read_text())
    meta, runs = summary["meta"], summary["runs"]
    assert [(r["policy"], r["level"]) for r in runs] == [("none", 0.5), ("none", 1.0), ("static:2", 0.5),
                                                         ("static:2", 1.0)]
    assert all(r["server_policy"] == r["policy"] for r in runs)
    assert meta["slo"]["tpot_ms"] > 0 and meta["server_threads"] == 1
    assert meta["workload"]["num_requests"] == 4 and "time scale 1.0" in meta["workload"]["arrivals"]
    assert meta["models"]["target"]["path"] == str(target) and meta["adaspec_version"]
    assert meta["policies"]["static:2"]["k"] == 2
    assert list(meta["failed_policies"]) == ["static:9"]  # k > K: its server exits, the sweep goes on
    none, static = runs[0], runs[2]
    assert none["spec"]["drafted"] == 0 and static["spec"]["drafted"] > 0
    assert 1.0 <= static["spec"]["acceptance_length"] <= 3.0
    assert 0 <= static["slo"]["attainment"] <= 1 and none["completed"] == 4
    # rate scale 0.5 doubles the arrival gaps of the same requests
    by = {(r["policy"], r["level"], r["index"]): r for r in rows}
    assert by[("none", 0.5, 3)]["scheduled"] == pytest.approx(by[("none", 1.0, 3)]["scheduled"] * 2)
    with (out / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["policy"] for t in table] == ["none", "none", "static:2", "static:2"]
    report = (out / "report.md").read_text()
    for text in ("fixed 6 tokens per request (ignore_eos=true)", "commit", "![TPOT CDF", "rate scale",
                 str(trace), "| static:2 | 0.5 |", "did not start"):
        assert text in report, text


@pytest.mark.slow
def test_sweep_repeats_rotate_policies_and_share_the_slo(tiny_pair, tmp_path):
    """--repeats 2: each repeat in its own folder with the policy order rotated, one auto SLO for
    both (resolved by the first), and repeats.md pooling them."""
    target, draft, _ = tiny_pair
    out = tmp_path / "rep"
    rc = main(["bench", "sweep", "--policies", "none,static:2", "--model", str(target),
               "--draft-model", str(draft), *SERVER, "--prompts", "synthetic:3", "--arrivals", "poisson:20",
               "--num-requests", "3",
               "--output-len", "fixed:4", "--slo-tpot-ms", "auto:2", "--warmup", "1", "--repeats", "2",
               "--output-dir", str(out), "--quiet"])
    assert rc == 0
    summaries = [json.loads((out / r / "summary.json").read_text()) for r in ("r1", "r2")]
    orders = [[run["policy"] for run in s["runs"]] for s in summaries]
    assert orders == [["none", "static:2"], ["static:2", "none"]]
    assert summaries[0]["meta"]["slo"]["tpot_ms"] == summaries[1]["meta"]["slo"]["tpot_ms"] > 0
    pooled = (out / "repeats.md").read_text()
    assert "`" + str(out / "r1") + "`" in pooled and "| static:2 |" in pooled
    assert all(r["repeats"] == 2 for r in json.loads((out / "repeats.json").read_text()))


@pytest.mark.slow
def test_demo_on_tiny_pair(tiny_pair, tmp_path, capsys):
    target, draft, _ = tiny_pair
    rc = main(["demo", "--model", str(target), "--draft-model", str(draft), "--policies", "none",
               "--arrivals", "phases:4@0.5,16@0.25", "--num-requests", "5", "--output-len", "fixed:5",
               "--max-model-len", "128", "--num-speculative-tokens", "4", "--threads", "1",
               "--output-dir", str(tmp_path / "demo"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "TPOT SLO" in out and "none 5/5" in out and "timeline.png" in out
    assert (tmp_path / "demo" / "timeline.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_run_against_a_running_server(tiny_pair, tmp_path):
    """`bench run` on an in-process server: the client's latencies bound the server's own."""
    from adaspec.llm import build_engine
    from adaspec.server import create_app
    from adaspec.server.serve import serve_in_thread

    target, draft, _ = tiny_pair
    eng = build_engine(str(target), str(draft), policy="static:2", num_speculative_tokens=4, max_num_seqs=4,
                       max_model_len=128)
    out = tmp_path / "run"
    with serve_in_thread(create_app(eng, ["tiny"])) as url:
        rc = main(["bench", "run", "--base-url", url, "--model", str(target), "--mode", "closed",
                   "--concurrency", "2", "--prompts", "synthetic:4", "--num-requests", "4", "--output-len",
                   "fixed:5", "--slo-tpot-ms", "60000", "--warmup", "0", "--output-dir", str(out), "--quiet"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["policy"] == "static:2" and r["success"] for r in rows)
    for r in rows:
        srv = r["server_slo"]
        assert r["ttft"] * 1e3 >= srv["measured_ttft_ms"] and r["e2e"] * 1e3 >= srv["measured_e2e_ms"]
        assert srv["tpot_ms"] == 60000 and srv["met"] is True
        assert r["spec_stats"]["steps"] >= 1 and sum(r["chunk_tokens"]) == pytest.approx(5)
    run = json.loads((out / "summary.json").read_text())["runs"][0]
    assert run["slo"]["attainment"] == 1.0 and run["completed"] == 4
    assert "already running at" in (out / "report.md").read_text()
