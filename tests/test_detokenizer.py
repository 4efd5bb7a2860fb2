import pytest
from transformers import AutoTokenizer

from serving.engine.detokenizer import IncrementalDetokenizer, fast_decoder
from serving.models.source import demo_model_dir


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(demo_model_dir())


def _stream(tok, prompt: str, completion: str, stop=()):
    prompt_ids = tok(prompt).input_ids
    ids = tok(prompt + completion).input_ids[len(prompt_ids) :]
    detok = IncrementalDetokenizer(tok, prompt_ids, tuple(stop))
    pieces = []
    for t in ids:
        pieces.append(detok.add_token(t))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    return pieces, detok


@pytest.mark.parametrize(
    "completion",
    [" time, there was a girl.", " wörld — naïve café ☃ 日本", "  two  spaces\nand a newline", "12345 + 678"],
)
def test_incremental_text_equals_full_decode(tok, completion):
    prompt = "Once upon a"
    pieces, _ = _stream(tok, prompt, completion)
    prompt_ids = tok(prompt).input_ids
    full_ids = tok(prompt + completion).input_ids
    expected = tok.decode(full_ids, skip_special_tokens=True)[len(tok.decode(prompt_ids, skip_special_tokens=True)) :]
    assert "".join(pieces) == expected
    assert all("\ufffd" not in p for p in pieces), "a split multi-byte character leaked out"


def test_stop_string_across_tokens_is_cut_and_never_emitted(tok):
    pieces, detok = _stream(tok, "Once", " upon a time the big dog sat on the mat and slept.", stop=["the mat"])
    text = "".join(pieces)
    assert detok.stopped
    assert text == " upon a time the big dog sat on "
    # Nothing that was emitted may contain the stop string or end with the start of it.
    assert "the mat" not in text
    assert len(tok(" the mat").input_ids) > 2, "the stop string must span several tokens for this test"


def test_earliest_of_several_stop_strings_wins(tok):
    pieces, _ = _stream(tok, "Once", " upon a time, a cat. A dog. The end.", stop=["The end", "dog"])
    assert "".join(pieces) == " upon a time, a cat. A "


def test_held_back_prefix_is_flushed_when_no_stop_follows(tok):
    pieces, detok = _stream(tok, "Once", " upon a time the", stop=["the mat"])
    assert not detok.stopped
    assert "".join(pieces) == " upon a time the"
    assert pieces[-1].endswith("the"), "'the' could start 'the mat' so it waits for the flush"


def test_fast_decoder_gives_the_tokenizers_own_text(tok):
    fast = fast_decoder(tok)
    assert fast is not tok  # a fast tokenizer that cleans up no spaces: its Rust backend
    ids = tok(" wörld — naïve café ☃ 日本, 12345 + 678  two  spaces\n").input_ids
    specials = [tok.bos_token_id, tok.eos_token_id]
    for window in (ids, ids[3:7], ids[-2:], specials + ids[:4] + specials, [ids[5]]):
        for skip in (True, False):
            assert fast.decode(window, skip_special_tokens=skip) == tok.decode(window, skip_special_tokens=skip)
    tok_clean = AutoTokenizer.from_pretrained(demo_model_dir(), clean_up_tokenization_spaces=True)
    assert fast_decoder(tok_clean) is tok_clean  # transformers' clean-up changes text: keep its decode


def _choice_deltas(tok, prompt: str, completion: str, stop=(), eos: bool = False):
    """Feed a ChoiceText the completion's tokens one output at a time, each with a logprob entry
    (logprob -i for the i-th token, so entries name their token); returns the deltas."""
    from serving.engine.output_processor import ChoiceText
    from serving.engine.protocol import SequenceOutput, TokenLogprob

    prompt_ids = tok(prompt).input_ids
    ids = tok(prompt + completion).input_ids[len(prompt_ids) :] + ([tok.eos_token_id] if eos else [])
    choice = ChoiceText(tok, prompt_ids, tuple(stop))
    deltas = []
    for i, token in enumerate(ids):
        last = i == len(ids) - 1
        reason = ("stop" if eos else "length") if last else None
        out = SequenceOutput("r", 0, [token], [TokenLogprob(token, -float(i), [])], reason)
        if (delta := choice.process(out)) is not None:
            deltas.append(delta)
        if choice.finished:
            break
    return ids, deltas


def test_tokens_and_logprobs_go_with_the_text_they_start(tok):
    """A token held back as a possible stop-string start is shown with its text, not before; the
    tokens whose text starts inside the stop string are never shown, but usage counts them."""
    completion = " time, there was a girl named Lily."
    ids, deltas = _choice_deltas(tok, "Once upon a", completion, stop=(" a girl",))
    text = "".join(d.text for d in deltas)
    assert text == " time, there was"
    shown = [t for d in deltas for t in d.token_ids]
    assert [e.token_id for d in deltas for e in d.logprobs] == shown
    assert tok.decode(shown, skip_special_tokens=True).strip() == text.strip()  # exactly the returned text's tokens
    generated = sum(d.num_tokens for d in deltas)
    assert generated > len(shown)  # " a" and " girl" were generated, and counted
    assert shown == ids[: len(shown)]
    for d in deltas:  # no delta carries a token before the text it starts
        if d.token_ids and not d.finished:
            assert d.text, d


def test_without_a_stop_string_every_token_is_shown_once_but_the_end_token(tok):
    ids, deltas = _choice_deltas(tok, "Once upon a", " time, there was", stop=(" time to go",), eos=True)
    assert "".join(d.text for d in deltas) == " time, there was"
    assert [t for d in deltas for t in d.token_ids] == ids[:-1]  # the EOS has no text: counted, not shown
    assert [e.token_id for d in deltas for e in d.logprobs] == ids[:-1]
    assert sum(d.num_tokens for d in deltas) == len(ids)
