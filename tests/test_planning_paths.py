"""The planner's fast paths give bit-identical values to the plain ones (so no decision depends on
which path ran): cell-by-cell vs whole-grid continuation grids and prune sequences, table vs
per-call look-ahead."""

import random
from types import SimpleNamespace

import numpy as np

from adaspec.spec import efficiency
from adaspec.spec.acceptance import AcceptanceModel
from adaspec.spec.cost_model import CostModel, ForwardTimeModel


def _random_case(rng: random.Random):
    cm = CostModel(ForwardTimeModel([rng.random() * 1e-3 for _ in range(6)], rng.choice([0.0, 7.0])),
                   ForwardTimeModel([rng.random() * 1e-3 for _ in range(6)], rng.choice([0.0, 64.0])),
                   rng.random() * 1e-5, rng.random() < 0.5)
    cm.draft_scale.value, cm.verify_scale.value = rng.uniform(0.5, 2), rng.uniform(0.5, 2)
    for k, bucket in enumerate(cm.verify_scale.buckets):  # some widths corrected on their own
        if rng.random() < 0.5:
            bucket.value = rng.uniform(0.5, 2)
            bucket.ratios.extend([bucket.value] * 3)
            cm.verify_scale.last[k] = cm.verify_scale.steps
    B = rng.randint(1, 20)
    reqs = [SimpleNamespace(tpot_slo=rng.choice([None, 0.05]), since_first_token=rng.random(),
                            output_tokens=rng.randint(0, 300), remaining_tokens=rng.choice([None, 50]))
            for _ in range(B)]
    waiting = [SimpleNamespace(waited=rng.random(), ttft_slo=rng.choice([None, 1.0])) for _ in range(2)]
    slo = efficiency.SLOState(SimpleNamespace(requests=reqs, waiting=waiting))
    slo.behind = [rng.random() < 0.3 for _ in range(B)]  # some requests rank first
    cont = sorted(rng.sample(range(B), rng.randint(1, B)))
    H = rng.randint(1, 8)
    return (cm, slo, [rng.randint(1, 3000) for _ in range(B)], [rng.randint(0, 6) for _ in range(B)],
            [1 + rng.random() for _ in range(B)], [rng.random() for _ in range(B)], cont,
            [[rng.random() for _ in range(rng.randint(1, H))] for _ in cont],
            [rng.randint(1, 9) for _ in cont], rng.random() * 1e-3)


def test_grid_paths_identical(monkeypatch):
    rng = random.Random(0)
    for _ in range(200):
        case = _random_case(rng)
        monkeypatch.setattr(efficiency, "SMALL_GRID", 0)
        grid = efficiency.continuation_grid(*case)
        monkeypatch.setattr(efficiency, "SMALL_GRID", 10**9)
        for small_slo in (0, 10**9):  # SLO checks in numpy, then in plain Python
            monkeypatch.setattr(efficiency, "SMALL_SLO", small_slo)
            cells = efficiency.continuation_grid(*case)
            assert cells[3] == grid[3]
            for a, b in zip(cells[:3], grid[:3], strict=True):
                assert np.array_equal(a, b)
        cm, slo, contexts, drafted = case[:4]
        if any(drafted):
            probs = [sorted((rng.random() for _ in range(d)), reverse=True) for d in drafted]
            monkeypatch.setattr(efficiency, "SMALL_GRID", 10**9)
            cells = efficiency.prune_sequence(cm, slo, contexts, drafted, probs, 1e-4)
            monkeypatch.setattr(efficiency, "SMALL_GRID", 0)
            grid = efficiency.prune_sequence(cm, slo, contexts, drafted, probs, 1e-4)
            assert cells[3] == grid[3]
            for a, b in zip(cells[:3], grid[:3], strict=True):
                assert np.array_equal(a, b)


def test_next_token_options_match_the_grid(monkeypatch):
    """keep_drafting's lean evaluator is the continuation grid's h=1 row, value for value."""
    rng = random.Random(3)
    for _ in range(200):
        cm, slo, contexts, drafted, base, prefix, cont, future, _, sunk = _random_case(rng)
        nxt = [f[0] for f in future]
        monkeypatch.setattr(efficiency, "SMALL_GRID", 0)
        T, E, V, order = efficiency.continuation_grid(cm, slo, contexts, drafted, base, prefix, cont,
                                                      [[a] for a in nxt], [1] * len(cont), sunk)
        for small_slo in (0, 10**9):  # SLO checks in numpy, then in plain Python
            monkeypatch.setattr(efficiency, "SMALL_SLO", small_slo)
            t, e, v, o = efficiency.next_token_options(cm, slo, contexts, drafted, base, prefix, cont, nxt,
                                                       sunk)
            assert o == order and t == T[1].tolist() and e == E[1].tolist() and v == V[1].tolist()
        aware = rng.random() < 0.5
        monkeypatch.setattr(efficiency, "SMALL_PICK", 0)  # numpy's argmax
        assert efficiency.pick_small(t, e, v, aware) == efficiency.pick(T[1], E[1], V[1], aware)


def test_small_pick_matches_numpy(monkeypatch):
    rng = random.Random(2)
    for _ in range(300):
        n = rng.randint(1, 12)
        t = np.array([rng.choice([0.0, rng.random()]) for _ in range(n)])
        e = np.array([rng.choice([1.0, 1 + rng.random()]) for _ in range(n)])
        v = np.array([rng.choice([-0.5, 0.0, rng.uniform(-1, 1), float(rng.randint(1, 5))])
                      for _ in range(n)])
        pop = rng.randint(1, 20)
        for aware in (True, False):
            monkeypatch.setattr(efficiency, "SMALL_PICK", 0)
            slow = int(efficiency.pick(t, e, v, aware, pop))
            monkeypatch.setattr(efficiency, "SMALL_PICK", 64)
            assert efficiency.pick(t, e, v, aware, pop) == slow


def test_unseen_table_matches_predict_unseen():
    rng = random.Random(1)
    model = AcceptanceModel()
    ids = [f"r{i}" for i in range(12)]
    for _ in range(150):
        n = rng.randint(0, 8)
        model.observe(rng.choice(ids[:8]), [rng.random() for _ in range(n)], rng.randint(0, n))
    assert model.unseen_table(ids, 10) == [[model.predict_unseen(r, j) for j in range(10)] for r in ids]
