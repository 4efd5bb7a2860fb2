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
