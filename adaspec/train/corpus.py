"""Corpus for the embedded pair: the CPython standard library every Python install carries.

The split is by file (hash of the path relative to the stdlib root), so it is deterministic across
machines with the same Python version and no text leaks between train, validation and held-out sets.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

EOS = "<|endoftext|>"
SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class Split:
    train: list[Path]
    valid: list[Path]
    heldout: list[Path]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(rel: str) -> str:
    """Deterministic file-level split: 90% train, 5% validation, 5% held-out prompts."""
    bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100
    if bucket < 90:
        return "train"
    return "valid" if bucket < 95 else "heldout"


def build_split(root: Path | None = None) -> Split:
    root = root or stdlib_root()
    files = sorted(
        p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & SKIP_PARTS)
    )
    out: dict[str, list[Path]] = {"train": [], "valid": [], "heldout": []}
    for p in files:
        out[split_of(p.relative_to(root).as_posix())].append(p)
    return Split(**out)


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int, out_dir: Path):
    """Byte-level BPE (GPT-2 style) so every byte sequence is encodable; saved in HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(p) for p in files), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None, pad_token=EOS
    )
    fast.model_max_length = 1024
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def encode_files(tokenizer, files: list[Path]):
    """One token stream: each file's tokens followed by EOS."""
    import numpy as np

    eos = tokenizer.convert_tokens_to_ids(EOS)
    texts = [read_text(p) for p in files]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = []
    for seq in ids:
        stream.extend(seq)
        stream.append(eos)
    return np.asarray(stream, dtype=np.int32)


def heldout_prompts(files: list[Path], root: Path, n: int = 64, max_chars: int = 400) -> list[dict]:
    """Prompts cut from held-out files: a function's signature plus docstring opening.

    Same shape as Spec-Bench rows (`turns`, `category`) so one loader reads both.
    """
    prompts = []
    for p in files:
        lines = read_text(p).splitlines()
        starts = [i for i, line in enumerate(lines)
                  if line.lstrip().startswith("def ") and line.rstrip().endswith(":")]
        for i in starts[:3]:  # a few per file, so many files are represented
            chunk = "\n".join(lines[i : i + 3])[:max_chars]
            if len(chunk) > 40:
                prompts.append({"question_id": len(prompts), "category": "python",
                                "source": p.relative_to(root).as_posix(), "turns": [chunk + "\n"]})
    return prompts[:n]


def write_prompts(prompts: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
