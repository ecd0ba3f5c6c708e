"""The embedded pair's training pipeline and the shipped pair."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from adaspec.llm import DEFAULT_PAIR
from adaspec.train import card, corpus, pair


def test_split_is_deterministic_and_disjoint():
    a, b = corpus.build_split(), corpus.build_split()
    assert a == b
    sets = [set(a.train), set(a.valid), set(a.heldout)]
    assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert len(a.train) > 8 * len(a.valid)
    assert corpus.split_of("json/decoder.py") == corpus.split_of("json/decoder.py")


def test_tokenizer_round_trip(tmp_path):
    files = corpus.build_split().train[:15]
    tok = corpus.train_tokenizer(files, 600, tmp_path / "tok")
    text = 'def f(x: int) -> str:\n    """Ünïcode ✓ and\ttabs."""\n    return f"{x!r}"\n'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned
    assert len(tok) == 600


def _tiny_cfg(**kw) -> pair.PairConfig:
    return pair.PairConfig(vocab_size=400, seq_len=32, target=pair.ModelShape(32, 64, 2, 2, 1, False),
                           draft=pair.ModelShape(16, 32, 1, 1, 1, True), target_batch=8, draft_batch=8,
                           warmup=5, ckpt_every=10, **kw)


def _tiny_workdir(tmp_path, cfg):
    files = corpus.build_split().train[:10]
    tok = corpus.train_tokenizer(files, cfg.vocab_size, tmp_path / "tokenizer")
    np.save(tmp_path / "train.npy", corpus.encode_files(tok, files))
    return tmp_path


def _losses(workdir, phase):
    recs = [json.loads(x) for x in (workdir / "train.log").read_text().splitlines()]
    return [r["loss"] for r in recs if r.get("phase") == phase and "loss" in r]


def test_training_reduces_loss_and_resumes(tmp_path):
    cfg = _tiny_cfg(target_steps=40, draft_steps=20)
    w = _tiny_workdir(tmp_path, cfg)
    pair.train_target(w, cfg, "cpu")
    losses = _losses(w, "target")
    assert losses[-1] < losses[0] and losses[-1] < math.log(cfg.vocab_size) - 0.4  # uniform: ln V
    # Resume: asking for more steps continues from the checkpoint, not from scratch.
    cfg.target_steps = 50
    pair.train_target(w, cfg, "cpu")
    assert "resumed_at" in (w / "train.log").read_text()
    assert torch.load(w / "target.pt")["step"] == 50
    pair.distill_draft(w, cfg, "cpu")
    d = _losses(w, "draft")
    assert d[-1] < d[0]
    # A machine without the checkpoints continues from the exported pair instead.
    pair.export(w, cfg, tmp_path / "export")
    w2 = tmp_path / "fresh"
    w2.mkdir()
    shutil.copy(w / "train.npy", w2 / "train.npy")
    shutil.copytree(w / "tokenizer", w2 / "tokenizer")
    (tmp_path / "export" / "card.json").write_text(json.dumps(
        {"training": {"target_steps": 50, "target_tokens": 50 * 8 * 32}}))
    cfg2 = _tiny_cfg(target_steps=10, init_from=tmp_path / "export")
    pair.train_target(w2, cfg2, "cpu")
    assert "initialized_from" in (w2 / "train.log").read_text()
    assert _losses(w2, "target")[0] < losses[0]
    # The card counts the exported pair's training and the continuation, as two stages.
    summary = card.training_summary(w2, cfg2)
    assert summary["target_steps"] == 60 and summary["target_stages"] == [50, 10]
    assert summary["target_tokens"] == 60 * 8 * 32
    assert summary["draft_steps"] == 0 and "draft_stages" not in summary


def test_batches_are_a_function_of_seed_and_step():
    stream = np.arange(1000, dtype=np.int32)
    assert torch.equal(pair.batch(stream, 16, 4, 0, 7), pair.batch(stream, 16, 4, 0, 7))
    assert not torch.equal(pair.batch(stream, 16, 4, 0, 7), pair.batch(stream, 16, 4, 0, 8))


shipped = pytest.mark.skipif(not (DEFAULT_PAIR / "target" / "config.json").exists(),
                             reason="embedded pair not trained yet")


@shipped
def test_shipped_pair_loads_with_transformers_and_ours():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaspec.model import check_same_vocab, load_model, load_tokenizer

    check_same_vocab(load_tokenizer(DEFAULT_PAIR / "target"), load_tokenizer(DEFAULT_PAIR / "draft"))
    tok = AutoTokenizer.from_pretrained(DEFAULT_PAIR / "target")
    ids = torch.tensor([tok("def main():\n    return 0\n")["input_ids"]])
    for which in ("target", "draft"):
        hf = AutoModelForCausalLM.from_pretrained(DEFAULT_PAIR / which, dtype=torch.float32).eval()
        ours = load_model(DEFAULT_PAIR / which)
        with torch.no_grad():
            ref = hf(ids).logits
            got = ours.compute_logits(ours(ids, torch.arange(ids.size(1))[None]))
        assert (ref - got).abs().max() < 1e-3
    card = json.loads((DEFAULT_PAIR / "card.json").read_text())
    assert card["measured"]["params"]["target"] > 5 * card["measured"]["params"]["draft"]
    assert (DEFAULT_PAIR / "prompts.jsonl").exists()


@shipped
@pytest.mark.slow
def test_model_card_agreement_reproduces():
    """The card's agreement figure comes from a command; re-running it gives the same number."""
    import platform

    from adaspec.model import load_model, load_tokenizer
    from adaspec.train.card import heldout_stream, teacher_forced

    card = json.loads((DEFAULT_PAIR / "card.json").read_text())["measured"]
    if card["python"].rsplit(".", 1)[0] != platform.python_version().rsplit(".", 1)[0]:
        pytest.skip("held-out text is this Python version's stdlib; the card used another")
    tok = load_tokenizer(DEFAULT_PAIR / "target")
    res = teacher_forced(load_model(DEFAULT_PAIR / "target"), load_model(DEFAULT_PAIR / "draft"),
                         heldout_stream(tok))
    assert abs(res["top1_agreement"] - card["heldout"]["top1_agreement"]) < 2e-3


def test_distillation_with_top1_term_reduces_loss(tmp_path):
    """The optional top-1 term (cross-entropy to the target's argmax) is added to the draft's loss
    and trains alongside the KL."""
    cfg = _tiny_cfg(target_steps=20, draft_steps=30, top1_weight=1.0)
    w = _tiny_workdir(tmp_path / "top1", cfg)
    pair.train_target(w, cfg, "cpu")
    plain = tmp_path / "plain"
    shutil.copytree(w, plain)
    (plain / "train.log").unlink()
    pair.distill_draft(w, cfg, "cpu")
    d = _losses(w, "draft")
    assert d[-1] < d[0]
    # Same target, init and batches without the term: its loss is lower by about the term's size
    # (cross-entropy over a 400-token vocabulary, nats at the start).
    cfg.top1_weight = 0.0
    pair.distill_draft(plain, cfg, "cpu")
    assert _losses(plain, "draft")[0] < d[0] - 1.0


def test_training_phases_prepare_a_fresh_workdir(tmp_path, monkeypatch):
    """`target` (or `draft`) on an empty work directory prepares it first; without a tokenizer the
    error names the missing phase, not a model hub."""
    with pytest.raises(ValueError, match="prepare"):
        pair._load_tokenizer(tmp_path)
    cfg = _tiny_cfg(target_steps=2)
    prepared = []
    monkeypatch.setattr(pair, "prepare", lambda w, c: prepared.append(w) or _tiny_workdir(w, c))
    pair.train_target(tmp_path, cfg, "cpu")
    assert prepared == [tmp_path] and torch.load(tmp_path / "target.pt")["step"] == 2


def test_step_time_ratio_alternates_blocks_of_each_model(tiny_pair, monkeypatch):
    """Target and draft are timed in alternating blocks (host drift lands in both medians), and the
    ratio is of the two medians."""
    from adaspec.engine.runner import ModelRunner

    order = []
    real_run = ModelRunner.run

    def run(self, rows):
        order.append(id(self))
        return real_run(self, rows)

    monkeypatch.setattr(ModelRunner, "run", run)
    res = card.step_time_ratio(tiny_pair[0].parent, context=8, repeats=8, block=2)
    target, draft = order[0], order[1]  # one warm-up each, target first
    assert target != draft and order[2:] == [target, target, draft, draft] * 4
    assert abs(res["ratio"] - res["target_ms"] / res["draft_ms"]) < 0.01 * res["ratio"] + 0.01
