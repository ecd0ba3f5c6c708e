"""Model runner: turns ragged per-request token runs into padded batched forwards over the KV cache.

The engine speaks in rows ("feed these tokens of this request starting at this position, and give me
logits for the last n of them"); the runner owns tensors, padding, the caches and the clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from adaspec.model import KVCache, LlamaModel


@dataclass
class Row:
    slot: int
    tokens: list[int]
    start: int  # absolute position of tokens[0]
    want: int  # logits wanted for the last `want` tokens (0: only fill the cache)


class ModelRunner:
    """One model and its static KV cache (one slot per concurrently running request)."""

    def __init__(self, model: LlamaModel, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device):
        self.model = model
        self.device = device
        self.cache = KVCache.allocate(model.config, num_slots, max_len, dtype, device)
        self.last_time = 0.0

    @torch.inference_mode()
    def run(self, rows: list[Row]) -> torch.Tensor:
        """Forward all rows in one batch; returns logits [sum(want), V] in row order (float32)."""
        t0 = time.perf_counter()
        width = max(len(r.tokens) for r in rows)
        if width == 1:  # plain decode / draft step: one token per row, no padding, no gather
            return self._run_single(rows, t0)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        pos = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        pick_b, pick_t = [], []
        for b, r in enumerate(rows):
            n = len(r.tokens)
            ids[b, :n] = torch.tensor(r.tokens)
            pos[b, :n] = torch.arange(r.start, r.start + n)
            valid[b, :n] = True
            pick_b += [b] * r.want
            pick_t += range(n - r.want, n)
        slots = torch.tensor([r.slot for r in rows], dtype=torch.long)
        dev = self.device
        hidden = self.model(ids.to(dev), pos.to(dev), cache=self.cache, slots=slots.to(dev),
                            valid=None if bool(valid.all()) else valid.to(dev))
        logits = self.model.compute_logits(hidden[pick_b, pick_t]) if pick_b else hidden.new_empty(0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.last_time = time.perf_counter() - t0
        return logits

    def _run_single(self, rows: list[Row], t0: float) -> torch.Tensor:
        """`run` for rows of one token each (the hot path of drafting): fewer small tensor ops."""
        dev = self.device
        ids = torch.tensor([r.tokens for r in rows], dtype=torch.long, device=dev)
        pos = torch.tensor([[r.start] for r in rows], dtype=torch.long, device=dev)
        slots = torch.tensor([r.slot for r in rows], dtype=torch.long, device=dev)
        hidden = self.model(ids, pos, cache=self.cache, slots=slots)[:, 0]
        want = [b for b, r in enumerate(rows) if r.want]
        if len(want) < len(rows):
            hidden = hidden[want]
        logits = self.model.compute_logits(hidden) if want else hidden.new_empty(0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.last_time = time.perf_counter() - t0
        return logits
