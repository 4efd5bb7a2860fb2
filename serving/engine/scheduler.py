"""Continuous batching: each step picks which sequences run, and says of each whether it decodes
(one token, the one sampled last) or prefills (a chunk of its prompt, or after a preemption of its
prompt and outputs) and how many tokens.

Decoding sequences go first, then sequences still prefilling, then newly admitted ones, all within
a per-step token budget, so a long prompt is prefilled in chunks instead of stalling everyone's
next token. A new sequence starts after the leading blocks the prefix cache already holds. When
the KV cache runs out, the newest running sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed later. Requests wait rather than fail when memory
is short.

Prompt rows scored for echo + logprobs take a [rows, vocab] float32 block of logits each (half a
megabyte at a 128k vocabulary): their number per step has a budget of its own (SCORED_ROWS_PER_STEP),
which the builder's memory profile includes, so a long scored prompt is prefilled in smaller chunks
rather than taking gigabytes the KV cache was sized to use.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serving.engine.block_manager import BlockManager
from serving.engine.sequence import Sequence, SequenceStatus

SCORED_ROWS_PER_STEP = 256


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens of seq computed this step, from seq.num_cached on
    decode: bool  # True: the one token sampled last; False: a prefill chunk (maybe of one token)


@dataclass(slots=True)
class ScheduledBatch:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # in the order the runner packs them
    preempted: list[Sequence] = field(default_factory=list)
    prefix_queries: int = 0  # prompt tokens of first-time admissions looked up in the prefix cache
    prefix_hits: int = 0  # ... found there

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_batch_size: int,
        max_batched_tokens: int,
        max_scored_rows: int = SCORED_ROWS_PER_STEP,
    ):
        if max_batched_tokens < max_batch_size:
            raise ValueError("max_batched_tokens must be at least max_batch_size")
        if max_scored_rows < 1:
            raise ValueError("max_scored_rows must be at least 1")
        self.blocks = block_manager
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max_batched_tokens
        self.max_scored_rows = max_scored_rows
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
        budget, scoring = self.max_batched_tokens, self.max_scored_rows
        decoding: list[Sequence] = []
        prefilling: list[Sequence] = []
        for seq in self.running:
            (decoding if seq.is_decoding else prefilling).append(seq)
        for seq in decoding + prefilling:
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted earlier in this loop, or out of budget until next step
            decode = seq.is_decoding
            n = 1
            if not decode:
                n, scored = _within_scoring(seq, seq.num_cached, min(seq.prefill_end - seq.num_cached, budget), scoring)
                scoring -= scored
            if n == 0:
                continue  # its next prompt rows to score wait for the next step's scoring budget
            if self.blocks.reserve(seq, seq.num_cached + n) or self._preempt_until_reserved(seq, seq.num_cached + n, batch):
                batch.chunks.append(ScheduledChunk(seq, n, decode))
                budget -= n
        # Registered only now: a sequence preempted above never computes what it was scheduled for.
        for chunk in batch.chunks:
            self.blocks.register_computed(chunk.seq, chunk.seq.num_cached + chunk.num_tokens)
        if batch.preempted:
            return batch  # memory is short: don't admit anything new this step
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            hits = self.blocks.match_prefix(seq)
            cached = len(hits) * self.blocks.block_size
            n, scored = _within_scoring(seq, cached, min(seq.num_tokens - cached, budget), scoring)
            scoring -= scored
            if n == 0 or not self.blocks.admit(seq, hits, cached + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_cached, seq.prefill_end = cached, seq.num_tokens
            if seq.cached_prompt_tokens is None:  # first admission (a recompute is not a new query)
                seq.cached_prompt_tokens = cached
                batch.prefix_queries += seq.prompt_len
                batch.prefix_hits += cached
            self.running.append(seq)
            batch.chunks.append(ScheduledChunk(seq, n, decode=False))
            self.blocks.register_computed(seq, cached + n)
            budget -= n
        return batch

    def _preempt_until_reserved(self, seq: Sequence, num_tokens: int, batch: ScheduledBatch) -> bool:
        """Preempt the newest running sequences until seq's blocks fit; False if seq was preempted itself."""
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
        batch.chunks = [c for c in batch.chunks if c.seq is not seq]


def _within_scoring(seq: Sequence, start: int, n: int, scoring: int) -> tuple[int, int]:
    """A prefill chunk of n tokens from `start`, shortened so the prompt rows it scores fit the `scoring`
    rows left of the step's budget (0 tokens: none fit); returns its tokens and the rows it scores."""
    scored = seq.scored_positions(start, start + n)
    if len(scored) > scoring:
        n = scored.start + scoring - start
        scored = seq.scored_positions(start, start + n)
    return n, len(scored)
