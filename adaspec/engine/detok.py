"""Incremental detokenization and stop-string handling.

Decoding the whole output every step is quadratic; instead each request keeps two offsets, as vLLM
does: text is final up to `read_offset` tokens, and a few tokens before it (`prefix_offset`) give the
context that byte-level BPE needs to decode the next tokens (a character can span tokens).
"""

from __future__ import annotations

from adaspec.engine.sequence import Sequence


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def update_text(tokenizer, seq: Sequence) -> None:
    """Extend `seq.text` with the text of tokens appended since the last call (holds back a
    trailing incomplete character until the token that completes it arrives)."""
    out = seq.output_token_ids
    prefix = _decode(tokenizer, out[seq.prefix_offset:seq.read_offset])
    full = _decode(tokenizer, out[seq.prefix_offset:])
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        seq.text += full[len(prefix):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(out)


def flush_text(tokenizer, seq: Sequence) -> None:
    """At the end, emit whatever is still held back (an incomplete character decodes as U+FFFD)."""
    out = seq.output_token_ids
    prefix = _decode(tokenizer, out[seq.prefix_offset:seq.read_offset])
    full = _decode(tokenizer, out[seq.prefix_offset:])
    seq.text += full[len(prefix):]
    seq.prefix_offset = seq.read_offset = len(out)


def find_stop(seq: Sequence, old_len: int) -> int | None:
    """Index in `seq.text` where the earliest stop string found in the new text begins."""
    best = None
    for s in seq.params.stop_strings:
        i = seq.text.find(s, max(0, old_len - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def tokens_through_stop(tokenizer, seq: Sequence, committed: int) -> int:
    """How many output tokens it takes to complete the stop string found in this step's text, so
    token ids end where plain one-token-per-step decoding would have stopped. `committed`: tokens
    whose text was final before this step (it held no stop string)."""
    out = seq.output_token_ids
    for m in range(committed + 1, len(out) + 1):
        text = _decode(tokenizer, out[:m])
        if not text.endswith("\ufffd") and any(s in text for s in seq.params.stop_strings):
            return m
    return len(out)
