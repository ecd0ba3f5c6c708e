"""The planner's fast paths give bit-identical values to the plain ones (so no decision depends on
which path ran): cell-by-cell vs whole-grid continuation grids and prune sequences, table vs
per-call look-ahead; and the SLO check sees the tokens each candidate brings each request."""

import random
from types import SimpleNamespace

import numpy as np
import pytest

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
    cont = sorted(rng.sample(range(B), rng.randint(1, B)))
    H = rng.randint(1, 8)
    return (cm, slo, [rng.randint(1, 3000) for _ in range(B)], [rng.randint(0, 6) for _ in range(B)],
            [1 + rng.random() for _ in range(B)], [rng.random() for _ in range(B)], cont,
            [[rng.random() for _ in range(rng.randint(1, H))] for _ in cont],
            [rng.randint(1, 9) for _ in cont], rng.random() * 1e-3)


def _same(a, b):
    """Two evaluator results agree: arrays exactly, order exactly, tokens_of on every candidate."""
    (ta, ea, oa, fa), (tb, eb, ob, fb) = a, b
    assert np.array_equal(ta, tb) and np.array_equal(ea, eb) and oa == ob
    assert all(fa(i) == fb(i) for i in range(np.size(ta)))


def test_grid_paths_identical(monkeypatch):
    rng = random.Random(0)
    for _ in range(200):
        cm, slo, *case = _random_case(rng)
        monkeypatch.setattr(efficiency, "SMALL_GRID", 0)
        grid = efficiency.continuation_grid(cm, *case)
        monkeypatch.setattr(efficiency, "SMALL_GRID", 10**9)
        _same(efficiency.continuation_grid(cm, *case), grid)
        contexts, drafted = case[:2]
        if any(drafted):
            probs = [sorted((rng.random() for _ in range(d)), reverse=True) for d in drafted]
            monkeypatch.setattr(efficiency, "SMALL_GRID", 10**9)
            cells = efficiency.prune_sequence(cm, contexts, drafted, probs, 1e-4)
            monkeypatch.setattr(efficiency, "SMALL_GRID", 0)
            _same(cells, efficiency.prune_sequence(cm, contexts, drafted, probs, 1e-4))
            T, E, who, tokens_of = cells
            for r in range(len(who) + 1):  # a request's tokens fall by what it loses, in total by E
                assert sum(tokens_of(r)) == pytest.approx(E[r])


def test_next_token_options_match_the_grid(monkeypatch):
    """keep_drafting's lean evaluator is the continuation grid's h=1 row, value for value."""
    rng = random.Random(3)
    for _ in range(200):
        cm, slo, contexts, drafted, base, prefix, cont, future, _, sunk = _random_case(rng)
        nxt = [f[0] for f in future]
        monkeypatch.setattr(efficiency, "SMALL_GRID", 0)
        T, E, order, cells = efficiency.continuation_grid(cm, contexts, drafted, base, prefix, cont,
                                                          [[a] for a in nxt], [1] * len(cont), sunk)
        t, e, o, tokens_of = efficiency.next_token_options(cm, contexts, drafted, base, prefix, cont, nxt,
                                                           sunk)
        assert o == order and t == T[1].tolist() and e == E[1].tolist()
        M = len(cont)
        assert all(tokens_of(m) == cells(M + 1 + m) for m in range(M + 1))
        assert all(sum(tokens_of(m)) == pytest.approx(e[m]) for m in range(M + 1))
        aware = rng.random() < 0.5
        assert efficiency.choose(t, e, tokens_of, slo, aware) == efficiency.choose(T[1], E[1], tokens_of, slo,
                                                                                   aware)


def test_slo_checks_in_numpy_match_plain_python():
    rng = random.Random(4)
    for _ in range(200):
        cm, slo, contexts, *_ = _random_case(rng)
        n = rng.randint(1, 12)
        t = [rng.choice([1e-3, rng.random() * 0.1]) for _ in range(n)]
        e = [[rng.choice([1.0, 1 + 4 * rng.random()]) for _ in contexts] for _ in range(n)]
        assert slo.worst(np.array(t), np.array(e)).tolist() == slo.worst_cells(t, e)


def test_unseen_table_matches_predict_unseen():
    rng = random.Random(1)
    model = AcceptanceModel()
    ids = [f"r{i}" for i in range(12)]
    for _ in range(150):
        n = rng.randint(0, 8)
        model.observe(rng.choice(ids[:8]), [rng.random() for _ in range(n)], rng.randint(0, n))
    assert model.unseen_table(ids, 10) == [[model.predict_unseen(r, j) for j in range(10)] for r in ids]
