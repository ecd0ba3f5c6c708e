"""Model runner: turns ragged per-request token runs into batched forwards over the KV cache.

Rows of unequal length run packed (unless padding would be a tiny share of the grid, see
``PACK_MIN_PADDING``): every per-token op sees only the real tokens, and only attention pads them to the
longest row (see ``LlamaModel.forward``); docs/packed_forward.md has the measurements.

The engine speaks in rows ("feed these tokens of this request starting at this position, and give me
logits for the last n of them"); the runner owns tensors, padding, the caches and the clock.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from adaspec.model import KVCache, LlamaModel

# Pack only when more than this share of the [rows, longest row] grid is padding. Below it packing gained
# at most 2.4%, and with one padding cell it lost 1-3% (GEMMs over 63 rows were slower than over 64 on the
# CPU measured); from 6% on it won every time (docs/packed_forward.md).
PACK_MIN_PADDING = 0.05


@dataclass
class Row:
    slot: int
    tokens: list[int]
    start: int  # absolute position of tokens[0]
    want: int  # logits wanted for the last `want` tokens (0: only fill the cache)


class ModelRunner:
    """One model and its static KV cache (one slot per concurrently running request)."""

    def __init__(self, model: LlamaModel, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, packed: bool = True):
        self.model = model
        self.device = device
        self.cache = KVCache.allocate(model.config, num_slots, max_len, dtype, device)
        self.packed = packed  # False: ragged rows always run padded to the longest (for comparison)
        self.pack_min_padding = PACK_MIN_PADDING
        self.last_time = 0.0

    @torch.inference_mode()
    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a request's first `length` cache positions from slot `src` to slot `dst` (see
        `Scheduler.compact`)."""
        n = min(length, self.cache.max_len)
        for k, v in zip(self.cache.k, self.cache.v, strict=True):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]

    @torch.inference_mode()
    def run(self, rows: list[Row]) -> torch.Tensor:
        """Forward all rows in one batch; returns logits [sum(want), V] in row order (float32)."""
        t0 = time.perf_counter()
        width = max(len(r.tokens) for r in rows)
        if width == 1:  # plain decode / draft step: one token per row, no padding, no gather
            return self._run_single(rows, t0)
        B, lengths = len(rows), [len(r.tokens) for r in rows]
        ids, pos = [], []
        for r, n in zip(rows, lengths, strict=True):
            ids += r.tokens
            ids += [0] * (width - n)
            pos += range(r.start, r.start + n)
            pos += [0] * (width - n)
        padding = B * width - sum(lengths)
        packed = self.packed and padding > self.pack_min_padding * B * width
        # Row b's tokens start at offset[b] in the flat [tokens, hidden] the model returns.
        offset = [0, *itertools.accumulate(lengths[:-1])] if packed else range(0, B * width, width)
        pick = [i for r, o, n in zip(rows, offset, lengths, strict=True)
                for i in range(o + n - r.want, o + n)]
        dev = self.device
        valid = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).to(dev) if padding else None
        hidden = self.model(torch.tensor(ids, device=dev).view(B, width),
                            torch.tensor(pos, device=dev).view(B, width),
                            cache=self.cache, slots=torch.tensor([r.slot for r in rows], device=dev),
                            valid=valid, packed=packed)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        logits = self.model.compute_logits(hidden[pick]) if pick else hidden.new_empty(0)
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
