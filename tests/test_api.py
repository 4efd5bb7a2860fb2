"""The OpenAI API through the official openai SDK (sync and async, streaming and not) against the
real server serving the embedded demo model."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest

MODEL = "stories260k"
PROMPT = "Once upon a time"
# The demo model's greedy continuation (SOURCE.md of stories260k).
GREEDY = ", there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_more_served_names_are_aliases_of_the_model():
    """vLLM's --served-model-name a b: clients may send either (a tool that asks for a fixed name, say)."""
    from tests.server_util import RunningServer

    with RunningServer(served_model_name=["demo", "gpt-4o-mini"]) as s:
        client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["demo", "gpt-4o-mini"]
        for name in ("demo", "gpt-4o-mini"):
            out = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
            assert out.model == name and GREEDY.startswith(out.choices[0].text)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert s.metrics()['vllm:num_requests_running{model_name="demo"}'] == 0  # series under the first name


def test_repeat_last_n_bounds_the_repetition_penalty(client):
    """llama.cpp's repeat_last_n: 0 turns the penalty off (the plain greedy text), a window changes less than
    the whole text does."""
    ask = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    plain = client.completions.create(**ask).choices[0].text
    off = client.completions.create(**ask, extra_body={"repetition_penalty": 3.0, "repeat_last_n": 0}).choices[0].text
    whole = client.completions.create(**ask, extra_body={"repetition_penalty": 3.0}).choices[0].text
    assert off == plain != whole
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**ask, extra_body={"repeat_last_n": -2})


def test_completion_greedy_matches_the_reference_text(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert GREEDY.startswith(out.choices[0].text)
    assert len(out.choices[0].text) > 40
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 20
    assert out.usage.prompt_tokens == 5 and out.usage.total_tokens == 25


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


async def test_async_chat_streaming_and_not(aclient):
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = await aclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=25, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    stream = await aclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=25, temperature=0, stream=True)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 25


async def test_async_completion(aclient):
    out = await aclient.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert GREEDY.startswith(out.choices[0].text)


def test_sync_chat_with_system_and_text_parts(client):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You tell stories."},
            {"role": "user", "content": [{"type": "text", "text": "Once"}, {"type": "text", "text": " upon"}]},
        ],
        max_completion_tokens=8,
    )
    assert out.usage.completion_tokens <= 8 and out.choices[0].message.content is not None


def test_stop_string_cuts_the_text(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[" girl", "zebra"])
    assert out.choices[0].text == ", there was a little"
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=" girl", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ", there was a little"


def test_a_stop_string_ends_the_sequence_in_the_engine_and_counts_tokens_up_to_it(client, server):
    """Stop strings are matched in the API process; the engine must then stop computing the sequence
    (not run on to max_tokens), and usage counts exactly the tokens up to the one that completed it."""
    batch_key = f'llm_batch_size_sum{{model="{MODEL}"}}'
    before = server.metrics()
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=400, temperature=0, stop=" girl", extra_body={"ignore_eos": True}
    )
    assert (out.choices[0].text, out.choices[0].finish_reason) == (", there was a little", "stop")
    tokens = httpx.post(server.base_url + "/tokenize", json={"prompt": PROMPT + ", there was a little girl"}).json()
    assert out.usage.completion_tokens == tokens["count"] - out.usage.prompt_tokens
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and server.metric("llm_kv_cache_usage_ratio") > 0:
        time.sleep(0.02)
    assert server.metric("llm_kv_cache_usage_ratio") == 0
    assert server.metrics()[batch_key] - before[batch_key] < 100, "the engine ran on after the stop string"


def test_a_repeated_prompt_is_served_from_the_prefix_cache(client, server):
    prompt = "Once upon a time there was a big dog. " * 8  # about ninety tokens: several full blocks
    queries, hits = "llm_prefix_cache_queries_total", "llm_prefix_cache_hits_total"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    hits_before = server.metric(hits)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert second.choices[0].text == first.choices[0].text
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 64 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert server.metric(hits) - hits_before == cached
    assert server.metric(queries) >= server.metric(hits) > 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4)
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4)
    assert chat.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens_details.cached_tokens


def test_seeded_sampling_is_reproducible_over_http(client):
    def run(seed):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=seed).choices[0].text

    assert run(7) == run(7)
    assert run(7) != run(8)
    # Seeds are 64-bit: those that agree in their low 32 bits (all torch's CPU generator keeps) differ too.
    assert run(0) != run(2**32) and run(-1) != run(2**63 - 1)


def test_n_choices_and_several_prompts(client, server):
    out_url = server.base_url
    out = client.completions.create(model=MODEL, prompt=["Once upon", "The dog"], n=2, max_tokens=6, temperature=0.9, seed=1)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert 4 <= out.usage.completion_tokens <= 4 * 6
    assert out.usage.prompt_tokens == sum(
        len(httpx.post(out_url + "/tokenize", json={"prompt": p}).json()["tokens"]) for p in ("Once upon", "The dog")
    )
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3, max_tokens=5, seed=3)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_token_id_prompt_equals_text_prompt(client, server):
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_logprob_tokens_of_characters_split_over_byte_tokens_spell_the_text(client, stream):
    """The demo's tokenizer spells "☃" and "日" as three byte-fallback tokens each: alone each reads U+FFFD.
    The character is the text of the token that completes it, the others "", so the tokens still join
    into the text and each sits at its offset, in a stream too (whose deltas may split a character)."""
    prompt = "élan ☃ ok 日本"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True, logprobs=1, stream=stream)
    if stream:
        chunks = [c.choices[0] for c in out]
        text = "".join(c.text for c in chunks)
        tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
        offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    else:
        text, tokens, offsets = out.choices[0].text, out.choices[0].logprobs.tokens, out.choices[0].logprobs.text_offset
    assert text.startswith(prompt) and "\ufffd" not in "".join(tokens)
    assert "".join(tokens) == text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    assert tokens.count("") >= 4 and "☃" in tokens and "日" in tokens


@pytest.mark.parametrize("stream", [False, True])
def test_echoed_logprob_tokens_are_the_prompts_own_characters(client, stream):
    """An echoed text prompt's tokens are cut from the text by the tokenizer's offsets: a "<s>" the text
    spells is its first token (the BOS the tokenizer added is not shown, and the text's "<s>" was once
    taken for it and shown twice), and the word after it has no space the text does not have."""
    out = client.completions.create(model=MODEL, prompt="<s>Hi", max_tokens=2, temperature=0, echo=True, logprobs=0, stream=stream)
    chunks = list(out) if stream else [out]
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert text.startswith("<s>Hi") and "".join(tokens) == text
    assert tokens[:3] == ["<s>", "H", "i"] and len(tokens) == 3 + 2
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


@pytest.mark.parametrize("stream", [False, True])
def test_a_choice_that_ends_mid_character_shows_its_replacement_in_its_last_token(client, server, stream):
    """A choice cut off after the first byte of "日" ends its text with U+FFFD: its last logprob token
    reads it too, so the tokens still join into the text."""
    first_byte = httpx.post(server.base_url + "/tokenize", json={"prompt": "日"}).json()["tokens"][-3]
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1, logit_bias={str(first_byte): 100}, stream=stream
    )
    chunks = list(out) if stream else [out]
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert text == "\ufffd" and tokens == ["\ufffd"]


def test_a_special_token_sampled_mid_text_is_an_empty_logprob_token_as_in_the_text(client):
    # The generated text is decoded skipping special tokens: a BOS forced into it reads "" there, so its
    # logprob token is "" too (it read "<s>", and every offset after it was 3 too far).
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1, logit_bias={"1": 100})
    lp = out.choices[0].logprobs
    assert out.choices[0].text == "" and lp.tokens == [""] * 4 and lp.text_offset == [0] * 4


def test_logprobs_and_echo(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 and max(top.values()) >= chosen - 1e-5 for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]

    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=1)
    assert echoed.choices[0].text == PROMPT + out.choices[0].text
    elp = echoed.choices[0].logprobs
    # The prompt's 4 tokens, not the BOS the tokenizer put before them, so the first is scored too;
    # every token sits at its offset in the text, and they spell it.
    assert len(elp.tokens) == 4 + 5 and None not in elp.token_logprobs and all(v <= 0 for v in elp.token_logprobs)
    assert elp.token_logprobs[4:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert "".join(elp.tokens) == echoed.choices[0].text
    assert elp.text_offset == [sum(len(t) for t in elp.tokens[:i]) for i in range(9)]
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == elp.text_offset
    # Token ids are the client's own: all of them are echoed, a BOS it sent too (unscored: nothing before it).
    ids = httpx.post(str(client.base_url).removesuffix("/v1/") + "/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    assert len(by_ids.choices[0].logprobs.tokens) == len(ids) + 1 and by_ids.choices[0].logprobs.token_logprobs[0] is None

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)


def test_chat_logprob_bytes_join_into_the_text_where_characters_span_tokens(client):
    """The demo's tokenizer spells 日本 and the snowman in byte tokens: each token's "bytes" are its
    own (not U+FFFD's), so they join into the content, as OpenAI documents them for."""
    text = "日本 ☃"
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=30, logprobs=True, top_logprobs=2,
        extra_body={"guided_choice": [text]},
    )  # fmt: skip
    assert chat.choices[0].message.content == text
    content = chat.choices[0].logprobs.content
    assert len(content) > len(text)  # characters did span tokens
    assert bytes(b for c in content for b in c.bytes).decode() == text
    assert all(top.bytes is not None for c in content for top in c.top_logprobs)


def test_logprobs_stop_with_the_text_a_stop_string_cuts(client):
    """Tokens whose text lies in the stop string are generated but not returned, nor their logprobs."""
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1)
    stop = " was a little"  # a stop string over several tokens, after a few tokens
    assert stop in full.choices[0].text
    for stream in (False, True):
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1, stop=stop, stream=stream)
        chunks = list(out) if stream else [out]
        text = "".join(c.choices[0].text for c in chunks)
        tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        assert text == full.choices[0].text.split(stop)[0] == ", there"
        assert "".join(tokens) == text, (stream, tokens)
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0, logprobs=True,
            stop=stop, stream=stream,
        )  # fmt: skip
        chunks = list(chat) if stream else [chat]
        if stream:
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            tokens = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        else:
            content = chat.choices[0].message.content
            tokens = [t.token for t in chat.choices[0].logprobs.content]
        assert "".join(tokens) == content, (stream, tokens, content)


def test_tokenize_detokenize_round_trip(server):
    ids = httpx.post(server.base_url + "/tokenize", json={"prompt": "Lily saw a dog."}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 512
    text = httpx.post(server.base_url + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert text == "Lily saw a dog."
    chat = httpx.post(server.base_url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3
    # Counting is not generating: a text or chat beyond the context is counted whole, up to 4 contexts;
    # past that it is refused from its first part (not tokenized whole, and its ids listed, first).
    for words, fits in ((200, True), (2000, False)):
        text = "Lily saw a dog. " * words
        for body, param in (({"prompt": text}, "prompt"), ({"messages": [{"role": "user", "content": text}]}, "messages")):
            r = httpx.post(server.base_url + "/tokenize", json=body, timeout=60)
            if fits:
                assert r.status_code == 200 and 512 < r.json()["count"] <= 4 * 512, r.text
            else:
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
                assert "more than 2048 tokens" in r.json()["error"]["message"]


# -- errors ----------------------------------------------------------------------------------


def _post(server, path, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=content, headers={"Content-Type": "application/json"}, **kw)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "parse the JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"model": MODEL}, 400, "prompt"),
        ({"prompt": "hi"}, 400, "model"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": 9}, 400, "temperature"),
        ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"model": MODEL, "prompt": "hi", "n": 3, "best_of": 2}, 400, "best_of (2) must be at least n (3)"),
        # A full batch (16) plus a full queue (100) at most, from one request: more could never be let in.
        ({"model": MODEL, "prompt": ["a"] * 8, "best_of": 15}, 400, "best_of=15 over 8 prompts asks for 120 sequences"),
        ({"model": MODEL, "prompt": ["a"] * 117}, 400, "117 prompts"),
        ({"model": MODEL, "prompt": "hi", "n": 64}, 400, "max-batch-size"),
        ({"model": MODEL, "prompt": "hi", "suffix": "end"}, 400, "suffix"),
        ({"model": MODEL, "prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
        ({"model": MODEL, "prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
        ({"model": MODEL, "prompt": [99999]}, 400, "vocabulary"),
        ({"model": MODEL, "prompt": ""}, 400, "empty"),
        ({"model": "gpt-5", "prompt": "hi"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": "hi " * 600}, 400, "maximum context length"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 600}, 400, "maximum context length"),
    ],
)
def test_completion_errors_are_openai_error_objects(server, body, status, needle):
    r = _post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert needle in err["message"]


def test_best_of_returns_the_n_likeliest_of_its_choices(server):
    """best_of=4, n=2: the two of the four choices n=4 draws (one seed: the same four) with the highest
    mean logprob per token, numbered 0 and 1, without logprobs unless asked; usage counts all four."""
    body = {"model": MODEL, "prompt": ["Once upon a time", "The dog"], "max_tokens": 12, "temperature": 1.2, "seed": 7}
    every = _post(server, "/v1/completions", {**body, "n": 4, "logprobs": 0}).json()
    best = _post(server, "/v1/completions", {**body, "n": 2, "best_of": 4}).json()

    def mean(choice):
        lps = choice["logprobs"]["token_logprobs"]
        return sum(lps) / len(lps)

    for p in range(2):
        drawn = every["choices"][4 * p : 4 * p + 4]
        likeliest = sorted(sorted(drawn, key=mean, reverse=True)[:2], key=lambda c: c["index"])
        kept = best["choices"][2 * p : 2 * p + 2]
        assert [c["text"] for c in kept] == [c["text"] for c in likeliest]
        assert len({mean(c) for c in drawn}) == 4  # distinct: the choice was a real one
    assert [c["index"] for c in best["choices"]] == [0, 1, 2, 3]
    assert all(c["logprobs"] is None for c in best["choices"])
    assert best["usage"]["completion_tokens"] == every["usage"]["completion_tokens"]

    # Streamed, each chosen choice comes whole once all have ended.
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=60,
                      json={**body, "n": 2, "best_of": 4, "stream": True, "stream_options": {"include_usage": True}}) as r:  # fmt: skip
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"] for c in chunks[:-1]] == [[choice] for choice in best["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == best["usage"]


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/completions", {"n": 3, "best_of": 2}, "best_of"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"min_tokens": 2, "guided_regex": "a+"}, "min_tokens"),
        ("/v1/completions", {"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        ("/v1/completions", {"logit_bias": {"600": 1}}, "logit_bias"),
        ("/v1/completions", {"stop_token_ids": [600]}, "stop_token_ids"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "min_tokens": 3}, "min_tokens"),
        ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
        ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
    ],
)
def test_a_broken_cross_field_rule_names_its_param(server, path, extra, param):
    body = {"model": MODEL, **({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})}
    r = _post(server, path, {**body, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "image_url"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}, "json_schema"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "logprobs"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x " * 600}]}, "maximum context length"),
    ],
)
def test_chat_errors(server, body, needle):
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="nope", prompt="hi")
    assert not_found.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10_000)
    assert "maximum context length" in str(overflow.value)
    assert overflow.value.code == "context_length_exceeded"


def test_unknown_route_and_method_get_json_errors(server):
    r = httpx.get(server.base_url + "/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found" and "/v1/nothing" in r.json()["error"]["message"]
    r = httpx.get(server.base_url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in {m.strip() for m in r.headers["allow"].split(",")}  # RFC 9110: a 405 says what is allowed


def test_process_metrics_of_both_processes(server):
    text = httpx.get(server.base_url + "/metrics").text
    assert server.metric("process_resident_memory_bytes") > 0  # the API process
    assert server.metric("llm_engine_process_resident_memory_bytes") > 0  # the engine, which holds the model
    assert "python_info" in text


def test_bad_requests_count_as_failed(server):
    before = server.metric("llm_requests_failed_total")
    _post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1})
    assert server.metric("llm_requests_failed_total") == before + 1


def test_every_generation_ending_is_counted_once(server):
    """Success, refusals before and after parsing, and clients that leave mid-stream or while a
    whole answer is built: each request is counted once, as success or failure, and none stays active."""
    names = ("llm_requests_total", "llm_requests_success_total", "llm_requests_failed_total")
    before = {name: server.metric(name) for name in names}
    base = server.base_url
    long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 450, "temperature": 0, "ignore_eos": True}
    assert httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3}).status_code == 200
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    assert "[DONE]" in httpx.post(base + "/v1/chat/completions", json=chat).text
    assert httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1}).status_code == 400
    assert httpx.post(base + "/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert httpx.post(base + "/v1/chat/completions", content=b"{not json").status_code == 400
    with httpx.stream("POST", base + "/v1/completions", json={**long, "stream": True}) as r:
        next(r.iter_lines())  # then leave mid-stream
    with pytest.raises(httpx.ReadTimeout):  # leave while the whole answer is being built
        httpx.post(base + "/v1/completions", json={**long, "n": 8}, timeout=httpx.Timeout(30, read=0.05))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.metric("llm_active_requests") > 0:
        time.sleep(0.02)
    assert server.metric("llm_active_requests") == 0
    delta = {name: server.metric(name) - before[name] for name in names}
    assert delta == {"llm_requests_total": 7, "llm_requests_success_total": 2, "llm_requests_failed_total": 5}


# -- HTTP hygiene ----------------------------------------------------------------------------


def test_cors_and_gzip(server):
    pre = httpx.options(server.base_url + "/v1/completions", headers={"Origin": "http://x", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "*"
    # The openai JS SDK's preflight asks for its X-Stainless-* headers: a browser sends nothing unless all are allowed.
    asked = "authorization,content-type,x-stainless-os,x-stainless-lang,x-stainless-retry-count,openai-organization"
    pre = httpx.options(
        server.base_url + "/v1/chat/completions",
        headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked},
    )
    assert pre.status_code == 204 and set(pre.headers["access-control-allow-headers"].split(",")) == set(asked.split(","))
    assert "access-control-request-headers" in pre.headers["vary"].lower()
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "logprobs": 5}
    raw = httpx.post(server.base_url + "/v1/completions", json=body, headers={"Accept-Encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip"
    assert json.loads(raw.content)["choices"]  # httpx decoded it
    stream = httpx.post(server.base_url + "/v1/completions", json={**body, "stream": True}, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in stream.headers, "SSE must not be compressed"


# -- engine behaviour through the API --------------------------------------------------------


async def test_sixteen_concurrent_streams_complete_exactly(server, aclient):
    prompts = [PROMPT, "The dog", "Lily and Ben went to", "One day", "A big red ball"] * 4
    prompts = prompts[:16]
    lengths = [8 + 7 * i for i in range(16)]  # 8 ... 113 tokens

    async def run(prompt, n_tokens, stream):
        if not stream:
            out = await aclient.completions.create(
                model=MODEL, prompt=prompt, max_tokens=n_tokens, temperature=0, extra_body={"ignore_eos": True}
            )
            return out.choices[0].text, out.choices[0].finish_reason
        chunks = await aclient.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        parts, reason = [], None
        async for c in chunks:
            parts.append(c.choices[0].text)
            reason = c.choices[0].finish_reason or reason
        return "".join(parts), reason

    # References one at a time, then all 16 at once, streaming.
    aclient_sequential = [await run(p, n, stream=False) for p, n in zip(prompts, lengths, strict=True)]
    before = server.metrics()
    results = await asyncio.gather(*(run(p, n, stream=True) for p, n in zip(prompts, lengths, strict=True)))
    after = server.metrics()
    assert results == aclient_sequential
    assert all(reason == "length" for _, reason in results)
    key = f'llm_batch_size_bucket{{le="1.0",model="{MODEL}"}}'
    count = f'llm_batch_size_count{{model="{MODEL}"}}'
    single_steps = after[key] - before[key]
    all_steps = after[count] - before[count]
    assert all_steps > single_steps, "the engine never batched more than one sequence"


def test_disconnect_frees_the_sequence_at_once(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 450, "temperature": 0, "ignore_eos": True, "stream": True}
    batch_key = f'llm_batch_size_sum{{model="{MODEL}"}}'
    before = server.metrics()
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in seen)
        assert server.metric("llm_active_requests") == 1
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and (server.metric("llm_kv_cache_usage_ratio") > 0 or server.metric("llm_active_requests") > 0):
        time.sleep(0.02)
    after = server.metrics()
    assert server.metric("llm_kv_cache_usage_ratio") == 0
    assert server.metric("llm_active_requests") == 0
    # Aborted, not finished: it counts as failed, and the engine stopped computing it long
    # before its 450 tokens (sequences per step, summed, is the tokens the engine computed).
    assert after[f'llm_requests_failed_total{{model="{MODEL}"}}'] == before[f'llm_requests_failed_total{{model="{MODEL}"}}'] + 1
    assert after[f'llm_requests_success_total{{model="{MODEL}"}}'] == before[f'llm_requests_success_total{{model="{MODEL}"}}']
    assert after[batch_key] - before[batch_key] < 300


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_as_its_request_arrives_is_not_served(server, stream):
    """A client that closes its connection right after sending: quart's cancel was swallowed while it
    read the body (Python 3.11's wait_for), and the request ran all its tokens for nobody, its stream
    written to a dead socket. It is aborted like any departed client's."""
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 450, "temperature": 0, "ignore_eos": True, "stream": stream})
    batch_key = f'llm_batch_size_sum{{model="{MODEL}"}}'
    failed = f'llm_requests_failed_total{{model="{MODEL}"}}'
    before = server.metrics()
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.metrics()[failed] == before[failed]:
        time.sleep(0.02)
    after = server.metrics()
    assert after[failed] == before[failed] + 1  # aborted: a 499, not a 200 for nobody
    assert after[batch_key] - before[batch_key] < 300
    assert server.metric("llm_active_requests") == 0


def test_metrics_exposes_every_documented_series(server, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    text = httpx.get(server.base_url + "/metrics").text
    for name in (
        "llm_requests_total",
        "llm_requests_success_total",
        "llm_requests_failed_total",
        "llm_request_duration_seconds_bucket",
        "llm_tokens_generated_total",
        "llm_queue_size",
        "llm_active_requests",
        "llm_prompt_tokens_total",
        "llm_time_to_first_token_seconds_bucket",
        "llm_time_per_output_token_seconds_bucket",
        "llm_kv_cache_usage_ratio",
        "llm_batch_size_bucket",
        "llm_engine_step_seconds_bucket",
        "llm_preemptions_total",
        "llm_prefix_cache_queries_total",
        "llm_prefix_cache_hits_total",
    ):
        assert f'{name}{{' in text, name
    assert f'model="{MODEL}"' in text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        assert f'{name}{{model_name="{MODEL}"}}' in text, name
    # The loaded engine's KV cache: 16-token blocks, at least a full-length sequence's worth of them.
    (info,) = [line for line in text.splitlines() if line.startswith("vllm:cache_config_info{")]
    blocks = int(info.split('num_gpu_blocks="')[1].split('"')[0])
    assert 'block_size="16"' in info and blocks * 16 >= client.models.retrieve(MODEL).max_model_len


def test_chat_echo_puts_the_continued_message_before_the_reply(client):
    """vLLM's echo: a reply that continues a final assistant message starts with that message."""
    messages = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}
    cont = {"continue_final_message": True, "add_generation_prompt": False}
    plain = client.chat.completions.create(**body, extra_body=cont).choices[0].message.content
    echoed = client.chat.completions.create(**body, extra_body={**cont, "echo": True}).choices[0].message.content
    assert plain and echoed == "Once upon" + plain
    chunks = client.chat.completions.create(**body, stream=True, extra_body={**cont, "echo": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == echoed
    # Nothing to echo after a user message.
    assert client.chat.completions.create(**{**body, "messages": messages[:1]}, extra_body={"echo": True}).choices[0].message.content


def test_more_prompts_than_a_batch_holds_queue_and_each_gets_its_own_answer(server, client):
    """A list of 40 prompts on a server that decodes 16 sequences at a time: they queue, as 40 requests
    would, and each choice is what that prompt alone gets (it was a 400 beyond --max-batch-size)."""
    prompts = [f"Once upon a time {word}" for word in ("a", "the", "there", "Lily", "Tom", "one", "he", "she")] * 5
    prompts = [f"{p}{' again' * (i // 8)}" for i, p in enumerate(prompts)]
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0}
    out = client.completions.create(prompt=prompts, **body)
    assert [c.index for c in out.choices] == list(range(40)) and out.usage.completion_tokens == 40 * 6
    for i in (0, 17, 39):
        assert out.choices[i].text == client.completions.create(prompt=prompts[i], **body).choices[0].text
