"""The planner's fast paths give bit-identical values to the plain ones (so no decision depends on
which path ran): cell-by-cell vs whole-grid continuation grids and prune sequences, table vs
per-call look-ahead; and the SLO check sees the tokens each candidate brings each request."""

import random
from types import SimpleNamespace

import numpy as np
import pytest

from adaspec.spec import efficiency
from adaspec.spec.acceptance import RANK_EVERY, RANK_WEIGHTS, AcceptanceModel
from adaspec.spec.cost_model import CostModel, ForwardTimeModel


def _random_case(rng: random.Random):
    cm = CostModel(ForwardTimeModel([rng.random() * 1e-3 for _ in range(6)], rng.choice([0.0, 7.0])),
                   ForwardTimeModel([rng.random() * 1e-3 for _ in range(6)], rng.choice([0.0, 64.0])),
                   rng.random() * 1e-5, layout=rng.choice(["padded", "packed", "mean"]))
    cm.draft_scale.value, cm.verify_scale.value = rng.uniform(0.5, 2), rng.uniform(0.5, 2)
    if rng.random() < 0.5:  # the draft corrected on its own (else it takes the verification's factor)
        cm.draft_scale.shared.ratios.extend([cm.draft_scale.value] * 3)
        cm._draft_seen = cm._steps
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
            monkeypatch.setattr(efficiency, "SMALL_PRUNE", 10**9)
            cells = efficiency.prune_sequence(cm, contexts, drafted, probs, 1e-4)
            monkeypatch.setattr(efficiency, "SMALL_PRUNE", -1)
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


def test_rank_weights_are_scored_on_one_step_in_rank_every():
    """Scoring the candidate weights costs ~0.4 ms a step in the engine: it runs on one verification
    step with drafts in RANK_EVERY, and learns from the others all the same."""
    rng = random.Random(2)
    model = AcceptanceModel(rank_weights=RANK_WEIGHTS)
    ids = [f"r{i}" for i in range(6)]
    scored = []
    for step in range(40):
        confs = [[rng.random() for _ in range(rng.randint(1, 5))] for _ in ids]
        if step % 5 == 4:
            confs = [[] for _ in ids]  # a step without drafts is not counted
        before = model.rank_scored
        model.observe_step(ids, confs, [rng.randint(0, len(c)) for c in confs])
        scored.append(model.rank_scored > before)
    with_drafts = [s for i, s in enumerate(scored) if i % 5 != 4]
    assert with_drafts == [(i + 1) % RANK_EVERY == 0 for i in range(len(with_drafts))]
    assert model.position_rates[0].tested == 32 * len(ids)  # every step with drafts was learned from


def _lost_slo(rng: random.Random, B: int) -> efficiency.SLOState:
    """Requests on track, behind, already lost (rate <= 0) or without an SLO, and a queue."""
    reqs = [SimpleNamespace(tpot_slo=rng.choice([None, 0.02, 0.05]), since_first_token=rng.uniform(0, 30),
                            output_tokens=rng.randint(1, 300), remaining_tokens=rng.choice([None, 1, 50]))
            for _ in range(B)]
    waiting = [SimpleNamespace(waited=rng.random(), ttft_slo=rng.choice([None, 0.5])) for _ in range(3)]
    return efficiency.SLOState(SimpleNamespace(requests=reqs, waiting=waiting))


def test_slo_checks_with_lost_requests_match():
    rng = random.Random(5)
    lost = 0
    for _ in range(200):
        B = rng.randint(1, 12)
        slo = _lost_slo(rng, B)
        lost += any(r <= 0 for r in slo._rate)
        n = rng.randint(1, 12)
        t = [rng.uniform(1e-3, 0.1) for _ in range(n)]
        e = [[rng.choice([1.0, 1 + 4 * rng.random()]) for _ in range(B)] for _ in range(n)]
        assert slo.worst(np.array(t), np.array(e)).tolist() == slo.worst_cells(t, e)
    assert lost > 20


def _evaluations(rng, cm, contexts, drafted, base, prefix, cont, future, widths, sunk):
    """Every evaluator's (T, E, order, tokens_of) on one random case, token weights or not."""
    w = [rng.uniform(0.5, 2) for _ in contexts] if rng.random() < 0.3 else None
    out = [efficiency.continuation_grid(cm, contexts, drafted, base, prefix, cont, future, widths, sunk, w),
           efficiency.next_token_options(cm, contexts, drafted, base, prefix, cont, [f[0] for f in future],
                                         sunk, w)]
    if any(drafted):
        probs = [sorted((rng.random() for _ in range(d)), reverse=True) for d in drafted]
        out.append(efficiency.prune_sequence(cm, contexts, drafted, probs, sunk, w))
    return out


def test_choose_in_plain_python_matches_numpy(monkeypatch):
    """`choose` ranks a few candidates in plain Python and many with numpy: same choice, same checks
    (ties included), on every evaluator's candidates, with and without SLO checks."""
    rng = random.Random(6)
    for _ in range(200):
        cm, slo, contexts, drafted, base, prefix, cont, future, widths, sunk = _random_case(rng)
        slo = _lost_slo(rng, len(contexts)) if rng.random() < 0.5 else slo
        evaluations = _evaluations(rng, cm, contexts, drafted, base, prefix, cont, future, widths, sunk)
        for T, E, _, tokens_of in evaluations:
            if rng.random() < 0.3:  # ties: the first of equally efficient candidates
                T, E = np.ones(np.shape(T)), np.round(np.asarray(E), 1)
            if slo.active:  # the rescue's per-request view agrees with the counts of `worst`
                rows = efficiency._token_rows(tokens_of, list(range(np.size(T))))
                counts, off = slo.judge(np.ravel(T), rows)
                assert off.sum(1).tolist() == np.maximum(counts, 0).tolist()
            for aware, partial in ((False, False), (True, False), (True, True)):
                loss = rng.choice([efficiency.RESCUE_LOSS, 0.3])
                monkeypatch.setattr(efficiency, "SMALL_CHOICE", 10**9)
                plain = efficiency.choose(T, E, tokens_of, slo, aware, loss, partial)
                monkeypatch.setattr(efficiency, "SMALL_CHOICE", -1)
                arrays = np.asarray(T), np.asarray(E)
                assert efficiency.choose(*arrays, tokens_of, slo, aware, loss, partial) == plain
                monkeypatch.setattr(efficiency, "SMALL_SLO", 0)  # every SLO check in numpy
                assert efficiency.choose(T, E, tokens_of, slo, aware, loss, partial) == plain
                monkeypatch.setattr(efficiency, "SMALL_SLO", 10**9)  # every SLO check in plain Python
                assert efficiency.choose(T, E, tokens_of, slo, aware, loss, partial) == plain
                monkeypatch.undo()


def test_candidate_token_rows_match_one_by_one():
    """`rows` gives each candidate's tokens as `tokens_of` does, in any order, repeats included."""
    rng = random.Random(7)
    for _ in range(200):
        cm, slo, contexts, drafted, base, prefix, cont, future, widths, sunk = _random_case(rng)
        evaluations = _evaluations(rng, cm, contexts, drafted, base, prefix, cont, future, widths, sunk)
        for T, _, _, tokens_of in evaluations:
            assert isinstance(tokens_of, efficiency.CandidateTokens)
            cells = [rng.randrange(np.size(T)) for _ in range(rng.randint(1, 2 * np.size(T)))]
            rows = tokens_of.rows(cells)
            assert rows.tolist() == [tokens_of(c) for c in cells]


def test_adaspec_running_values_match_recomputation():
    """The policy keeps running sums of its prefix probabilities and each draft forward's predicted
    time for the step: same values as summing them anew, call after call."""
    from adaspec.spec.adaspec_policy import AdaSpecPolicy
    from adaspec.spec.policy import BatchView, RequestView, StepOutcome

    rng = random.Random(8)
    for _ in range(20):
        cm, *_ = _random_case(rng)
        policy = AdaSpecPolicy(cm)
        B = rng.randint(1, 12)
        for step in range(8):
            reqs = [RequestView(f"r{i}", rng.randint(10, 500), 5 + step, rng.choice([0, 3, 8]),
                                rng.randint(1, 4), tpot_slo=rng.choice([None, 0.05])) for i in range(B)]
            batch = BatchView(reqs, 8)
            active = [k > 0 for k in policy.plan(batch)]
            while any(active):
                for r, a in zip(reqs, active, strict=True):
                    if a:
                        r.confidences.append(rng.random())
                active = [a and len(r.confidences) < r.max_draft for a, r in zip(active, reqs, strict=True)]
                keep = policy.keep_drafting(batch, list(active))
                active = [a and k for a, k in zip(active, keep, strict=True)]
                assert policy._prefix_sums == [sum(ps) for ps in policy._prefix_probs]
                forwards = cm.draft_forwards(policy.shape(batch))
                sunk = policy._sunk_draft_time(batch, [len(r.confidences) for r in reqs])
                assert sunk == sum(cm.predict_draft(*f) for f in forwards)
            lengths = policy.prune(batch)
            drafted = [len(r.confidences) for r in reqs]
            policy.observe(StepOutcome([r.request_id for r in reqs], [r.context_len for r in reqs], lengths,
                                       [rng.randint(0, n) for n in lengths],
                                       [r.confidences[:n] for r, n in zip(reqs, lengths, strict=True)],
                                       max(drafted), 1e-3, 1e-2, 2e-2))


@pytest.mark.parametrize("layout", ["padded", "packed", "mean"])
def test_sunk_draft_time_follows_any_change_of_the_draft_lengths(layout):
    """Kept forwards are only those no draft length crossed, whatever the order of the calls."""
    from adaspec.spec.adaspec_policy import AdaSpecPolicy
    from adaspec.spec.policy import BatchView, RequestView

    rng = random.Random(9)
    cm, *_ = _random_case(rng)
    cm.layout = layout
    policy = AdaSpecPolicy(cm)
    for _ in range(50):
        B = rng.randint(1, 8)
        reqs = [RequestView(f"r{i}", rng.randint(10, 500), 5, 8, rng.randint(1, 4)) for i in range(B)]
        batch = BatchView(reqs, 8)
        for _ in range(10):
            for r in batch.requests:  # grow (the engine's way), jump or shrink
                n = max(0, len(r.confidences) + rng.choice([0, 1, 1, 3, -2]))
                r.confidences = [0.5] * n
            drafted = [len(r.confidences) for r in batch.requests]
            forwards = cm.draft_forwards(policy.shape(batch))
            assert policy._sunk_draft_time(batch, drafted) == sum(cm.predict_draft(*f) for f in forwards)
