"""Rejection sampling keeps the target's distribution exactly, at every temperature."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaspec import LLM, SamplingParams
from adaspec.engine.sampling import probs_from_logits, verify


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; cells with tiny expectation are pooled."""
    from math import erf, sqrt

    n = counts.sum()
    exp = probs * n
    small = exp < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    stat = float(((counts - exp) ** 2 / np.maximum(exp, 1e-12)).sum())
    dof = len(exp) - 1
    # Wilson-Hilferty normal approximation of the chi-square upper tail.
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / sqrt(2 / (9 * dof))
    return 0.5 * (1 - erf(z / sqrt(2)))


def test_tiny_temperature_is_greedy():
    """A positive but tiny temperature (found by the server fuzz test: 5.8e-83 made the softmax
    NaN and the request fail) decodes greedily."""
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    for t in (5.8e-83, 1e-6):
        p = SamplingParams(temperature=t)
        assert p.greedy
        assert probs_from_logits(logits, [p]).tolist() == [[0.0, 1.0, 0.0]]
    assert not SamplingParams(temperature=1e-3).greedy


def test_tiny_top_p_keeps_the_top_token():
    """top_p = 2e-71 (found by the server fuzz test) rounds to 0 in float32; the nucleus still
    holds the most likely token instead of nothing (which made the softmax NaN: a 500)."""
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    for top_p in (2.0181127194778612e-71, 1e-9):
        probs = probs_from_logits(logits, [SamplingParams(temperature=1.0, top_p=top_p)])
        assert probs.tolist() == [[0.0, 1.0, 0.0]]


def test_verify_unit_distribution():
    """First emitted token ~ p1; second, when there is one, ~ p2, for a q far from p."""
    g = torch.Generator().manual_seed(0)
    V, N = 6, 20000
    p = torch.softmax(torch.randn(3, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(N):
        d = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        a, out = verify(d, q, p, g)
        assert len(out) == a + 1 and out[:a] == d[:a]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    assert chi2_pvalue(first, p[0].numpy()) > 1e-3
    assert chi2_pvalue(second, p[1].numpy()) > 1e-3
    # Power check: the draft's own distribution is rejected by the same test.
    assert chi2_pvalue(first, q[0].numpy()) < 1e-6


def test_top_k_top_p_filtering():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    pk = probs_from_logits(logits, [SamplingParams(temperature=1.0, top_k=2)])[0]
    assert (pk[2:] == 0).all() and torch.isclose(pk.sum(), torch.tensor(1.0))
    pp = probs_from_logits(logits, [SamplingParams(temperature=1.0, top_p=0.5)])[0]
    assert pp[0] == 1.0  # the top token alone carries > 0.5 of the mass
    g = probs_from_logits(logits, [SamplingParams(temperature=0)])[0]
    assert g.tolist() == [1.0, 0, 0, 0, 0]


def exact_law(model, prompt: list[int], sp: SamplingParams, n: int) -> dict[tuple, float]:
    """P(t1..tn) under the target's processed distributions, by enumerating the support."""
    law = {(): 1.0}
    for _ in range(n):
        prefixes = list(law)
        x = torch.tensor([prompt + list(pre) for pre in prefixes])
        pos = torch.arange(x.size(1)).expand(len(prefixes), -1)
        with torch.no_grad():
            probs = probs_from_logits(model.compute_logits(model(x, pos))[:, -1], [sp] * len(prefixes))
        law = {pre + (t,): law[pre] * float(pr[t])
               for pre, pr in zip(prefixes, probs, strict=True) for t in pr.nonzero().squeeze(-1).tolist()}
    return law


@pytest.mark.slow
@pytest.mark.parametrize("params", [dict(temperature=1.0, top_k=4),
                                    dict(temperature=0.7, top_k=5, top_p=0.8)])
def test_speculative_sampling_matches_target(tiny_pair, params):
    """End to end: the joint law of 4 generated tokens (the last 3 from one speculative step with
    an unrelated draft, so many rejections) equals the target's exact law."""
    target_dir, _, small = tiny_pair
    spec = LLM(model=target_dir, draft_model=small, policy="static:3", dtype=torch.float64,
               max_model_len=64, max_num_seqs=64)
    prompt = spec.tokenizer("def add(a, b):")["input_ids"]
    n = 3000
    sps = [SamplingParams(max_tokens=4, ignore_eos=True, seed=i, **params) for i in range(n)]
    outs = spec.generate([prompt] * n, sps)
    law = exact_law(spec.engine.target.model, prompt, SamplingParams(**params), 4)
    keys = list(law)
    pos = {k: i for i, k in enumerate(keys)}
    counts = np.zeros(len(keys))
    for o in outs:
        counts[pos[tuple(o.token_ids)]] += 1  # KeyError here = a token outside the target's support
    assert chi2_pvalue(counts, np.array([law[k] for k in keys])) > 1e-3
    stats = [o.spec_stats for o in outs]
    assert sum(s["drafted"] for s in stats) > sum(s["accepted"] for s in stats) > 0
