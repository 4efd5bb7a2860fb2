"""Continuous batching: each step picks which sequences run and how many of their tokens.

Decoding sequences go first (one token each), then sequences still prefilling, then newly
admitted ones, all within a per-step token budget, so a long prompt is prefilled in chunks
instead of stalling everyone's next token. When the KV cache runs out, the newest running
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed later. Requests therefore wait rather than fail when memory is short.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serving.engine.block_manager import BlockManager
from serving.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    # (sequence, number of its tokens to compute this step), in the order the runner packs them
    items: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_batched_tokens: int):
        if max_batched_tokens < max_batch_size:
            raise ValueError("max_batched_tokens must be at least max_batch_size")
        self.blocks = block_manager
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_batched_tokens
        decoding = [s for s in self.running if s.num_tokens - s.num_cached == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_cached > 1]
        for seq in decoding + prefilling:
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted earlier in this loop, or out of budget until next step
            chunk = min(seq.num_tokens - seq.num_cached, budget)
            if self._reserve_or_preempt(seq, seq.num_cached + chunk, batch):
                batch.items.append((seq, chunk))
                budget -= chunk
        if batch.preempted:
            return batch  # memory is short: don't admit anything new this step
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            chunk = min(seq.num_tokens, budget)
            if not self.blocks.reserve(seq, chunk):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.items.append((seq, chunk))
            budget -= chunk
        return batch

    def _reserve_or_preempt(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        while not self.blocks.reserve(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        batch.items = [(s, n) for s, n in batch.items if s is not seq]
