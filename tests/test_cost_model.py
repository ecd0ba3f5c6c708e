"""Cost model: fit, extrapolation, step shapes, online correction, persistence, start-up profiling."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch

from adaspec.spec.cost_model import CostModel, ForwardTimeModel, StepShape

GRID = [(b, t, c) for b in (1, 2, 4, 8, 16, 32) for t in (1, 2, 5, 9) for c in (16, 64, 256)]  # like profiler


def cpu_like(b, t, c):
    return 2e-3 + 1e-4 * b + 3e-5 * b * t + 2e-8 * b * t * c


def gpu_like(b, t, c):
    """Flat while memory-bound (up to 64 tokens), then linear in tokens."""
    n = b * t
    return 5e-3 + 1e-4 * max(0, n - 64) + 1e-9 * b * c


def cpu_saturating(b, t, c):
    """Cost per token falls past 80 tokens (a CPU's matrix multiplies get more efficient)."""
    n = b * t
    return 3e-3 + 5e-5 * b + 2.4e-4 * min(n, 80) + 1.2e-4 * max(0, n - 80) + 2e-8 * n * c


@pytest.mark.parametrize("truth", [cpu_like, gpu_like, cpu_saturating])
def test_fit_recovers_curve_and_extrapolates(truth):
    model = ForwardTimeModel.fit([(b, t, c, truth(b, t, c)) for b, t, c in GRID])
    c0, c1, c2, c3, c4, c5 = model.coef
    assert min(c0, c1, c2, c2 + c3, c4, c5) >= 0  # every slope non-negative, below and above the knee
    for b, t, c in GRID + [(64, 9, 512), (128, 9, 1024)]:  # the last two are 2-4x beyond the grid
        assert model.predict(b, t, c) == pytest.approx(truth(b, t, c), rel=0.02), (b, t, c)


def test_fit_is_monotone_and_smooth_past_the_table():
    rng = np.random.default_rng(0)
    samples = [(b, t, c, cpu_like(b, t, c) * rng.uniform(0.8, 1.2)) for b, t, c in GRID]
    model = ForwardTimeModel.fit(samples)
    bs = np.arange(1, 200)
    times = model.predict(bs, 3, 128)
    assert np.all(np.diff(times) >= 0)
    steps = np.diff(times)
    assert steps.max() < 10 * np.median(steps)  # no cliff at the edge of the profiled range (16)
    ts = model.predict(8, np.arange(1, 20), 128)
    assert np.all(np.diff(ts) >= 0)


def test_step_shape_forwards_and_closed_form_time():
    cm = CostModel.linear(draft_step=1.0, verify_step=10.0, verify_per_token=0.5, draft_per_row=0.1)
    shape = StepShape(contexts=[10, 20, 30], lags=[1, 3, 1], drafted=[2, 0, 4], verified=[2, 0, 1])
    forwards = cm.draft_forwards(shape)
    # forward 0 feeds rows 0 and 2 (widest lag 1); then 2 rows, then only row 2 twice
    assert [f[0] for f in forwards] == [2, 2, 1, 1]
    assert forwards[0][1] == 1 and forwards[0][2] == 30
    t = cm.predict(shape)
    assert t.draft == pytest.approx(4 * 1.0 + 0.1 * (2 + 2 + 1 + 1))
    # padded verification: 3 rows of max(verified) + 1 = 3 tokens each
    assert t.verify == pytest.approx(10.0 + 0.5 * 3 * 3)
    packed = CostModel.linear(draft_step=1.0, verify_step=10.0, verify_per_token=0.5, padded=False)
    assert packed.predict(shape).verify == pytest.approx(10.0 + 0.5 * (3 + 2 + 0 + 1))


def test_layouts_price_ragged_forwards():
    """Equal rows cost the same in every layout; ragged ones: padded prices every op at the longest
    row and context, mean at the mean, packed the linear layers by the tokens' sum and attention
    (queries x context) at the longest row and the longest context."""
    coef = [1e-3, 1e-4, 2e-4, 0.0, 1e-6, 2e-7]  # const, rows, tokens, -, rows x context, tokens x context
    models = {lay: CostModel(ForwardTimeModel(coef), ForwardTimeModel(coef), layout=lay)
              for lay in ("padded", "packed", "mean")}
    even = StepShape([100, 100], [1, 1], [3, 3], [3, 3])
    times = [m.predict(even).total for m in models.values()]
    assert times == pytest.approx([times[0]] * 3)
    ragged = StepShape([100, 300], [1, 1], [1, 5], [1, 5])  # verify widths 2 and 6, contexts 101, 305
    b, n, attn = 2, 2 + 6, 2 * 6
    assert models["packed"].predict(ragged).verify == pytest.approx(
        coef[0] + coef[1] * b + coef[2] * n + (coef[4] * b + coef[5] * attn) * 305)
    assert models["padded"].predict(ragged).verify == pytest.approx(
        coef[0] + coef[1] * b + coef[2] * b * 6 + (coef[4] * b + coef[5] * b * 6) * 305)
    assert models["mean"].predict(ragged).verify == pytest.approx(
        coef[0] + coef[1] * b + coef[2] * n + (coef[4] * b + coef[5] * n) * 203)
    assert models["mean"].predict(ragged).verify < models["packed"].predict(ragged).verify \
        < models["padded"].predict(ragged).verify
    with pytest.raises(ValueError, match="layout"):
        CostModel(ForwardTimeModel(coef), ForwardTimeModel(coef), layout="paged")
    back = CostModel.from_dict(models["packed"].to_dict())
    assert back.layout == "packed" and back.predict(ragged).total == models["packed"].predict(ragged).total


def test_no_draft_costs_nothing_to_draft():
    cm = CostModel.linear(draft_step=1.0, verify_step=2.0)
    assert cm.predict(StepShape([5, 6], [4, 4], [0, 0], [0, 0])).draft == 0


def test_slow_first_drafts_do_not_price_drafting_out_for_good():
    """Two slow first speculating steps (first-call work) then plain decoding: the draft's own
    correction needs more evidence than two steps, and one that stopped being fed gives way to the
    machine's factor (the verification's), so the price of drafting comes back."""
    cm = CostModel.linear(draft_step=1e-3, verify_step=1e-2, window=10)
    spec, plain = StepShape([10], [1], [2], [2]), StepShape([10], [1], [0], [0])
    base = cm.predict(spec)
    for _ in range(2):
        cm.observe(spec, 10 * base.draft, base.verify, 10 * base.draft + base.verify)
    assert cm.draft_factor == pytest.approx(1.0)  # two ratios are not enough evidence
    cm.observe(spec, 10 * base.draft, base.verify, 10 * base.draft + base.verify)
    assert cm.draft_factor == pytest.approx(10.0)  # three are
    for _ in range(20):  # no speculation for 2 * window steps: the draft factor is stale
        cm.observe(plain, 0.0, 1.5 * cm.predict(plain, corrected=False).verify, 0.02)
    assert cm.verify_scale.value == pytest.approx(1.5)
    assert cm.draft_factor == pytest.approx(10.0)
    cm.observe(plain, 0.0, 1.5 * cm.predict(plain, corrected=False).verify, 0.02)
    assert cm.draft_factor == pytest.approx(1.5)
    assert cm.predict(spec).draft == pytest.approx(1.5 * base.draft)


def test_online_correction_follows_drift_and_shrugs_off_outliers():
    cm = CostModel.linear(draft_step=1e-3, verify_step=1e-2, window=10)
    shape = StepShape([10, 10], [1, 1], [3, 2], [3, 2])
    base = cm.predict(shape)
    for i in range(30):  # the device got twice as slow (e.g. another process shares the CPU)
        spike = 10 if i == 25 else 1  # one step stalled (a page fault, a context switch)
        cm.observe(shape, 2 * base.draft, 2 * base.verify * spike, 2 * base.total + 1e-3)
    assert cm.draft_scale.value == pytest.approx(2)
    assert cm.verify_scale.value == pytest.approx(2)
    assert cm.predict(shape).total == pytest.approx(2 * base.total + 1e-3, rel=0.02)
    rep = cm.error_report()
    assert rep["steps"] == 30 and rep["mape"] < rep["mape_uncorrected"]
    assert cm.error_report(last=5)["mape"] < 0.05
    for _ in range(10):  # and then faster again
        cm.observe(shape, base.draft / 1.5, base.verify / 1.5, base.total / 1.5)
    assert cm.verify_scale.value == pytest.approx(1 / 1.5)
    cm.reset()
    assert cm.verify_scale.value == 1 and cm.error_report() == {"steps": 0}


def test_online_correction_prices_skewed_step_times_at_their_mean():
    """On a shared machine one step in five runs at half speed: the corrected model prices a run's
    steps at their mean (a median of the ratios priced the run 1/1.2 = 17% low, so TPOT checks
    passed steps that then ran over), and a step stalled 10x is still left out."""
    from unittest import mock

    from adaspec.spec import cost_model

    def run() -> float:
        cm = CostModel.linear(draft_step=1e-3, verify_step=1e-2, window=20)
        shape = StepShape([10, 10], [1, 1], [3, 2], [3, 2])
        base = cm.predict(shape)
        predicted = measured = 0.0
        for i in range(200):
            f = 10.0 if i == 150 else 2.0 if i % 5 == 4 else 1.0
            p = cm.predict(shape).total
            cm.observe(shape, f * base.draft, f * base.verify, f * base.total)
            if i >= 40 and i != 150:
                predicted, measured = predicted + p, measured + f * base.total
        return predicted / measured

    assert run() == pytest.approx(1.0, abs=0.02)
    with mock.patch.object(cost_model, "robust_mean", statistics.median):
        assert run() == pytest.approx(1 / 1.2, abs=0.02)


def test_draft_is_corrected_per_rows_of_its_forwards():
    """The profile prices the draft right at batch 1 and 1.5x low at batch 8 (it times forwards back
    to back, warm; in a step they follow the target's): each row-count bucket learns its own factor,
    so a step at batch 1 and one at batch 8 are both priced right (one shared factor learned from a
    mix would misprice both), a forward of a few rows late in a step at its own rows' factor, and a
    bucket with no steps of its own takes the shared one."""
    cm = CostModel.linear(draft_step=1e-3, verify_step=1e-2, draft_per_row=1e-4, window=10)

    def shape(batch, k):
        return StepShape([10] * batch, [1] * batch, [k] * batch, [k] * batch)

    one, eight = shape(1, 3), shape(8, 3)
    base_one, base_eight = cm.predict(one, corrected=False), cm.predict(eight, corrected=False)
    for _ in range(6):
        for s, f in ((one, 1.0), (eight, 1.5)):
            b = cm.predict(s, corrected=False)
            cm.observe(s, f * b.draft, b.verify, f * b.draft + b.verify)
    assert cm.predict(one).draft == pytest.approx(base_one.draft)
    assert cm.predict(eight).draft == pytest.approx(1.5 * base_eight.draft)
    assert cm.predict_draft(8, 1, 10) == pytest.approx(1.5 * cm.draft.predict(8, 1, 10))
    assert cm.predict_draft_grid(np.array([1, 8, 12]), 1, 10).tolist() == pytest.approx(
        [cm.predict_draft(b, 1, 10) for b in (1, 8, 12)])
    assert cm.draft_factor_at(3) == pytest.approx(cm.draft_factor)  # no steps at 2-3 rows: the shared
    ragged = StepShape([10] * 8, [1] * 8, [3] * 2 + [1] * 6, [3] * 2 + [1] * 6)  # forwards of 8, 2, 2 rows
    f8, f2 = cm.draft_forwards(ragged)[0], cm.draft_forwards(ragged)[1]
    assert cm.predict(ragged).draft == pytest.approx(
        1.5 * cm.draft.predict(*f8) + 2 * cm.draft_factor * cm.draft.predict(*f2))
    assert cm.error_report()["draft_scale_by_rows"] == pytest.approx(
        {"1+": 1.0, "2+": cm.draft_factor, "4+": cm.draft_factor, "8+": 1.5})


def test_later_draft_forwards_are_corrected_apart_from_the_first():
    """A step's first draft forward runs 2x the profile's time (it follows the target's forward),
    the later ones 0.5x. Timed apart (`draft_first`), each gets its own factor, so a 1-draft step and
    a 6-draft step are both priced right, and the planners' grid prices forward t > 0 at the later
    factor; timed only as a whole, one factor prices deep drafts above what they take (the old,
    still the fallback)."""
    def shape(k):
        return StepShape([10], [1], [k], [k])

    def run(split: bool) -> CostModel:
        cm = CostModel.linear(draft_step=1e-3, verify_step=1e-2, draft_per_row=1e-4, window=10)
        for _ in range(6):
            for k in (1, 2, 6):
                fw = cm.draft_forwards(shape(k))
                first, rest = 2 * cm.draft.predict(*fw[0]), sum(0.5 * cm.draft.predict(*f) for f in fw[1:])
                b = cm.predict(shape(k), corrected=False)
                cm.observe(shape(k), first + rest, b.verify, first + rest + b.verify,
                           first if split else None)
        return cm

    cm = run(split=True)
    unit = cm.draft.predict(1, 1, 10)
    assert cm.draft_factor_at(1) == pytest.approx(2.0)
    assert cm.draft_factor_at(1, later=True) == pytest.approx(0.5)
    assert cm.predict(shape(1)).draft == pytest.approx(2 * unit)
    fw = cm.draft_forwards(shape(6))
    assert cm.predict(shape(6)).draft == pytest.approx(
        2 * cm.draft.predict(*fw[0]) + sum(0.5 * cm.draft.predict(*f) for f in fw[1:]))
    t = np.arange(3)[:, None]
    grid = cm.predict_draft_grid(np.ones((3, 2)), 1, 10 + t, later=t > 0)
    assert grid.ravel().tolist() == pytest.approx(
        [cm.predict_draft(1, 1, 10 + j, later=j > 0) for j in range(3) for _ in range(2)])
    assert cm.error_report()["later_draft_scale_by_rows"]["1+"] == pytest.approx(0.5)
    whole = run(split=False)
    assert whole.draft_factor_at(1, later=True) == whole.draft_factor_at(1)  # one factor for all
    assert whole.predict(shape(6)).draft > 1.2 * cm.predict(shape(6)).draft  # deep drafts over-priced


def test_verification_is_corrected_apart_from_plain_decoding():
    """The profile underestimates plain decode forwards (width 1) by 2x but verifications by only
    1.2x: each learns its own factor, so a plain step is not priced by the wide ones' factor; every
    verification width shares one (a factor per width range drifted apart with noise and made a
    deeper verification cheaper than a shallower one); a bucket with too few recent steps of its
    own uses the shared factor."""
    cm = CostModel.linear(draft_step=1e-3, verify_step=1e-2, verify_per_token=1e-3, window=10)
    narrow, wide = StepShape([10, 10], [1, 1], [0, 0], [0, 0]), StepShape([10, 10], [1, 1], [4, 4], [4, 4])
    base_narrow, base_wide = cm.predict(narrow), cm.predict(wide)
    assert cm.predict_verify(2, 3, 12) == pytest.approx(cm.verify.predict(2, 3, 12))  # nothing learned yet
    for _ in range(5):
        cm.observe(narrow, 0.0, 2.0 * base_narrow.verify, 2.0 * base_narrow.verify)
        cm.observe(wide, base_wide.draft, 1.2 * base_wide.verify, base_wide.draft + 1.2 * base_wide.verify)
    assert cm.predict(narrow).verify == pytest.approx(2.0 * base_narrow.verify)
    assert cm.predict(wide).verify == pytest.approx(1.2 * base_wide.verify)
    for w in (2, 3, 5, 8):  # every verification width: the same factor, so prices rise with width
        assert cm.predict_verify(2, w, 14) == pytest.approx(1.2 * cm.verify.predict(2, w, 14))
    grid = cm.predict_verify_grid(np.array([2, 2, 2]), np.array([1, 3, 5]), np.array([10, 12, 14]))
    assert grid.tolist() == [cm.predict_verify(2, w, c) for w, c in ((1, 10), (3, 12), (5, 14))]
    for _ in range(21):  # only narrow steps for over 2 x window steps: the wide factor is stale
        cm.observe(narrow, 0.0, 2.0 * base_narrow.verify, 2.0 * base_narrow.verify)
    assert cm.predict(wide).verify == pytest.approx(2.0 * base_wide.verify)  # the shared factor


def test_overhead_is_learned_per_request_and_per_draft_forward():
    """Outside the forwards a plain step costs 0.2 ms a request and a speculating one 0.3 ms more per
    draft forward (the drafting loop and the policy's decision after each forward): learned apart,
    each kind of step is priced right, at any batch size (a rate per drafted token learned at batch
    1 would price batch 32 at 32x)."""
    cm = CostModel.linear(draft_step=1e-3, verify_step=1e-2, window=10)

    def shape(batch, k):
        return StepShape([10] * batch, [1] * batch, [k] * batch, [k] * batch)

    def outside(s):
        return 2e-4 * (1 + len(s.contexts)) + 3e-4 * max(s.drafted)

    steps = [shape(1, 4)] * 3 + [shape(1, 0), shape(1, 4), shape(2, 0), shape(4, 3)] * 4  # drafting first
    for s in steps:
        p = cm.predict(s)
        cm.observe(s, p.draft, p.verify, p.draft + p.verify + outside(s))
    for s in (shape(32, 0), shape(32, 3), shape(16, 5)):
        assert cm.predict(s).overhead == pytest.approx(outside(s))
    assert cm.error_report(last=4)["mape"] < 1e-9


def test_per_forward_overhead_needs_fresh_samples():
    """The per-draft-forward rate is only taught by speculating steps: one sample (a warm-up step's
    first calls) is not trusted, and a rate without a speculating step in 2 x window steps gives way
    to the profile's 0, so it cannot keep speculation off for good (session 13: 0.96 ms learned from
    one step, no draft for a whole run)."""
    cm = CostModel.linear(draft_step=1e-3, verify_step=1e-2, window=10)
    plain, spec = StepShape([10], [1], [0], [0]), StepShape([10], [1], [4], [4])

    def observe(s, outside):
        p = cm.predict(s)
        cm.observe(s, p.draft, p.verify, p.draft + p.verify + outside)

    observe(plain, 2e-4)  # 1e-4 a row (2 rows)
    observe(spec, 2e-4 + 4 * 3e-3)  # one slow speculating step: 3 ms a draft forward
    assert cm.overhead_per_forward == 0.0
    assert cm.predict(spec).overhead == pytest.approx(2e-4)
    for _ in range(2):
        observe(spec, 2e-4 + 4 * 3e-4)
    assert cm.overhead_per_forward == pytest.approx(3e-4)  # the trimmed mean of three: their median
    for _ in range(20):
        observe(plain, 2e-4)
    assert cm.overhead_per_forward == pytest.approx(3e-4)  # the latest sample 20 steps ago: fresh
    observe(plain, 2e-4)
    assert cm.overhead_per_forward == 0.0  # stale
    observe(spec, 2e-4 + 4 * 3e-4)
    assert cm.overhead_per_forward == pytest.approx(3e-4)  # fresh again, its samples kept


def test_frozen_model_does_not_learn():
    cm = CostModel.linear(draft_step=1e-3, verify_step=1e-2)  # window 0: frozen
    shape = StepShape([10], [1], [2], [2])
    before = cm.predict(shape).total
    cm.observe(shape, 1.0, 1.0, 3.0)
    assert cm.predict(shape).total == before


def test_save_load_roundtrip(tmp_path):
    model = ForwardTimeModel.fit([(b, t, c, gpu_like(b, t, c)) for b, t, c in GRID])
    cm = CostModel(model, model, 1e-5, meta={"key": {"device": "x"}})
    cm.save(tmp_path / "p.json")
    back = CostModel.load(tmp_path / "p.json")
    shape = StepShape([100, 50], [2, 1], [4, 3], [2, 3])
    assert back.predict(shape).total == pytest.approx(cm.predict(shape).total)
    assert back.meta == cm.meta and back.padded


@pytest.fixture
def runners(tiny_pair):
    from adaspec.engine.runner import ModelRunner
    from adaspec.model import load_model

    target, draft, _ = tiny_pair
    make = lambda path: ModelRunner(load_model(path, dtype=torch.float32), 4, 64, torch.float32,  # noqa: E731
                                    torch.device("cpu"))
    return make(target), make(draft)


def test_profile_cached_keyed_and_reprofiled(runners, tmp_path, monkeypatch):
    from adaspec.spec import profiler

    monkeypatch.setenv("ADASPEC_CACHE_DIR", str(tmp_path))
    target, draft = runners
    cm = profiler.load_or_profile(target, draft, 4, 3, 64, ("t", "d"), budget_s=20)
    files = list((tmp_path / "profiles").glob("*.json"))
    assert len(files) == 1
    key = cm.meta["key"]
    assert key["threads"] == torch.get_num_threads() and key["dtype"] == "float32"
    assert key["device"] and key["adaspec"] and key["target"]["hidden_size"] == 64
    assert all(float(t.abs().sum()) == 0 for t in (*target.cache.k, *draft.cache.k))  # caches cleared
    # sane predictions over and beyond the profiled range
    for b, t, c in [(1, 1, 16), (4, 4, 64), (32, 9, 1024)]:
        assert cm.predict_verify(b, t, c) > 0 and cm.predict_draft(b, 1, c) > 0
    # not smaller beyond the range (equal where the fit is flat: tiny models time alike; the two
    # sums of a flat fit may differ in the last bit, which failed a fresh-clone CI run once)
    assert cm.predict_verify(32, 9, 1024) >= cm.predict_verify(4, 4, 64) * (1 - 1e-9)

    def no_timing(*a, **k):
        raise AssertionError("profiled again although a matching profile is cached")

    real = profiler.time_forwards
    monkeypatch.setattr(profiler, "time_forwards", no_timing)
    again = profiler.load_or_profile(target, draft, 4, 3, 64, ("t", "d"))
    assert again.to_dict() == cm.to_dict()
    monkeypatch.setattr(profiler, "time_forwards", real)
    fresh = profiler.load_or_profile(target, draft, 4, 3, 64, ("t", "d"), reprofile=True, budget_s=20)
    assert fresh.meta["draft_samples"] != cm.meta["draft_samples"] or fresh.meta != cm.meta
    monkeypatch.setattr(profiler, "time_forwards", no_timing)
    with pytest.raises(AssertionError, match="profiled again"):  # a longer K is not covered
        profiler.load_or_profile(target, draft, 4, 5, 64, ("t", "d"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)  # another thread count: another key
    with pytest.raises(AssertionError, match="profiled again"):
        profiler.load_or_profile(target, draft, 4, 3, 64, ("t", "d"))


def test_spiked_profile_samples_are_timed_again_and_keep_the_lower_time():
    """A forward timed during a spike (another process on the core) is measured again: the fit then
    follows the device's shape, not the spike (session 20: draft samples up to 77x the fit)."""
    from types import SimpleNamespace

    from adaspec.spec import profiler
    from adaspec.spec.cost_model import ForwardTimeModel

    def true_time(b, t, ctx):
        return 1e-3 * (2 + 0.5 * b + 0.2 * b * t + 0.001 * b * ctx)

    class SpikyRunner:
        """Fake runner: each forward takes true_time, except the calls listed, which take 5x."""

        def __init__(self, spikes):
            self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=32))
            self.calls, self.spikes, self.last_time = 0, spikes, 0.0

        def run(self, rows):
            self.calls += 1
            b, t = len(rows), len(rows[0].tokens)
            self.last_time = true_time(b, t, rows[0].start + t) * (5.0 if self.calls in self.spikes else 1.0)

    points = profiler.grid(8, 4, 256)
    # calls: 1 warm-up, then 3 per point; spike two of the three repeats of points 2 and 5
    runner = SpikyRunner({1 + 3 * 2 + 1, 1 + 3 * 2 + 2, 1 + 3 * 5 + 1, 1 + 3 * 5 + 3})
    samples = profiler.time_forwards(runner, points, True, budget_s=60)
    assert samples[2][3] == pytest.approx(5 * true_time(*points[2]))  # the median of three kept the spike
    fixed, again = profiler.retime_spikes(runner, samples, True, budget_s=60)
    assert again == 2
    for (b, t, c, y) in fixed:
        assert y == pytest.approx(true_time(b, t, c))
    clean, spiked = ForwardTimeModel.fit(fixed), ForwardTimeModel.fit(samples)
    err = lambda m: max(abs(m.predict(b, t, c) / true_time(b, t, c) - 1) for b, t, c in points)  # noqa: E731
    assert err(clean) < 0.01 < err(spiked)
    # a point slow every time is a real cost: it keeps its time
    slow = [(b, t, c, y * (4.0 if i == 3 else 1.0)) for i, (b, t, c, y) in enumerate(fixed)]
    runner.spikes = set(range(runner.calls + 1, runner.calls + 10))  # the re-timing is slow too
    kept, again = profiler.retime_spikes(runner, slow, True, budget_s=60)
    assert again == 1 and kept[3][3] == slow[3][3]
