import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from serving.engine.sampler import sample
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence

VOCAB = 64


def _seq(seq_id=0, prompt=(1, 2, 3), output=(), **params) -> Sequence:
    params.setdefault("max_tokens", 16)
    p = SamplingParams(**params)
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    return Sequence(seq_id, f"r{seq_id}", 0, [*prompt, *output], len(prompt), p, gen)


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def test_greedy_rows_take_the_argmax_while_others_sample():
    logits = _logits(3)
    seqs = [_seq(0, temperature=0.0), _seq(1, temperature=1.0, seed=7), _seq(2, temperature=0.0)]
    out = sample(logits, seqs).token_ids
    assert out[0] == logits[0].argmax().item()
    assert out[2] == logits[2].argmax().item()


def test_seeded_sampling_is_reproducible_and_independent_of_batch_neighbours():
    logits = torch.zeros(1, VOCAB)  # flat: every token equally likely, so only the seed decides

    def draws(seed, neighbours):
        seq = _seq(0, temperature=1.0, seed=seed)
        others = [_seq(i + 1, temperature=1.0) for i in range(neighbours)]
        batch_logits = logits.expand(1 + neighbours, VOCAB)
        return [sample(batch_logits, [seq, *others]).token_ids[0] for _ in range(20)]

    assert draws(42, 0) == draws(42, 0)
    assert draws(42, 0) == draws(42, 5), "a seeded request must not depend on who shares its batch"
    assert draws(42, 0) != draws(43, 0)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = torch.full((1, VOCAB), -math.inf)
    logits[0, :3] = probs.log()
    seq = _seq(0, temperature=1.0, seed=1)
    counts = torch.zeros(VOCAB)
    for _ in range(3000):
        counts[sample(logits, [seq]).token_ids[0]] += 1
    assert torch.allclose(counts[:3] / 3000, probs, atol=0.03)
    assert counts[3:].sum() == 0


@pytest.mark.parametrize("params", [dict(top_k=1), dict(top_p=1e-6), dict(top_p=1e-300), dict(min_p=1.0)])
def test_truncation_to_one_token_is_the_argmax(params):
    logits = _logits(4, seed=3)
    seqs = [_seq(i, temperature=1.5, **params) for i in range(4)]
    assert sample(logits, seqs).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("params", [dict(temperature=1e-300), dict(temperature=1e-38), dict(temperature=1e-6, seed=3),
                                    dict(temperature=1e-300, top_p=1e-300, repetition_penalty=1e-300)])  # fmt: skip
def test_vanishing_settings_that_the_api_accepts_are_the_argmax_not_nan(params):
    """A temperature, top_p or repetition penalty small enough to be zero in float32 once divided by or
    compared with must not make NaN logits (token 0 every time; outside any grammar)."""
    logits = _logits(4, seed=11)
    seqs = [_seq(i, prompt=(), **params) for i in range(4)]  # nothing seen: the penalty changes nothing
    assert sample(logits, seqs).token_ids == logits.argmax(-1).tolist()


def test_a_vanishing_repetition_penalty_still_ranks_seen_tokens_without_infinities():
    """Below 1 the penalty favours seen tokens (Hugging Face's rule); at 1e-300, zero in float32, both seen
    tokens would become +inf and tie: applied as MIN_REPETITION_PENALTY they keep their order."""
    logits = torch.full((1, VOCAB), -1.0)
    logits[0, 1], logits[0, 3], logits[0, 7] = 0.5, 1.0, 2.0
    seq = _seq(0, prompt=(1, 3), temperature=0.0, repetition_penalty=1e-300)
    assert sample(logits, [seq]).token_ids == [3]


def test_top_k_never_leaves_the_k_best():
    logits = _logits(1, seed=5)
    best = set(logits[0].topk(3).indices.tolist())
    seq = _seq(0, temperature=2.0, top_k=3, seed=9)
    assert {sample(logits, [seq]).token_ids[0] for _ in range(200)} <= best


def test_repetition_penalty_matches_transformers():
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 3.0  # a seen token with the best positive logit
    logits[0, 7] = -0.1  # a seen token with a negative logit
    logits[0, 9] = 2.0  # unseen runner-up: wins once 5 is penalised
    seq = _seq(0, prompt=(5, 6), output=(7, 5), temperature=0.0, repetition_penalty=1.8)
    hf = RepetitionPenaltyLogitsProcessor(1.8)(torch.tensor([[5, 6, 7, 5]]), logits.clone())
    token = sample(logits, [seq]).token_ids[0]
    assert token == hf.argmax().item() == 9


def test_a_repetition_window_penalizes_the_last_tokens_only():
    """llama.cpp's repeat_last_n: token 5, seen long ago, keeps its logit; 9, among the last two, is penalized."""
    logits = torch.zeros(1, VOCAB)
    logits[0, 5], logits[0, 9], logits[0, 11] = 3.0, 2.9, 2.0
    old = _seq(0, prompt=(5, 6, 7), output=(8, 9), temperature=0.0, repetition_penalty=2.0, repetition_window=2)
    assert sample(logits.clone(), [old]).token_ids[0] == 5
    everywhere = _seq(0, prompt=(5, 6, 7), output=(8, 9), temperature=0.0, repetition_penalty=2.0)
    assert sample(logits.clone(), [everywhere]).token_ids[0] == 11  # 5 and 9 both penalized


def test_frequency_and_presence_penalties_push_repeats_down():
    logits = torch.zeros(1, VOCAB)
    logits[0, 10] = 2.0
    logits[0, 11] = 1.5
    repeat = _seq(0, output=(10, 10), temperature=0.0, frequency_penalty=0.5)
    assert sample(logits, [repeat]).token_ids[0] == 11  # 2.0 - 2*0.5 = 1.0 < 1.5
    present = _seq(1, output=(10,), temperature=0.0, presence_penalty=0.4)
    assert sample(logits, [present]).token_ids[0] == 10  # 2.0 - 0.4 = 1.6 > 1.5
    no_penalty = _seq(2, output=(10, 10), temperature=0.0)
    assert sample(logits, [no_penalty]).token_ids[0] == 10


def test_min_tokens_blocks_end_of_sequence():
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 10.0  # EOS is by far the most likely
    from dataclasses import replace

    seq = _seq(0, temperature=0.0, min_tokens=2)
    seq.params = replace(seq.params, extra_eos_ids=(2,))
    assert sample(logits, [seq]).token_ids[0] != 2
    seq.token_ids += [5, 6]
    assert sample(logits, [seq]).token_ids[0] == 2


def test_min_tokens_gives_way_where_the_end_is_all_that_is_left():
    """A grammar that has ended (a forced tool call complete) masks every token but the end: min_tokens
    must not take that one too, which left nothing to sample (the sequence failed, a 500). A neighbour
    whose end is not the only choice is still held to its min_tokens."""
    from dataclasses import replace

    logits = torch.zeros(2, VOCAB)
    logits[0, :] = -math.inf
    logits[0, 2] = 0.0  # only the end is allowed
    logits[1, 2] = 10.0  # the end is the most likely, not the only choice
    seqs = [_seq(i, temperature=t, min_tokens=5, seed=3) for i, t in enumerate((0.0, 1.0))]
    for seq in seqs:
        seq.params = replace(seq.params, extra_eos_ids=(2,))
    for _ in range(5):
        ended, other = sample(logits, seqs).token_ids
        assert ended == 2 and other != 2


def test_logprobs_are_the_models_and_sorted():
    logits = _logits(1, seed=13)
    seq = _seq(0, temperature=0.0, logprobs=3)
    result = sample(logits, [seq])
    entry = result.logprobs[0]
    expected = logits[0].log_softmax(-1)
    assert entry.token_id == result.token_ids[0]
    assert entry.logprob == pytest.approx(expected.max().item(), abs=1e-5)
    assert [t for t, _ in entry.top] == expected.topk(3).indices.tolist()
    assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)


def test_logit_bias_steers_greedy_and_sampling_but_not_reported_logprobs():
    logits = _logits(2, seed=17)
    target = int(logits[0].argmin())
    greedy = _seq(0, temperature=0.0, logit_bias=((target, 100.0),), logprobs=0)
    sampled = _seq(1, temperature=1.0, seed=3, logit_bias=((target, 100.0),))
    result = sample(logits, [greedy, sampled])
    assert result.token_ids == [target, target]
    assert result.logprobs[0].logprob == pytest.approx(logits[0].log_softmax(-1)[target].item(), abs=1e-5)


def test_a_token_given_two_biases_takes_the_last_not_their_sum():
    # "05" and "5" are both token 5 once the API parses logit_bias keys: one bias per token, as a dict has.
    logits = torch.zeros(2, VOCAB)
    logits[:, 9] = 1.0  # the argmax without biases
    once = _seq(0, temperature=0.0, logit_bias=((5, 0.6),))
    twice = _seq(1, temperature=0.0, logit_bias=((5, 0.6), (5, 0.6)))  # summed, 1.2 would beat token 9
    assert sample(logits, [once, twice]).token_ids == [9, 9]
    last = _seq(2, temperature=0.0, logit_bias=((5, -5.0), (5, 3.0)))
    assert sample(logits[:1], [last]).token_ids == [5]


def test_logprobs_of_every_row_come_back_exact_and_rows_without_them_get_none():
    logits = _logits(3, seed=21)
    seqs = [_seq(0, temperature=0.0, logprobs=2), _seq(1, temperature=0.0), _seq(2, temperature=0.0, logprobs=0)]
    result = sample(logits, seqs)
    expected = logits.float().log_softmax(-1)
    assert result.token_ids == expected.argmax(-1).tolist()
    first, none, zero = result.logprobs
    assert none is None and zero.top == []
    assert first.logprob == expected[0].max().item()  # float32 values carried exactly, not rounded
    assert first.top == list(zip(expected[0].topk(2).indices.tolist(), expected[0].topk(2).values.tolist(), strict=True))
    assert all(isinstance(t, int) for t, _ in first.top) and isinstance(first.token_id, int)
