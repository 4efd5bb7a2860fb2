"""The block manager on its own: allocation, reference counts, prefix matching, eviction order."""

from __future__ import annotations

import pytest

from serving.engine.block_manager import BlockManager
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence

BS = 4


def _seq(tokens: list[int], seq_id: int = 0, **params) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, list(tokens), len(tokens), SamplingParams(max_tokens=8, **params))


def _admit_computed(blocks: BlockManager, seq: Sequence) -> list[int]:
    """Admit seq with whatever the cache holds, as if its whole prompt was then computed."""
    hits = blocks.match_prefix(seq)
    assert blocks.admit(seq, hits, seq.num_tokens)
    blocks.register_computed(seq, seq.num_tokens)
    blocks.confirm_step()
    return hits


def test_reserve_is_all_or_nothing_and_release_returns_every_block():
    blocks = BlockManager(num_blocks=4, block_size=BS)
    a, b = _seq([1] * 9), _seq([2] * 5, seq_id=1)
    assert blocks.reserve(a, 9) and len(a.block_table) == 3
    assert not blocks.reserve(b, 5), "two blocks asked, one free"
    assert not b.block_table and blocks.num_free == 1
    assert blocks.reserve(b, 4) and blocks.usage == 1.0
    blocks.release(a)
    blocks.release(b)
    assert blocks.usage == 0.0 and blocks.num_free == 4


def test_a_shared_prefix_is_found_block_by_block_and_only_whole_blocks_count():
    blocks = BlockManager(num_blocks=16, block_size=BS)
    first = _seq([5, 6, 7, 8, 9, 10, 11, 12, 13, 14])  # two full blocks and two tokens
    _admit_computed(blocks, first)
    same_start = _seq([5, 6, 7, 8, 9, 10, 11, 12, 99, 98, 97], seq_id=1)
    hits = blocks.match_prefix(same_start)
    assert hits == first.block_table[:2].tolist()
    differs_in_block_two = _seq([5, 6, 7, 8, 9, 10, 0, 12, 13, 14], seq_id=2)
    assert blocks.match_prefix(differs_in_block_two) == first.block_table[:1].tolist()


def test_a_block_matches_only_after_the_same_prefix():
    blocks = BlockManager(num_blocks=16, block_size=BS)
    _admit_computed(blocks, _seq([1, 2, 3, 4, 5, 6, 7, 8, 0]))
    # Block [5, 6, 7, 8] is cached, but after [1, 2, 3, 4]: its K/V would be wrong after anything else.
    assert blocks.match_prefix(_seq([5, 6, 7, 8, 5, 6, 7, 8, 0], seq_id=1)) == []


def test_a_fully_cached_prompt_still_computes_its_last_block():
    blocks = BlockManager(num_blocks=16, block_size=BS)
    first = _seq(list(range(10, 18)))  # exactly two blocks
    _admit_computed(blocks, first)
    again = _seq(list(range(10, 18)), seq_id=1)
    assert blocks.match_prefix(again) == first.block_table[:1].tolist()


def test_shared_blocks_are_reference_counted():
    blocks = BlockManager(num_blocks=8, block_size=BS)
    a = _seq(list(range(1, 10)))
    _admit_computed(blocks, a)
    b = _seq(list(range(1, 10)), seq_id=1)
    hits = _admit_computed(blocks, b)
    assert hits == a.block_table[:2].tolist() == b.block_table[:2].tolist()
    assert blocks.num_free == 8 - 3 - 1, "b holds the two shared blocks and one of its own"
    blocks.release(a)
    assert blocks.num_free == 8 - 3, "the shared blocks stay held by b"
    blocks.release(b)
    assert blocks.num_free == 8 and blocks.usage == 0.0
    assert blocks.match_prefix(_seq(list(range(1, 10)), seq_id=2)) == hits, "finished, still cached"


def test_eviction_takes_unregistered_blocks_first_then_the_least_recently_freed():
    blocks = BlockManager(num_blocks=6, block_size=BS)
    old = _seq([1, 2, 3, 4, 5, 6, 7, 8])
    _admit_computed(blocks, old)
    old_blocks = list(old.block_table)
    blocks.release(old)
    new = _seq([9, 10, 11, 12, 13, 14, 15, 16], seq_id=1)
    _admit_computed(blocks, new)
    blocks.release(new)
    assert blocks.num_cached_blocks == 4
    # Two free blocks hold nothing: they go first, and every cached block survives.
    grab = _seq([0] * 8, seq_id=2)
    assert blocks.reserve(grab, 8)
    assert blocks.num_cached_blocks == 4
    # The next block needed evicts the least recently freed sequence's blocks, its last block first.
    more = _seq([0] * 4, seq_id=3)
    assert blocks.reserve(more, 4)
    assert len(blocks.match_prefix(_seq([9, 10, 11, 12, 13, 14, 15, 16, 0], seq_id=5))) == 2
    assert blocks.match_prefix(_seq([1, 2, 3, 4, 5, 6, 7, 8, 0], seq_id=6)) == old_blocks[:1]
    assert more.block_table.tolist() == old_blocks[1:]


def test_admission_counts_cached_free_blocks_against_the_free_pool():
    blocks = BlockManager(num_blocks=3, block_size=BS)
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8])
    _admit_computed(blocks, a)
    blocks.release(a)  # both blocks cached, all three free
    b = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], seq_id=1)
    hits = blocks.match_prefix(b)
    assert len(hits) == 2
    assert not blocks.admit(b, hits, 13), "two hits plus two new blocks: four, of three"
    assert not b.block_table and blocks.num_free == 3 and blocks.num_cached_blocks == 2
    assert blocks.admit(b, hits, 12)


def test_a_failed_step_forgets_what_it_registered():
    blocks = BlockManager(num_blocks=8, block_size=BS)
    a = _seq(list(range(1, 10)))
    assert blocks.admit(a, [], 9)
    blocks.register_computed(a, 9)
    assert len(blocks.match_prefix(_seq(list(range(1, 10)), seq_id=1))) == 2, "visible within the step"
    blocks.discard_step()
    blocks.release(a)
    assert blocks.match_prefix(_seq(list(range(1, 10)), seq_id=2)) == []
    assert blocks.num_cached_blocks == 0


@pytest.mark.parametrize("reason", ["prompt logprobs", "caching off"])
def test_no_hits_when_caching_is_off_or_the_prompt_must_be_scored(reason):
    blocks = BlockManager(num_blocks=8, block_size=BS, prefix_caching=reason != "caching off")
    _admit_computed(blocks, _seq(list(range(1, 10))))
    probe = _seq(list(range(1, 10)), seq_id=1)
    if reason == "prompt logprobs":
        probe.prompt_logprobs = [None]
    assert blocks.match_prefix(probe) == []
