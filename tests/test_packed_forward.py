"""Packed multi-token forwards: per-token work on the valid tokens only, the padded grid only in attention.

The reference for every ragged batch is the same rows run one at a time (batch 1, no padding at all) on a
second runner whose cache went through the same history, so a wrong gather, scatter, RoPE row or cache
write shows up as a logit or cache mismatch. The padded layout (``packed=False``) is checked too.
"""

from __future__ import annotations

import random

import pytest
import torch

from adaspec.engine.runner import ModelRunner, Row
from adaspec.model import LlamaModel, ModelConfig

VOCAB = 96
ARCHS = {
    "llama_gqa": ("LlamaForCausalLM", {}),
    "qwen3_qk_norm": ("Qwen3ForCausalLM", {"head_dim": 16}),
    "qwen2_bias": ("Qwen2ForCausalLM", {}),
}


def make_model(arch: str, seed: int = 0) -> LlamaModel:
    """A random model, weights spread wide enough that attention and RoPE mistakes move the logits."""
    name, extra = ARCHS[arch]
    cfg = ModelConfig.from_hf({"architectures": [name], "vocab_size": VOCAB, "hidden_size": 48,
                               "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "max_position_embeddings": 256, **extra})
    model = LlamaModel(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for pname, p in model.named_parameters():
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if pname.endswith("norm.weight")
                else 0.2 * torch.randn(p.shape, generator=g))
    return model


def runners(model, packed=True):
    """(runner under test, one-row-at-a-time reference runner) with identical caches. The runner under
    test packs every ragged batch (no minimum padding), so that the packed path is what runs."""
    run = ModelRunner(model, 8, 96, torch.float32, torch.device("cpu"), packed=packed)
    run.pack_min_padding = 0.0
    return run, ModelRunner(model, 8, 96, torch.float32, torch.device("cpu"))


def alone(ref: ModelRunner, rows: list[Row]) -> torch.Tensor:
    outs = [o for o in (ref.run([r]) for r in rows) if o.numel()]
    return torch.cat(outs) if outs else torch.empty(0)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    if want.numel():
        assert want.std() > 0.3  # non-trivial logits, so the tolerance below means something
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def assert_same_cache(a: ModelRunner, b: ModelRunner) -> None:
    for x, y in zip((*a.cache.k, *a.cache.v), (*b.cache.k, *b.cache.v), strict=True):
        assert (x - y).abs().max().item() <= 1e-5 * max(y.abs().max().item(), 1.0)


def rand_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("packed", [True, False])
def test_ragged_steps_match_rows_run_alone(arch, packed):
    """Prefill of unequal prompts, then verify-like steps of unequal widths, in non-contiguous slots at
    different cache positions; rows with want=0 and one-token rows among longer ones; both layouts."""
    model = make_model(arch)
    run, ref = runners(model, packed)
    rng = random.Random(1)
    slots = [6, 1, 3, 4]  # not contiguous: the cache read gathers
    pos = {s: 0 for s in slots}

    def step(spec: list[tuple[int, int, int]]) -> None:
        """spec: (slot, tokens, want) per row."""
        rows = [Row(s, rand_tokens(rng, n), pos[s], want) for s, n, want in spec]
        assert_close(run.run(rows), alone(ref, rows))
        for s, n, _ in spec:
            pos[s] += n

    step([(6, 17, 1), (1, 5, 1), (3, 11, 0), (4, 2, 2)])  # ragged prefill, one row only fills the cache
    step([(6, 9, 9), (1, 1, 1), (3, 4, 4), (4, 2, 2)])  # verification: a one-token row among longer rows
    step([(3, 6, 6), (6, 1, 1), (1, 8, 0)])  # a subset of slots, out of order, a want=0 row
    step([(4, 3, 3), (6, 3, 3), (1, 3, 3)])  # equal widths: no padding (the padded path in either mode)
    step([(1, 1, 0), (4, 7, 0)])  # nothing wanted: only the cache is filled
    step([(6, 2, 1), (1, 5, 2), (3, 1, 1), (4, 9, 9)])
    assert_same_cache(run, ref)
    for t in (*run.cache.k, *run.cache.v):  # untouched slots, and cells past each row's end, stay zero
        assert t[[0, 2, 5, 7]].abs().sum() == 0
        assert all(t[s, :, pos[s]:].abs().sum() == 0 for s in slots)


def test_packed_matches_padded_forward_and_returns_valid_tokens_only():
    """Model level: packed hidden states are the padded forward's valid rows, in row-major order."""
    model = make_model("llama_gqa")
    B, T = 3, 5
    lengths = [5, 1, 3]
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    pos = torch.zeros(B, T, dtype=torch.long)
    valid = torch.arange(T) < torch.tensor(lengths).unsqueeze(1)
    for b, start in enumerate([10, 3, 0]):
        pos[b, : lengths[b]] = torch.arange(start, start + lengths[b])
    slots = torch.tensor([2, 0, 1])
    out = {}
    for packed in (False, True):
        cache = ModelRunner(model, 3, 32, torch.float32, torch.device("cpu")).cache
        for b, start in enumerate([10, 3, 0]):  # earlier context, so queries attend to cached keys
            prefix = torch.randint(0, VOCAB, (1, start), generator=torch.Generator().manual_seed(b))
            if start:
                model(prefix, torch.arange(start).unsqueeze(0), cache, slots[b : b + 1])
        out[packed] = model(ids, pos, cache, slots, valid, packed=packed)
    assert out[True].shape == (sum(lengths), model.config.hidden_size)
    want = out[False][valid]
    assert (out[True] - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_packed_needs_a_cache():
    model = make_model("llama_gqa")
    with pytest.raises(ValueError, match="needs a cache"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.arange(2).unsqueeze(0), packed=True)


def test_long_random_schedule_packed_equals_padded():
    """Many random ragged steps (widths 1..9, random wants and slots): both layouts agree throughout."""
    model = make_model("qwen3_qk_norm", seed=3)
    packed, padded = runners(model)
    padded.packed = False
    rng = random.Random(7)
    pos = [0] * 8
    for _ in range(12):
        chosen = rng.sample(range(8), rng.randint(1, 8))
        rows = []
        for s in chosen:
            n = rng.randint(1, 9)
            rows.append(Row(s, rand_tokens(rng, n), pos[s], rng.randint(0, n)))
            pos[s] += n
        assert_close(packed.run(rows), padded.run(rows))
    assert_same_cache(packed, padded)


def test_runner_packs_only_when_enough_of_the_grid_is_padding(monkeypatch):
    model = make_model("llama_gqa")
    run = ModelRunner(model, 24, 16, torch.float32, torch.device("cpu"))
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: seen.append(kw["packed"]) or forward(*a, **kw))
    run.run([Row(i, [1, 2, 3, 4], 0, 1) for i in range(20)] + [Row(20, [1, 2, 3], 0, 1)])  # 1 of 84 cells
    run.run([Row(0, [5, 6, 7, 8], 4, 4), Row(1, [5], 4, 1)])  # 3 of 8 cells
    run.run([Row(0, [9, 9], 8, 2), Row(1, [9, 9], 5, 2)])  # equal rows: nothing to pack
    assert seen == [False, True, False]
