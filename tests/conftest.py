"""Tiny random model pairs built once per test session (no downloads, no trained weights)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and spinning threads oversubscribe a 2-core box.
torch.set_num_threads(1)



@pytest.fixture(scope="session", autouse=True)
def _profile_cache(tmp_path_factory):
    """Step-time profiles of the test models go to a session folder, not the user's cache."""
    old = os.environ.get("ADASPEC_CACHE_DIR")
    os.environ["ADASPEC_CACHE_DIR"] = str(tmp_path_factory.mktemp("adaspec-cache"))
    yield
    if old is None:
        os.environ.pop("ADASPEC_CACHE_DIR", None)
    else:
        os.environ["ADASPEC_CACHE_DIR"] = old


TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
    "        self.x = x\n        self.y = y\n\nfor i in range(10):\n    print(i * i)\n"
    "import os\nimport sys\nif __name__ == '__main__':\n    main(sys.argv)\n"
) * 4


def make_tokenizer(vocab_size: int = 320, text: str = TEXT):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_llama(path, vocab_size, tokenizer=None, hidden=64, layers=2, heads=4, kv_heads=2, seed=0,
               noise_from=None, noise=0.0, max_pos=256):
    """Save a random Llama checkpoint in HF layout; `noise_from` copies another model's weights
    plus Gaussian noise, giving a draft that agrees with it often but not always."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_pos, eos_token_id=0, bos_token_id=0,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # larger weights: peaked, more decisive distributions
            p.mul_(3.0)
    if noise_from is not None:
        model.load_state_dict(noise_from.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std() * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(target_dir, draft_dir, small_draft_dir): a noisy-copy draft and an unrelated smaller one."""
    root = tmp_path_factory.mktemp("pair")
    tok = make_tokenizer()
    v = len(tok)
    target = save_llama(root / "target", v, tok, seed=0)
    save_llama(root / "draft", v, tok, seed=1, noise_from=target, noise=0.05)
    save_llama(root / "small", v, tok, hidden=32, layers=1, heads=2, kv_heads=1, seed=2)
    return root / "target", root / "draft", root / "small"


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as a module, for its tests."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
