"""Input that used to reach the tokenizer, the JSON parser or int() unchecked and came back as a 500:
each is a 400 OpenAI error object naming the field where one can be named, and the server stays
correct afterwards."""

from __future__ import annotations

import gzip
import zlib

import httpx
import pytest

from tests.server_util import TEST_CHAT_TEMPLATE, RunningServer

MODEL = "stories260k"


@pytest.fixture(scope="module")
def server():
    with RunningServer(chat_template=TEST_CHAT_TEMPLATE) as s:
        yield s


def _post(server, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(server.base_url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=60)


COMPLETION = b'{"model": "stories260k", "max_tokens": 2, '
CASES = {
    "escaped surrogate, completions": ("/v1/completions", COMPLETION + b'"prompt": "a\\ud800b"}', "prompt"),
    "escaped surrogate, chat": (
        "/v1/chat/completions",
        COMPLETION + b'"messages": [{"role": "user", "content": "a\\udfff"}]}',
        "messages[0].content",
    ),
    "escaped surrogate, tokenize": ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    "surrogate bytes, completions": ("/v1/completions", COMPLETION + b'"prompt": "a\xed\xa0\x80b"}', "prompt"),
    "invalid UTF-8, chat": (
        "/v1/chat/completions",
        COMPLETION + b'"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        "messages[0].content",
    ),
    "surrogate in a key": ("/v1/completions", COMPLETION + b'"prompt": "a", "\\ud800": 1}', None),
    "tokenize with no messages (found by test_api_fuzz)": ("/tokenize", b'{"messages": []}', "messages"),
    "array nested 100,000 deep": ("/v1/completions", COMPLETION + b'"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    "5,000-digit integer": ("/v1/completions", COMPLETION.replace(b"2", b"9" * 5000) + b'"prompt": "a"}', "max_tokens"),
    "5,000-digit token id": ("/v1/completions", COMPLETION + b'"prompt": [1, ' + b"9" * 5000 + b"]}", "prompt"),
    "logit_bias key that isdigit() but is not ASCII": (
        "/v1/completions",
        COMPLETION + '"prompt": "a", "logit_bias": {"\u00b2": 1}}'.encode(),
        "logit_bias",
    ),
    "tool_calls that is not a list (found by fuzzing: a 500)": (
        "/v1/chat/completions",
        COMPLETION + b'"messages": [{"role": "user", "content": "hi", "tool_calls": 1}]}',
        "messages",
    ),
    "tool_calls of numbers, tokenize": (
        "/tokenize",
        b'{"messages": [{"role": "assistant", "content": "", "tool_calls": [1.5]}]}',
        "messages",
    ),
    "1025 stop token ids": ("/v1/completions", COMPLETION + b'"prompt": "a", "stop_token_ids": [' + b",".join([b"3"] * 1025) + b"]}", "stop_token_ids"),
    "65 stop strings": ("/v1/completions", COMPLETION + b'"prompt": "a", "stop": [' + b",".join(b'"s%d"' % i for i in range(65)) + b"]}", "stop"),
    "a token-id prompt of 2M ids, refused by length before every id is validated": (
        "/v1/completions", COMPLETION + b'"prompt": [' + b",".join([b"7"] * 2_000_000) + b"]}", "prompt"),
    "a batch holding one prompt longer than the context": (
        "/v1/completions", COMPLETION + b'"prompt": [[1, 2], [' + b",".join([b"7"] * 600) + b"]]}", "prompt"),
    "3M prompts, refused by count before each is validated": (
        "/v1/completions", COMPLETION + b'"prompt": [' + b",".join([b"[1,2]"] * 3_000_000) + b"]}", "prompt"),
    "more messages than the context has tokens": (
        "/v1/chat/completions", COMPLETION + b'"messages": [' + b",".join([b'{"role":"user","content":""}'] * 5000) + b"]}", "messages"),
    "more responses input items than the context has tokens": (
        "/v1/responses", b'{"model": "stories260k", "input": [' + b",".join([b'{"role":"user","content":"a"}'] * 5000) + b"]}", "input"),
    "one message of more content parts than the context has tokens": (
        "/v1/chat/completions",
        COMPLETION + b'"messages": [{"role":"user","content":[' + b",".join([b'{"type":"text","text":"a"}'] * 100_000) + b"]}]}",
        "messages"),
    "a logit_bias over more tokens than the vocabulary": (
        "/v1/completions", COMPLETION + b'"prompt": "a", "logit_bias": {' + b",".join(b'"%d": 1' % i for i in range(100_000)) + b"}}", "logit_bias"),
    "metadata of 17 pairs (OpenAI's limit is 16)": (
        "/v1/chat/completions",
        COMPLETION + b'"messages": [{"role":"user","content":"a"}], "metadata": {' + b",".join(b'"k%d": "v"' % i for i in range(17)) + b"}}",
        "metadata"),
    "detokenize of more ids than the context": ("/detokenize", b'{"tokens": [' + b",".join([b"7"] * 1_000_000) + b"]}", "tokens"),
    "logit_bias key of 5,000 digits": (
        "/v1/completions",
        COMPLETION + b'"prompt": "a", "logit_bias": {"' + b"9" * 5000 + b'": 1}}',
        "logit_bias",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_400_naming_the_field(server, case):
    path, raw, field = CASES[case]
    r = _post(server, path, raw)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if field is not None:
        assert error["param"] == field, error
    # ... and the server still answers correctly.
    ok = _post(server, "/v1/completions", COMPLETION + b'"prompt": "Once upon a time", "temperature": 0}')
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "Once upon a time " * 250_000}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Once upon a time " * 250_000}]}, "messages"),
        ("/v1/responses", {"input": "Once upon a time " * 250_000}, "input"),
    ],
)
def test_a_text_far_beyond_the_context_is_refused_from_its_first_part(server, path, body, param):
    """4 MB of text: counted a part at a time, it is refused once a part holds more tokens than the context
    ("more than"), instead of all of it being tokenized first (seconds of a worker thread that other
    requests queue for). A text that fits is tokenized whole, exactly as before (every other test)."""
    limit = {"max_output_tokens": 16} if path == "/v1/responses" else {"max_tokens": 2}
    r = httpx.post(server.base_url + path, json={"model": MODEL, **limit, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    assert "maximum context length" in error["message"] and "more than" in error["message"], error


@pytest.mark.parametrize("setting", [{"temperature": 1e-300}, {"top_p": 1e-300}, {"repetition_penalty": 1e-300}])
def test_vanishing_sampling_settings_are_greedy_even_under_a_constraint(server, setting):
    """Found by fuzzing: values the schema accepts that are zero in float32 made NaN logits, token 0 every
    time, and a 500 ("sampled outside the grammar") with a constraint."""
    import json

    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "structured_outputs": {"choice": ["yes", "no"]}, **setting}
    r = _post(server, "/v1/completions", json.dumps(body).encode())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("yes", "no")


def test_real_non_ascii_text_still_works(server):
    r = _post(server, "/v1/completions", COMPLETION + '"prompt": "caf\u00e9 \\u00e9 \\ud83d\\ude00 \u2603"}'.encode())
    assert r.status_code == 200, r.text
    r = _post(server, "/tokenize", '{"prompt": "\\ud83d\\ude00 na\u00efve"}'.encode())
    assert r.status_code == 200 and r.json()["count"] > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 1e30),
        ("top_k", 2**31),
        ("seed", 2**64 - 1),
        ("seed", -(2**63) - 1),
        ("n", 129),
        ("best_of", 10**6),
        ("logprobs", 21),
        ("presence_penalty", 2.5),
        ("repetition_penalty", 0),
        ("temperature", 1e309),
        ("max_tokens", 0),
        ("top_p", float("nan")),
        ("min_p", float("nan")),
        ("frequency_penalty", float("-inf")),
    ],
)
def test_numeric_fields_are_bounded_at_the_api(server, field, value):
    import json

    body = {"model": MODEL, "prompt": "Once", "max_tokens": 2, field: value}
    r = _post(server, "/v1/completions", json.dumps(body).encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_extreme_but_valid_numbers_work(server):
    import json

    body = {"model": MODEL, "prompt": "Once", "max_tokens": 3, "top_k": 2**31 - 1, "seed": 2**63 - 1, "n": 2}
    r = _post(server, "/v1/completions", json.dumps(body).encode())
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    body["seed"] = -(2**63)
    assert _post(server, "/v1/completions", json.dumps(body).encode()).status_code == 200


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "top_k", False),  # true/false are not the integers 1 and 0 (found by schemathesis)
        ("/v1/completions", "max_tokens", True),
        ("/v1/completions", "temperature", True),
        ("/v1/completions", "stream", "true"),  # nor is a string or a number a boolean
        ("/v1/completions", "echo", 1),
        ("/v1/completions", "max_tokens", 2.5),
        ("/v1/completions", "prompt", [1, True]),
        ("/v1/completions", "stop_token_ids", [False]),
        ("/detokenize", "tokens", [False]),
        ("/v1/chat/completions", "logprobs", "yes"),
        ("/v1/chat/completions", "function_call", "auto"),
    ],
)
def test_values_of_the_wrong_json_type_are_refused(server, path, field, value):
    import json

    body = {"model": MODEL, "max_tokens": 2}
    if path == "/v1/completions":
        body["prompt"] = "Once"
    elif path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body = {"tokens": [1]}
    body[field] = value
    r = _post(server, path, json.dumps(body).encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["param"] in (field, None), r.json()


def test_integral_floats_are_integers(server):
    """JSON has one kind of number: 2.0 is the integer 2, as JSON Schema counts it."""
    import json

    body = {"model": MODEL, "prompt": [1.0, 403.0], "max_tokens": 3.0, "n": 2.0, "seed": 7.0, "top_k": 5.0, "ignore_eos": True}
    r = _post(server, "/v1/completions", json.dumps(body).encode())
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 2 and r.json()["usage"]["prompt_tokens"] == 2
    assert r.json()["usage"]["completion_tokens"] == 6
    r = _post(server, "/detokenize", json.dumps({"tokens": [403.0]}).encode())
    assert r.status_code == 200 and r.json()["prompt"] == _post(server, "/detokenize", b'{"tokens": [403]}').json()["prompt"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "function_call": "none"}
    assert _post(server, "/v1/chat/completions", json.dumps(chat).encode()).status_code == 200


def test_null_means_the_default(server, client):
    """The openai SDK sends null for an argument given as None; OpenAI takes it as the default."""
    import json

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "seed": 3}
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "logprobs", "top_k"))
    plain = _post(server, "/v1/chat/completions", json.dumps(chat).encode()).json()
    nulled = _post(server, "/v1/chat/completions", json.dumps({**chat, **nulls}).encode())
    assert nulled.status_code == 200, nulled.text
    assert nulled.json()["choices"] == plain["choices"]  # seeded sampling at temperature 1, one choice
    sdk = client.chat.completions.create(**chat, temperature=None, n=None, stream=None, logprobs=None)
    assert sdk.choices[0].message.content == plain["choices"][0]["message"]["content"]
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4, "temperature": 0, "echo": None, "n": None}
    assert _post(server, "/v1/completions", json.dumps(body).encode()).json()["choices"][0]["text"]
    # null where there is no default is still refused, by name
    r = _post(server, "/v1/chat/completions", json.dumps({**chat, "messages": None}).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_escaped_surrogate_pairs_are_text_and_lone_halves_are_refused(server):
    """A pair of escapes is one character (json.dumps writes every emoji so); only a lone half is refused."""
    pair = _post(server, "/v1/completions", COMPLETION + b'"prompt": "hi \\uD83D\\ude00"}')
    assert pair.status_code == 200, pair.text
    for lone in (b'"hi \\uD83D"', b'"\\ude00 hi"', b'"\\ud83d\\ud83d"'):
        r = _post(server, "/v1/completions", COMPLETION + b'"prompt": ' + lone + b"}")
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (lone, r.text)


def test_tool_call_arguments_nested_past_the_parsers_depth_are_passed_as_text(server):
    """Found by fuzzing: a RecursionError (500) from parsing a call's arguments for the template."""
    import json

    deep = "[" * 100_000 + "]" * 100_000
    call = {"id": "a", "type": "function", "function": {"name": "f", "arguments": deep}}
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]}
    r = _post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert r.status_code == 200, r.text


def test_logprobs_under_a_grammar_are_finite_json(server):
    """Tokens a grammar rules out have logprob -inf, which JSON cannot hold (Python wrote -Infinity)."""
    import json

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))

    body = {"model": MODEL, "prompt": "Once", "max_tokens": 6, "logprobs": 5, "response_format": {"type": "json_object"}}
    r = _post(server, "/v1/completions", json.dumps(body).encode())
    assert r.status_code == 200, r.text
    tops = strict(r.text)["choices"][0]["logprobs"]["top_logprobs"]
    assert any(value == -9999.0 for top in tops for value in top.values())  # the floor, where the grammar left fewer than 5


@pytest.mark.parametrize(
    ("body", "expected"),
    [('{"prompt": [[1], [2]]}', {"prompt": [[1], [2]]}), ('{"prompt": [1,', None), ('{"n": ' + "9" * 5000 + "}", {"n": float("inf")})],
    ids=["lists", "broken", "long integer"],
)
def test_the_json_parse_leaves_the_garbage_collector_as_it_found_it(body, expected):
    """The parse pauses the cyclic collector (a body of millions of small lists set off passes over all
    of it); whatever the body, parsed, refused or parsed again for its long integers, it runs after."""
    import gc
    import json

    from serving.api.routes import _loads

    for was_enabled in (True, False):
        (gc.enable if was_enabled else gc.disable)()
        try:
            try:
                parsed = _loads(body)
            except json.JSONDecodeError:
                parsed = None
            assert gc.isenabled() is was_enabled
        finally:
            gc.enable()
        assert parsed == expected


def _compressed(data: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # deflate without the zlib wrapper
    return raw.compress(data) + raw.flush()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw deflate"])
def test_a_compressed_body_is_read_as_its_json(server, coding):
    body = b'{"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}'
    plain = _post(server, "/v1/completions", body)
    r = httpx.post(
        server.base_url + "/v1/completions",
        content=_compressed(body, coding),
        headers={"Content-Type": "application/json", "Content-Encoding": coding.split()[-1]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


@pytest.mark.parametrize(
    ("coding", "content", "status", "message"),
    [
        ("br", b'{"model": "stories260k", "prompt": "a"}', 415, "Content-Encoding 'br' is not supported"),
        ("gzip", b'{"model": "stories260k", "prompt": "a"}', 400, "not valid gzip data"),
        ("gzip", gzip.compress(b'{"model": "stories260k", "prompt": "a"}')[:20], 400, "ends before its compressed data"),
        # 39 kB that inflate past the 32 MiB limit of any body
        ("gzip", gzip.compress(b'{"prompt": "' + b"a" * 40_000_000 + b'"}'), 413, "decompressed body is larger"),
    ],
)
def test_a_body_that_cannot_be_decompressed_is_a_clear_4xx(server, coding, content, status, message):
    for path in ("/v1/completions", "/tokenize"):
        r = httpx.post(
            server.base_url + path,
            content=content,
            headers={"Content-Type": "application/json", "Content-Encoding": coding},
            timeout=60,
        )
        assert r.status_code == status, r.text
        assert message in r.json()["error"]["message"]
