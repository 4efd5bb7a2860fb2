"""Property-based fuzzing of every POST route's JSON body (hypothesis, seeded, bounded): whatever
arrives, the answer is a 2xx or a 4xx OpenAI error object, never a 5xx or a hang, and the server
still answers a plain request exactly afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.server_util import TEST_CHAT_TEMPLATE, RunningServer

MODEL = "stories260k"
PLAIN = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}

# Values of every JSON kind, extremes included: huge and negative numbers, NaN-free floats (JSON
# has none; the server's parser accepts Infinity and NaN, covered in test_api_bad_input), odd text.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["", "stories260k", "Once upon a time", "\u00b2", "\ud83d\ude00", "user", "assistant", "system"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": values}),
    max_size=3,
)

OPTIONS = st.dictionaries(
    st.sampled_from(["temperature", "top_p", "top_k", "min_p", "seed", "num_predict", "stop", "repeat_penalty", "repeat_last_n", "num_ctx"]),
    values,
    max_size=4,
)
COMMON = [
    "model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias", "seed", "user", "top_k", "min_p", "repetition_penalty", "stop_token_ids",
    "ignore_eos", "min_tokens", "logprobs", "repeat_last_n",
]  # fmt: skip
ROUTES = {
    "/v1/completions": (["prompt", "echo", "best_of", "suffix", *COMMON], {"prompt": values}),
    "/v1/chat/completions": (["messages", "top_logprobs", "max_completion_tokens", "tools", *COMMON], {"messages": messages}),
    "/tokenize": (["prompt", "messages", "add_special_tokens"], {"prompt": values, "messages": messages}),
    "/detokenize": (["tokens"], {"tokens": st.lists(st.integers(min_value=-5, max_value=70000), max_size=8)}),
    # Ollama's: sampling settings inside options, streamed unless stream is false.
    "/api/chat": (["messages", "format", "think", "tools", "stream", "keep_alive"], {"messages": messages, "options": OPTIONS}),
    "/api/generate": (["prompt", "system", "raw", "format", "think", "suffix", "context", "images", "stream"], {"prompt": values, "options": OPTIONS}),
    "/api/embed": (["input", "truncate", "dimensions"], {"input": values}),
}


def bodies(route: str):
    fields, special = ROUTES[route]
    # Mostly sensible bodies (the model and a small max_tokens, so generation runs) with fuzzed fields.
    if route.startswith("/v1"):
        base = st.fixed_dictionaries({"model": st.just(MODEL), "max_tokens": st.integers(1, 4)})
    elif route.startswith("/api/"):  # Ollama's: the length inside options, which the fuzzed ones may replace
        base = st.just({"model": MODEL, "options": {"num_predict": 4}})
    else:
        base = st.just({})
    extra = st.dictionaries(st.sampled_from(fields), values, max_size=5)
    chosen = st.fixed_dictionaries({}, optional={k: v for k, v in special.items()})
    return st.tuples(base, chosen, extra).map(lambda parts: {**parts[0], **parts[1], **parts[2]})


@pytest.fixture(scope="module")
def server():
    with RunningServer(chat_template=TEST_CHAT_TEMPLATE, max_seq_len=256) as s:
        yield s


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fuzzed_bodies_never_get_a_5xx(server, route):
    client = httpx.Client(base_url=server.base_url, timeout=60)
    expected = client.post("/v1/completions", json=PLAIN).json()["choices"][0]["text"]

    @seed(1234)
    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(bodies(route))
    def check(body):
        raw = json.dumps(body, allow_nan=False).encode()
        r = client.post(route, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400 and route.startswith("/api/"):  # Ollama's error: {"error": "..."}
            assert isinstance(r.json()["error"], str) and r.json()["error"], r.text
        elif r.status_code >= 400:
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"] and "type" in error, r.text
        elif route.startswith("/api/") and r.headers["content-type"].startswith("application/x-ndjson"):
            lines = [json.loads(line) for line in r.text.splitlines()]
            assert lines[-1].get("done") is True or isinstance(lines[-1].get("error"), str), r.text[-300:]

    check()
    assert client.post("/v1/completions", json=PLAIN).json()["choices"][0]["text"] == expected
