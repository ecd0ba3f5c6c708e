"""benchmarks/paired_ratios.py: per-repeat ratios pooled over reports, and the sign test."""

import json
import math
from pathlib import Path

import pytest
from conftest import load_benchmark

from adaspec.bench.metrics import paired_ratio, sign_test


@pytest.fixture(scope="module")
def paired():
    return load_benchmark("paired_ratios")


def report(path: Path, prompts: str, by_policy: dict[str, list[float]], c: int = 16) -> Path:
    results = [{"policy": p, "concurrency": c, "tpot_mean_by_repeat_ms": t} for p, t in by_policy.items()]
    path.write_text(json.dumps({"meta": {"prompts": prompts}, "results": results}))
    return path


def test_sign_test():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == pytest.approx(2 / 32)
    assert sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_test(2, 4) == 1.0
    assert sign_test(9, 10) == pytest.approx(2 * 11 / 1024)


def test_paired_ratio_interval():
    a, b = [9.0, 10.0, 11.0, 12.0, 8.0, 10.0], [10.0] * 6
    r = paired_ratio(a, b)
    assert r["pairs"] == 6 and r["lower"] == 2
    assert r["geomean"] == pytest.approx(math.prod(x / 10 for x in a) ** (1 / 6))
    lo, hi = r["ci95"]
    assert r["min"] <= lo < r["geomean"] < hi <= r["max"]
    assert paired_ratio(a, b) == r  # seeded
    same = paired_ratio([7.0] * 4, [7.0] * 4)
    assert same["ci95"] == [pytest.approx(1.0), pytest.approx(1.0)] and same["lower"] == 0
    assert paired_ratio([], []) is None


def test_ratios_pool_by_prompt_set_and_concurrency(paired, tmp_path):
    one = report(tmp_path / "one.json", "/x/prompts.jsonl", {"a": [10, 30], "b": [20, 20]})
    two = report(tmp_path / "two.json", "/y/prompts.jsonl", {"a": [5], "b": [10], "c": [1]})
    other = report(tmp_path / "other.json", "/x/spec.jsonl", {"a": [12], "c": [6]})  # no b: skipped
    rows = paired.summarise([one, two, other], "a", "b")
    assert len(rows) == 1
    r = rows[0]
    assert (r["prompts"], r["concurrency"], r["pairs"], r["lower"]) == ("prompts", 16, 3, 2)
    assert r["geomean"] == pytest.approx((0.5 * 1.5 * 0.5) ** (1 / 3))
    assert (r["min"], r["max"]) == (pytest.approx(0.5), pytest.approx(1.5))
    with pytest.raises(SystemExit, match="not a policies_closed_loop.py report"):
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        paired.summarise([bad], "a", "b")
