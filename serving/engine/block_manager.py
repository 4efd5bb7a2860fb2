"""Paged KV-cache bookkeeping: fixed-size blocks handed to sequences on demand, returned on finish."""

from __future__ import annotations

from collections import deque

from serving.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks still to allocate so that `seq` can hold `num_tokens` tokens."""
        total = -(-num_tokens // self.block_size)
        return max(0, total - len(seq.block_table))

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens; all or nothing."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            seq.block_table.append(self._free.popleft())
        return True

    def release(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table.clear()
        seq.num_cached = 0
