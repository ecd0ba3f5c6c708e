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
    rc = main(["bench", "sweep", "--policies", "none,static:2", "--model", str(target), "--draft-model",
               str(draft), *SERVER, "--prompts", "synthetic:4", "--trace", str(trace), "--duration", "2",
               "--rate-scale", "1,2", "--output-len", "fixed:6", "--slo-tpot-ms", "auto:2", "--warmup", "1",
               "--output-dir", str(out), "--quiet"])
    assert rc == 0
    for name in ("report.md", "summary.json", "summary.csv", "requests.jsonl", "tpot_cdf.png",
                 "slo_vs_level.png", "timeline.png", "server-none.log", "server-static-2.log"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4  # policies x rate scales x requests (the 9 s arrival is cut)
    assert all(r["success"] and r["output_tokens"] == 6 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    meta, runs = summary["meta"], summary["runs"]
    assert [(r["policy"], r["level"]) for r in runs] == [("none", 1.0), ("none", 2.0), ("static:2", 1.0),
                                                         ("static:2", 2.0)]
    assert all(r["server_policy"] == r["policy"] for r in runs)
    assert meta["slo"]["tpot_ms"] > 0 and meta["server_threads"] == 1
    assert meta["workload"]["num_requests"] == 4 and "time scale 1.0" in meta["workload"]["arrivals"]
    assert meta["models"]["target"]["path"] == str(target) and meta["adaspec_version"]
    assert meta["policies"]["static:2"]["k"] == 2
    none, static = runs[0], runs[2]
    assert none["spec"]["drafted"] == 0 and static["spec"]["drafted"] > 0
    assert 1.0 <= static["spec"]["acceptance_length"] <= 3.0
    assert 0 <= static["slo"]["attainment"] <= 1 and none["completed"] == 4
    # rate scale 2 halves the arrival gaps of the same requests
    by = {(r["policy"], r["level"], r["index"]): r for r in rows}
    assert by[("none", 2.0, 3)]["scheduled"] == pytest.approx(by[("none", 1.0, 3)]["scheduled"] / 2)
    with (out / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [t["policy"] for t in table] == ["none", "none", "static:2", "static:2"]
    report = (out / "report.md").read_text()
    for text in ("fixed 6 tokens per request (ignore_eos=true)", "commit", "![TPOT CDF", "rate scale",
                 str(trace), "| static:2 | 2 |"):
        assert text in report, text


@pytest.mark.slow
def test_demo_on_tiny_pair(tiny_pair, tmp_path, capsys):
    target, draft, _ = tiny_pair
    rc = main(["demo", "--model", str(target), "--draft-model", str(draft), "--policies", "none",
               "--arrivals", "phases:4@0.5,16@0.25", "--num-requests", "5", "--output-len", "fixed:5",
               "--max-model-len", "128", "--num-speculative-tokens", "4", "--threads", "1",
               "--output-dir", str(tmp_path / "demo"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "TPOT SLO" in out and "5/5" in out and "timeline.png" in out
    assert (tmp_path / "demo" / "timeline.png").stat().st_size > 0
