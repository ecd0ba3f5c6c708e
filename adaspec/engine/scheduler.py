"""Continuous batching: a FIFO waiting queue, a fixed set of KV slots, prefill-first steps.

Memory is known up front: one cache slot of `max_model_len` positions per concurrently running
request (`max_num_seqs` slots, for target and draft each). A request waits until a slot frees up;
a request that could never fit (prompt too long) is refused when it is added, so nothing is lost.

Running requests hold slots 0..n-1, in slot order (`compact` moves the highest into a freed one),
so a batch of all of them reads the caches through a view: rows in any other order make every
forward gather each row's cache, which cost 2-3 ms of a 11-17 ms target forward and 0.7 ms of a
1.4 ms draft forward at batch 16, context 500 on the 2-core host (measured in session 13; the
start-up profile, taken on contiguous slots, never saw that cost).
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from operator import attrgetter

from adaspec.engine.sequence import Sequence, Status

_slot = attrgetter("slot")


class Scheduler:
    def __init__(self, max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int):
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in slot order
        self.free_slots = list(range(max_num_seqs))  # a min-heap: the lowest free slot is taken first

    def add(self, seq: Sequence) -> None:
        if seq.num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {seq.num_prompt_tokens} tokens; max_model_len={self.max_model_len} leaves "
                "no room for output (prompt too long)")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule_prefill(self) -> list[Sequence]:
        """Admit waiting requests in arrival order while slots and the step's token budget allow.

        The first request is always admitted when a slot is free, whatever its length, so a long
        prompt cannot be starved by the budget."""
        batch: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            if batch and seq.num_prompt_tokens > budget:
                break
            self.waiting.popleft()
            seq.slot = heapq.heappop(self.free_slots)
            seq.status = Status.RUNNING
            budget -= seq.num_prompt_tokens
            batch.append(seq)
            bisect.insort(self.running, seq, key=_slot)
        return batch

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished and give its slot back (rows of a freed slot are simply overwritten)."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = None

    def compact(self) -> list[tuple[Sequence, int, int]]:
        """Move running requests from the highest slots into lower free ones until they hold slots
        0..n-1. Returns the moves (request, old slot, new slot): the caller copies the cache rows
        (a simulator has none to copy)."""
        moves = []
        while self.running and self.free_slots and self.free_slots[0] < self.running[-1].slot:
            seq = self.running.pop()
            old, seq.slot = seq.slot, heapq.heapreplace(self.free_slots, seq.slot)
            bisect.insort(self.running, seq, key=_slot)
            moves.append((seq, old, seq.slot))
        return moves

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
