"""The scheduler on its own: what each step computes, in what order, and what happens when
the budget, the batch size or the KV cache runs out."""

from __future__ import annotations

from serving.engine.block_manager import BlockManager
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence, SequenceStatus

BS = 4


def _seq(seq_id: int, length: int, first_token: int = 1) -> Sequence:
    tokens = [first_token + i for i in range(length)]
    return Sequence(seq_id, f"r{seq_id}", 0, tokens, length, SamplingParams(max_tokens=8))


def _computed(scheduler: Scheduler, batch, sampled: int = 7) -> None:
    """What the engine does after the forward pass: count the computed tokens, and append a token to
    each sequence whose chunk reached its end."""
    scheduler.blocks.confirm_step()
    for c in batch.chunks:
        c.seq.num_cached += c.num_tokens
        if c.seq.num_cached == c.seq.num_tokens:
            c.seq.token_ids.append(sampled)


def _plan(batch) -> list[tuple[int, int, bool]]:
    return [(c.seq.seq_id, c.num_tokens, c.decode) for c in batch.chunks]


def test_decodes_then_prefills_then_admissions_under_one_budget():
    s = Scheduler(BlockManager(64, BS, prefix_caching=False), max_batch_size=8, max_batched_tokens=10)
    for seq in (_seq(0, 3), _seq(1, 12), _seq(2, 5)):
        s.add(seq)
    first = s.schedule()
    assert _plan(first) == [(0, 3, False), (1, 7, False)], "the budget cuts the second prompt's chunk"
    _computed(s, first)
    second = s.schedule()
    # r0 decodes its sampled token, r1 finishes its prompt (5 more), r2 gets what is left (4 of 5).
    assert _plan(second) == [(0, 1, True), (1, 5, False), (2, 4, False)]
    _computed(s, second)
    third = s.schedule()
    assert _plan(third) == [(0, 1, True), (1, 1, True), (2, 1, False)], "a one-token prefill chunk is a prefill"
    assert third.chunks[2].seq.token_ids[third.chunks[2].seq.num_cached] == 5, "its token is the prompt's last"


def test_a_preempted_sequence_recomputes_its_prompt_and_outputs_as_a_prefill():
    blocks = BlockManager(4, BS, prefix_caching=False)
    s = Scheduler(blocks, max_batch_size=4, max_batched_tokens=16)
    old, new = _seq(0, 7), _seq(1, 7, first_token=50)
    s.add(old)
    s.add(new)
    _computed(s, s.schedule())  # both admitted: two blocks each, the cache is full
    _computed(s, s.schedule())  # both decode their first token (positions 7 fit the second block)
    batch = s.schedule()  # position 8 needs a third block each: the newest is preempted
    assert batch.preempted == [new] and _plan(batch) == [(0, 1, True)]
    assert new.status is SequenceStatus.WAITING and s.waiting[0] is new and not new.block_table
    assert len(batch.chunks) == 1, "nothing is admitted in a step that preempted"
    _computed(s, batch)
    s.remove(old)
    again = s.schedule()
    assert _plan(again) == [(1, new.num_tokens, False)], "prompt and both outputs, computed again"
    assert new.num_tokens == 9


def test_admission_stops_at_the_batch_size_and_keeps_arrival_order():
    s = Scheduler(BlockManager(64, BS), max_batch_size=2, max_batched_tokens=64)
    seqs = [_seq(i, 3, first_token=10 * i) for i in range(4)]
    for seq in seqs:
        s.add(seq)
    first = s.schedule()
    assert [c.seq for c in first.chunks] == seqs[:2]
    assert list(s.waiting) == seqs[2:]
    _computed(s, first)
    s.remove(seqs[0])
    assert [c.seq for c in s.schedule().chunks if not c.decode] == [seqs[2]]


def test_a_new_sequence_starts_after_its_cached_prefix_and_the_budget_counts_computed_tokens():
    blocks = BlockManager(64, BS)
    s = Scheduler(blocks, max_batch_size=4, max_batched_tokens=6)
    donor = _seq(0, 10)
    s.add(donor)
    _computed(s, s.schedule())
    _computed(s, s.schedule())
    s.remove(donor)
    taker = _seq(1, 13)  # the donor's 10 tokens (two blocks are cached) and three more
    s.add(taker)
    batch = s.schedule()
    assert _plan(batch) == [(1, 5, False)] and taker.num_cached == 8
    assert (batch.prefix_queries, batch.prefix_hits) == (13, 8)


def test_removing_a_sequence_frees_its_blocks_wherever_it_is():
    blocks = BlockManager(8, BS, prefix_caching=False)
    s = Scheduler(blocks, max_batch_size=1, max_batched_tokens=16)
    running, waiting = _seq(0, 5), _seq(1, 5)
    s.add(running)
    s.add(waiting)
    s.schedule()
    assert blocks.num_free == 6
    s.remove(waiting)
    s.remove(running)
    assert blocks.num_free == 8 and not s.has_work


def test_prompt_rows_scored_for_echo_logprobs_have_a_budget_per_step():
    """Each scored row is a [vocab] float32 row of logits: a long echo+logprobs prompt is prefilled in
    chunks that score at most max_scored_rows, whatever the token budget; unscored prompts are not held."""
    s = Scheduler(BlockManager(64, BS, prefix_caching=False), max_batch_size=8, max_batched_tokens=100, max_scored_rows=5)
    scored, other, second = _seq(0, 12), _seq(1, 9), _seq(2, 4)
    scored.prompt_logprobs = [None]
    second.prompt_logprobs = [None]
    for seq in (scored, other, second):
        s.add(seq)
    first = s.schedule()
    # Positions 0..4 score tokens 1..5; the unscored prompt takes its whole length; the second scored
    # prompt finds the scoring budget spent and waits (admission keeps arrival order).
    assert _plan(first) == [(0, 5, False), (1, 9, False)]
    scored.prompt_logprobs.extend([None] * 5)
    _computed(s, first)
    assert _plan(s.schedule()) == [(1, 1, True), (0, 5, False)]


def test_rows_scored_before_a_preemption_are_recomputed_without_their_budget():
    seq = _seq(0, 12)
    seq.prompt_logprobs = [None] * 9  # positions 0..7 were scored before it was preempted
    assert seq.scored_positions(0, 12) == range(8, 11), "the last prompt token scores nothing"
    s = Scheduler(BlockManager(64, BS, prefix_caching=False), max_batch_size=8, max_batched_tokens=100, max_scored_rows=2)
    s.add(seq)
    assert _plan(s.schedule()) == [(0, 10, False)], "8 recomputed rows, then the 2 the budget scores"
