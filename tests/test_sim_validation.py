"""benchmarks/sim_validation.py on hand-built summaries: errors, tolerance, ranking and the noise
floor from a repeat of the real run."""

import json
from pathlib import Path

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def validation():
    return load_benchmark("sim_validation")


def summary(folder: Path, figures: dict[str, tuple[float, float, float, float]]) -> Path:
    """A results folder with summary.json: policy -> (mean TPOT, P99 TPOT, tok/s, attainment), level 1."""
    runs = [{"policy": p, "level": 1.0, "tpot_ms": {"mean": m, "p99": p99}, "output_throughput": tps,
             "slo": {"attainment": att}} for p, (m, p99, tps, att) in figures.items()]
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"meta": {"command": f"made for {folder.name}"},
                                                     "runs": runs}))
    return folder


def test_errors_tolerance_and_ranking(validation, tmp_path):
    real = validation.load(summary(tmp_path / "real", {"a": (10, 20, 100, 0.9), "b": (20, 30, 50, 0.5)}))[1]
    sim = validation.load(summary(tmp_path / "sim", {"a": (11, 20, 100, 0.7), "b": (8, 30, 50, 0.5)}))[1]
    res = validation.compare(real, sim, 0.15)
    rows = {r["policy"]: r for r in res["rows"]}
    assert rows["a"]["tpot_mean_ms"]["error"] == pytest.approx(0.1) and rows["a"]["tpot_mean_ms"]["within"]
    assert rows["a"]["slo_attainment"]["error"] == pytest.approx(0.2)  # absolute, not relative
    assert not rows["a"]["slo_attainment"]["within"]
    assert rows["b"]["tpot_mean_ms"]["error"] == pytest.approx(0.6)
    assert not rows["b"]["tpot_mean_ms"]["within"]
    assert res["ranking"]["1.0"] == {"real": ["a", "b"], "sim": ["b", "a"], "same": False,
                                     "swapped_pairs": 1, "pairs": 1}


def test_repeat_gives_the_noise_floor(validation, tmp_path):
    real = summary(tmp_path / "real", {"a": (10, 20, 100, 0.9), "b": (20, 30, 50, 0.5)})
    sim = summary(tmp_path / "sim", {"a": (10, 20, 100, 0.9), "b": (21, 30, 50, 0.5)})
    again = summary(tmp_path / "again", {"a": (14, 20, 100, 0.9), "b": (20, 30, 50, 0.5)})
    out = tmp_path / "report"
    assert validation.main([str(real), str(sim), "--repeat", str(again), "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["repeat"]["rows"][0]["tpot_mean_ms"]["error"] == pytest.approx(0.4)
    md = out.with_suffix(".md").read_text()
    assert "Simulation against the real run: 8 of 8 figures within tolerance" in md
    assert "noise floor): 7 of 8 figures within tolerance" in md
    assert "| a | 1.0 | 10.0 / 10.0 (0%) [40% !] |" in md
