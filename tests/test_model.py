"""Tests for adaspec.model: logit parity with transformers, KV-cache consistency, loader/config errors.

All models are tiny random ones saved with transformers' ``save_pretrained`` and loaded with our loader, so
the tests exercise the real checkpoint format. Weights are re-drawn with a larger spread than transformers'
init (which leaves attention near-uniform and norms at 1) so that RoPE, bias or norm mistakes show up.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from adaspec.model import (
    KVCache,
    LlamaModel,
    ModelConfig,
    check_max_model_len,
    check_same_vocab,
    load_model,
    load_tokenizer,
)
from adaspec.model.llama import rope_tables

TOL = 1e-4
VOCAB = 128
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

CASES = {
    "llama_gqa": (LlamaConfig, LlamaForCausalLM, {}),
    "llama_tied": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "llama_bias": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "llama_rope_llama3": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "llama_rope_linear": (
        LlamaConfig,
        LlamaForCausalLM,
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}},
    ),
    "llama_rope_yarn": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "llama_rope_dynamic": (
        LlamaConfig,
        LlamaForCausalLM,
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 64}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    # head_dim 32 != hidden/heads = 16, so an implementation deriving it would break.
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 32}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded; restore the setting for other test modules."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def make_hf(case: str, seed: int = 0, **overrides):
    cfg_cls, model_cls, extra = CASES[case]
    cfg = cfg_cls(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    _perturb(model, seed)
    return model


def save_hf(model, path, **kw) -> str:
    model.save_pretrained(path, safe_serialization=True, **kw)
    return str(path)


def ids_for(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_logits(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        return model.compute_logits(model(ids, pos))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_hf(make_hf("llama_gqa"), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(llama_dir)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("case", list(CASES))
def test_logit_parity_with_transformers(case, tmp_path):
    hf = make_hf(case)
    ours = load_model(save_hf(hf, tmp_path))
    ids = ids_for(2, 40)
    with torch.no_grad():
        ref = hf(ids).logits
    out = full_logits(ours, ids)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ref.std() > 0.3  # logits are far from trivial, so the tolerance below is meaningful
    assert (out - ref).abs().max().item() <= TOL
    if ours.config.tie_word_embeddings:
        assert ours.lm_head is None
        assert "lm_head.weight" not in ours.state_dict()


@pytest.mark.parametrize("case", ["llama_rope_llama3", "llama_rope_linear", "llama_rope_yarn"])
def test_rope_scaling_is_active(case):
    """Guard against the parity test passing vacuously: the scaled tables must differ from plain RoPE."""
    hf = make_hf(case)
    d = {**hf.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    cfg = ModelConfig.from_hf(d)
    plain = ModelConfig.from_hf({**d, "rope_parameters": {"rope_theta": 10000.0}})
    assert plain.rope_type == "default" and cfg.rope_type != "default"
    cos_s, sin_s = rope_tables(cfg, 40)
    cos_p, sin_p = rope_tables(plain, 40)
    assert (cos_s - cos_p).abs().max() > 1e-2


def test_parity_legacy_config_format(tmp_path):
    """transformers-4 style config.json: top-level rope_theta and a ``rope_scaling`` dict using ``type``."""
    hf = make_hf("llama_gqa")
    path = save_hf(hf, tmp_path)
    cfg_file = tmp_path / "config.json"
    d = json.loads(cfg_file.read_text())
    d.pop("rope_parameters", None)
    d["rope_theta"] = 50000.0
    d["rope_scaling"] = {"type": "linear", "factor": 2.0}
    d["eos_token_id"] = [2, 5]
    cfg_file.write_text(json.dumps(d))
    ours = load_model(path)
    assert ours.config.rope_theta == 50000.0 and ours.config.rope_type == "linear"
    assert ours.config.eos_token_id == [2, 5]
    ref_model = LlamaForCausalLM.from_pretrained(path).eval()
    ids = ids_for(1, 30)
    with torch.no_grad():
        ref = ref_model(ids).logits
    assert (full_logits(ours, ids) - ref).abs().max().item() <= TOL


def test_sharded_checkpoint(tmp_path):
    hf = make_hf("llama_gqa")
    path = save_hf(hf, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = load_model(path)
    ids = ids_for(1, 24)
    with torch.no_grad():
        ref = hf(ids).logits
    assert (full_logits(ours, ids) - ref).abs().max().item() <= TOL


def test_bf16_load(llama_dir, llama):
    ours = load_model(llama_dir, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and ours.rope_cos.dtype == torch.bfloat16
    assert all(not p.requires_grad for p in ours.parameters()) and not ours.training
    ids = ids_for(1, 24)
    ref = full_logits(llama, ids)
    out = full_logits(ours, ids)
    assert out.dtype == torch.float32
    err = (out - ref).abs().max().item()
    assert err < 0.1 * ref.abs().max().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8

    hf_bf16 = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref_bf16 = hf_bf16(ids).logits.float()
    assert (out - ref_bf16).abs().max().item() < 0.05 * ref.abs().max().item()


# ------------------------------------------------------------------------------------------------ cache


def run_cached(model, cache, slots, rows, valid_lists=None):
    """One cached forward over ragged rows; rows[b] = (start_pos, token list). Returns per-row logits."""
    B = len(rows)
    T = max(1, max(len(toks) for _, toks in rows))
    ids = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, (start, toks) in enumerate(rows):
        n = len(toks)
        ids[b, :n] = torch.tensor(toks, dtype=torch.long)
        pos[b, :n] = torch.arange(start, start + n)
        valid[b, :n] = True
    with torch.no_grad():
        logits = model.compute_logits(model(ids, pos, cache, torch.tensor(slots), valid))
    return [logits[b, : len(toks)] for b, (_, toks) in enumerate(rows)]


def test_chunked_prefill_and_decode_single_slot(llama):
    ids = ids_for(1, 30, seed=3)
    ref = full_logits(llama, ids)[0]
    cache = KVCache.allocate(llama.config, num_slots=3, max_len=64, dtype=torch.float32, device="cpu")
    outs, start = [], 0
    for n in [7, 1, 9, 1, 1, 5, 1, 1, 1, 3]:
        toks = ids[0, start : start + n]
        pos = torch.arange(start, start + n).unsqueeze(0)
        with torch.no_grad():  # valid=None: every token is written
            outs.append(llama.compute_logits(llama(toks.unsqueeze(0), pos, cache, torch.tensor([1]))[0]))
        start += n
    assert start == 30
    assert (torch.cat(outs) - ref).abs().max().item() <= TOL
    # Only slot 1 was touched.
    for t in (*cache.k, *cache.v):
        assert t[0].abs().sum() == 0 and t[2].abs().sum() == 0
        assert t[1, :, 30:].abs().sum() == 0


@pytest.mark.parametrize("case", ["llama_gqa", "qwen3"])
@pytest.mark.parametrize("slots,path", [([2, 0, 3], "gather"), ([0, 2, 3], "span")])
def test_ragged_batch_with_padding(case, slots, path, tmp_path):
    """Rows in non-adjacent slots at different lengths, padded with valid=False, incl. fully padded rows;
    out of slot order (every row's cache gathered) and in order with a gap (a view of the slots' span,
    the absent slot's row computed and dropped)."""
    model = load_model(save_hf(make_hf(case), tmp_path))
    seqs = [ids_for(1, n, seed=10 + i)[0].tolist() for i, n in enumerate([21, 11, 17])]
    refs = [full_logits(model, torch.tensor([s]))[0] for s in seqs]
    paths, plan = [], model._plan_cache_step
    model._plan_cache_step = lambda st, *a: (plan(st, *a), paths.append("span" if st.span else "gather"))
    cache = KVCache.allocate(model.config, num_slots=4, max_len=32, dtype=torch.float32, device="cpu")
    # (tokens to feed per row) for each step; 0 means the row is entirely padding in that step.
    schedule = [[5, 9, 3], [8, 0, 6], [1, 0, 1], [3, 0, 0], [1, 0, 5], [1, 1, 1], [1, 0, 1], [0, 0, 0]]
    schedule.append([1, 1, 0])
    done = [0, 0, 0]
    got: list[list[torch.Tensor]] = [[], [], []]
    for step in schedule:
        rows = [(done[b], seqs[b][done[b] : done[b] + n]) for b, n in enumerate(step)]
        outs = run_cached(model, cache, slots, rows)
        for b, n in enumerate(step):
            if n:
                got[b].append(outs[b])
                done[b] += n
    assert done == [21, 11, 17] and set(paths) == {path}
    for b in range(3):
        assert (torch.cat(got[b]) - refs[b]).abs().max().item() <= TOL
    # Slot 1 was never used and padding never wrote anything into it (or anywhere else).
    assert all(t[1].abs().sum() == 0 for t in (*cache.k, *cache.v))


def test_batched_decode_contiguous_slots(llama):
    """T=1 decoding for two rows at different lengths (mask path) in adjacent slots (view path)."""
    seqs = [ids_for(1, n, seed=20 + i)[0].tolist() for i, n in enumerate([12, 7])]
    refs = [full_logits(llama, torch.tensor([s]))[0] for s in seqs]
    cache = KVCache.allocate(llama.config, num_slots=3, max_len=16, dtype=torch.float32, device="cpu")
    slots = [1, 2]
    pre = [5, 2]
    got = run_cached(llama, cache, slots, [(0, seqs[0][:5]), (0, seqs[1][:2])])
    out = [[got[0]], [got[1]]]
    for i in range(5):
        rows = [(pre[0] + i, [seqs[0][pre[0] + i]]), (pre[1] + i, [seqs[1][pre[1] + i]])]
        for b, o in enumerate(run_cached(llama, cache, slots, rows)):
            out[b].append(o)
    # Finish row 0 alone (batch 1, no mask path); row 1 is complete.
    for p in range(10, 12):
        out[0].append(run_cached(llama, cache, [1], [(p, [seqs[0][p]])])[0])
    assert (torch.cat(out[0]) - refs[0]).abs().max().item() <= TOL
    assert (torch.cat(out[1]) - refs[1]).abs().max().item() <= TOL


def test_kv_cache_sizes(llama):
    cfg = llama.config
    cache = KVCache.allocate(cfg, num_slots=3, max_len=10, dtype=torch.bfloat16, device="cpu")
    assert cache.num_slots == 3 and cache.max_len == 10
    assert len(cache.k) == len(cache.v) == cfg.num_hidden_layers
    assert cache.k[0].shape == (3, cfg.num_key_value_heads, 10, cfg.head_dim)
    per_tok = KVCache.bytes_per_token(cfg, torch.bfloat16)
    assert per_tok == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    assert cache.nbytes() == per_tok * 3 * 10


def test_cache_dtype_mismatch_and_overflow(llama):
    zero = torch.zeros(1, 1, dtype=torch.long)
    cache = KVCache.allocate(llama.config, 1, 8, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="dtype"):
        llama(zero, zero, cache, torch.tensor([0]))
    cache = KVCache.allocate(llama.config, 1, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="max_len"):
        llama(zero, torch.full((1, 1), 8), cache, torch.tensor([0]))


def test_rope_table_grows(llama):
    model = LlamaModel(ModelConfig.from_hf({**_hf_dict(), "max_position_embeddings": 8192}))
    n = model.rope_len
    ids = ids_for(1, 2)
    with torch.no_grad():
        model(ids, torch.tensor([[n, n + 5]]))
    assert model.rope_len >= n + 6
    cos, _ = rope_tables(model.config, n + 6)
    assert torch.equal(model.rope_cos[: n + 6], cos)


def test_dynamic_rope_rejects_positions_past_max(tmp_path):
    ours = load_model(save_hf(make_hf("llama_rope_dynamic"), tmp_path))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(ids_for(1, 1), torch.tensor([[BASE["max_position_embeddings"]]]))


# ------------------------------------------------------------------------------------------------ config


def _hf_dict(**kw):
    return {**LlamaConfig(**BASE).to_dict(), "architectures": ["LlamaForCausalLM"], **kw}


def test_unsupported_architecture(tmp_path):
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as exc:
        ModelConfig.from_hf(_hf_dict(architectures=["GPT2LMHeadModel"]))
    assert "LlamaForCausalLM" in str(exc.value) and "Qwen3ForCausalLM" in str(exc.value)
    hf = make_hf("llama_gqa")
    path = save_hf(hf, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model(path)


def test_unsupported_rope_and_partial_rotary():
    with pytest.raises(ValueError, match="longrope"):
        ModelConfig.from_hf(_hf_dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ModelConfig.from_hf(_hf_dict(partial_rotary_factor=0.5))


def test_config_fields():
    cfg = ModelConfig.from_hf(_hf_dict(architectures=["LlamaForCausalLM"], eos_token_id=[7, 8]))
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 2 and cfg.eos_token_id == [7, 8]
    assert cfg.sliding_window is None and not cfg.qk_norm and not cfg.attention_bias

    q2 = ModelConfig.from_hf({**Qwen2Config(**BASE).to_dict(), "architectures": ["Qwen2ForCausalLM"]})
    assert q2.attention_bias and not q2.o_bias and q2.sliding_window is None  # use_sliding_window=False
    q2s = ModelConfig.from_hf(
        {
            **Qwen2Config(**BASE).to_dict(),
            "architectures": ["Qwen2ForCausalLM"],
            "use_sliding_window": True,
            "sliding_window": 64,
            "max_window_layers": 1,
            "layer_types": None,
        }
    )
    assert q2s.sliding_window == 64

    q3 = {k: v for k, v in Qwen3Config(**BASE).to_dict().items() if k != "head_dim"}
    q3["architectures"] = ["Qwen3ForCausalLM"]
    assert ModelConfig.from_hf(q3).head_dim == 128  # Qwen3Config's default, as transformers would use
    assert ModelConfig.from_hf(q3).qk_norm

    d = {k: v for k, v in MistralConfig(**BASE).to_dict().items() if k != "sliding_window"}
    d["architectures"] = ["MistralForCausalLM"]
    assert ModelConfig.from_hf(d).sliding_window == 4096
    assert ModelConfig.from_hf({**d, "sliding_window": None}).sliding_window is None


def test_check_max_model_len():
    d = {**MistralConfig(**BASE, sliding_window=64).to_dict(), "architectures": ["MistralForCausalLM"]}
    cfg = ModelConfig.from_hf(d)
    check_max_model_len(cfg, 64)
    with pytest.raises(ValueError, match="max_model_len"):
        check_max_model_len(cfg, 65)
    cfg_full = ModelConfig.from_hf(_hf_dict())
    check_max_model_len(cfg_full, 128)
    with pytest.raises(ValueError, match="max_model_len.*max_position_embeddings"):
        check_max_model_len(cfg_full, 129)


# ------------------------------------------------------------------------------------------------ loader


def test_loader_checks_max_model_len(llama_dir):
    assert load_model(llama_dir, max_model_len=128).config.max_position_embeddings == 128
    with pytest.raises(ValueError, match="max_model_len"):
        load_model(llama_dir, max_model_len=129)


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="does-not-exist"):
        load_model(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_hf_dict()))
    with pytest.raises(ValueError, match="safetensors"):
        load_model(tmp_path)


def test_loader_rejects_mismatched_weights(tmp_path):
    path = save_hf(make_hf("llama_gqa"), tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="missing"):
        load_model(path)


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_tokenizer_vocab_check(tmp_path):
    a = _word_tokenizer(["hello", "world", "foo"])
    b = _word_tokenizer(["hello", "world", "foo"])
    check_same_vocab(a, b)
    with pytest.raises(ValueError, match="vocabular"):
        check_same_vocab(a, _word_tokenizer(["hello", "world", "bar"]))
    with pytest.raises(ValueError, match="vocabular"):
        check_same_vocab(a, _word_tokenizer(["hello", "world"]))
    a.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    check_same_vocab(a, loaded)
    assert loaded("hello foo")["input_ids"] == a("hello foo")["input_ids"]
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(tmp_path / "missing")
