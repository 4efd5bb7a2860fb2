"""Paged KV-cache bookkeeping, with automatic prefix caching.

The cache is `num_blocks` blocks of `block_size` token slots. A sequence holds a block table; a
block may be held by several sequences at once (reference counted) when they share a prefix.

Prefix caching: once a full block's K/V are computed, the block is registered under a content hash
chained over the whole prefix, hash(parent block's hash, the block's token ids). The K/V of a token
depend only on the tokens before it and the LoRA adapter it runs with (the model and its dtype are
fixed for the process; the chain starts from the adapter's id), so a new sequence of that adapter
whose prompt starts with the same tokens takes those blocks instead of recomputing them.
Blocks stay registered after their sequences finish and are evicted least recently freed first,
only when a block is needed; blocks that hold nothing reusable are handed out before any of them.

A block is registered when the scheduler schedules the step that computes it, so a sequence
admitted later in the same step (the n choices of one request, say) can already share it: every
layer writes the step's new K/V before any query reads the cache. If the step's forward pass then
fails, `discard_step` forgets what the step registered.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from serving.engine.sequence import Sequence


def _root(adapter: int) -> bytes:
    """What a stream's first block hash chains from: a LoRA adapter computes other K/V for the same tokens."""
    return adapter.to_bytes(8, "little") if adapter else b""


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """The content address of a full block: its token ids, chained to every block before it."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}  # registered hash -> block
        # Free blocks, next to hand out first: unregistered ones, then registered ones least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._registered_this_step: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks held by sequences (cached blocks nobody holds count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    # -- prefix lookup and admission -----------------------------------------------------------

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """seq's block hashes for its first num_blocks full blocks (computed once, kept on seq)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else _root(seq.params.adapter), seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes[:num_blocks]

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Registered blocks holding seq's leading tokens. At least the last token is always left to
        compute (its logits are needed), so a fully cached prompt gives up its last block."""
        if not self.prefix_caching or seq.prompt_logprobs is not None:  # prompt scoring needs every logit
            return []
        hits: list[int] = []
        for h in self._hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._block_of.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Give a waiting seq the hit blocks plus new ones to hold num_tokens; all or nothing."""
        assert not seq.block_table
        new = -(-num_tokens // self.block_size) - len(hits)
        idle_hits = sum(1 for b in hits if self._refs[b] == 0)  # cached but free: they leave the free list
        if new > len(self._free) - idle_hits:
            return False
        for b in hits:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1
        seq.block_table = array("q", hits)
        seq.block_table.extend(self._take() for _ in range(new))
        seq.num_registered = len(hits)
        return True

    # -- growth and release --------------------------------------------------------------------

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens; all or nothing. (Called for every running sequence
        every step: the usual answer, room left in its last block, comes first.)"""
        needed = -(-num_tokens // self.block_size) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > len(self._free):
            return False
        seq.block_table.extend(self._take() for _ in range(needed))
        return True

    def _take(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._hash_of[block]
        if h is not None:  # evict: its contents are about to be overwritten
            self._hash_of[block] = None
            del self._block_of[h]
        self._refs[block] = 1
        return block

    def release(self, seq: Sequence) -> None:
        """Drop seq's hold on its blocks. Blocks nobody holds become free; registered ones keep their
        contents until evicted, the sequence's last blocks first (they are the least shared)."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if self._hash_of[block] is None:
                    self._free.move_to_end(block, last=False)  # nothing reusable in it: hand it out first
        seq.block_table = array("q")
        seq.num_cached = 0
        seq.num_registered = 0

    # -- registration --------------------------------------------------------------------------

    def register_computed(self, seq: Sequence, num_tokens: int) -> None:
        """seq's first num_tokens tokens will have their K/V in the cache once this step runs:
        register the full blocks among them."""
        if not self.prefix_caching:
            return
        full = num_tokens // self.block_size
        if full <= seq.num_registered:
            return
        for i, h in enumerate(self._hashes(seq, full)[seq.num_registered :], start=seq.num_registered):
            block = seq.block_table[i]
            if h not in self._block_of and self._hash_of[block] is None:
                self._block_of[h] = block
                self._hash_of[block] = h
                self._registered_this_step.append(block)
        seq.num_registered = full

    def confirm_step(self) -> None:
        """The step's forward pass wrote what was registered for it."""
        self._registered_this_step.clear()

    def discard_step(self) -> None:
        """The step's forward pass failed: what it was to compute is not in the cache."""
        for block in self._registered_this_step:
            h = self._hash_of[block]
            if h is not None and self._block_of.get(h) == block:
                del self._block_of[h]
                self._hash_of[block] = None
        self._registered_this_step.clear()
