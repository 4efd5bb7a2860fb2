"""/openapi.json describes the API truthfully: schemathesis generates requests from it (valid and
invalid bodies, seeded, a bounded number per route) and checks every answer against it: never a
5xx, only documented status codes and content types, every body valid under its documented
schema, every error an OpenAI error object."""

from __future__ import annotations

import contextlib
import importlib
import json
import pkgutil
import re

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from serving.api.messages_api import AnthropicErrorResponse
from serving.api.ollama_api import OllamaError
from serving.api.responses import ErrorResponse
from tests.server_util import TEST_CHAT_TEMPLATE, RunningServer

EXAMPLES = 25  # per route and generation mode

# schemathesis imports many of its modules lazily (the OpenAPI ones on the first from_url, the coverage
# phase's on its first case), and pytest compiles them (a plugin's modules get assertion rewriting). Imported
# here, at collection, they are compiled on a shallow stack: compiled deep in a test after other tests,
# CPython 3.11.7's AST validator failed with "SystemError: AST constructor recursion depth mismatch" (its
# recursion-depth bookkeeping bug, gh-106905), erroring this module's test on an unchanged tree (once in
# from_url, once in the coverage phase's import).
for _package in ("schemathesis.specs.openapi", "schemathesis.generation", "schemathesis.core", "schemathesis.engine"):
    for _module in pkgutil.walk_packages(importlib.import_module(_package).__path__, _package + "."):
        with contextlib.suppress(ImportError):  # a module for an optional extra
            importlib.import_module(_module.name)
# The same bug through Hypothesis: describing a strategy's lambda (its repr) parses the lambda's whole source
# file, once, which the any-JSON-value strategy's did deep in a test (the coverage phase, a CI run). Its
# repr taken here parses that file now; Hypothesis keeps the parse.
repr(importlib.import_module("schemathesis.generation.jsonschema.strategy")._anything_for(
    importlib.import_module("schemathesis.generation.jsonschema.context").Alphabet()
))


@pytest.fixture(scope="module")
def server():
    # A short context keeps the longest generations (max_tokens unset fills it) quick.
    with RunningServer(chat_template=TEST_CHAT_TEMPLATE, max_batch_size=16, max_seq_len=128) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.base_url + "/openapi.json")


def test_the_document_covers_every_route_and_the_docs_page_serves(server):
    doc = httpx.get(server.base_url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {
        "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
        "/v1/embeddings", "/v1/models", "/v1/models/{name}", "/tokenize", "/detokenize", "/health", "/version",
        "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
        "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/tags", "/api/ps", "/api/show", "/api/version",
    }  # fmt: skip
    completions = doc["paths"]["/v1/completions"]["post"]
    body = completions["requestBody"]["content"]["application/json"]["schema"]
    props = body["properties"] if "properties" in body else doc["components"]["schemas"]["CompletionRequest"]["properties"]
    # Fields with a default take null for it too: their value's schema is the first option.
    assert props["top_k"]["anyOf"][1] == {"type": "null"} and props["top_k"]["default"] == 0
    assert props["top_k"]["anyOf"][0]["maximum"] == 2**31 - 1  # the same bounds as validation
    assert props["n"]["anyOf"][0]["maximum"] == 16  # and this server's: --max-batch-size
    assert completions["requestBody"]["required"] is True
    # Token ids are bounded by the served model's vocabulary (512), logit_bias's keys too.
    token_ids = props["prompt"]["anyOf"][2]["items"]
    assert (token_ids["minimum"], token_ids["maximum"]) == (0, 511)
    # A list of prompts holds at most a full batch and a full queue of them (16 + 100); one prompt's
    # token ids are not prompts.
    prompt_lists = [option for option in props["prompt"]["anyOf"] if option["type"] == "array"]
    assert [option.get("maxItems") for option in prompt_lists] == [116, None, 116]
    keys = re.compile(props["logit_bias"]["propertyNames"]["pattern"])
    assert [k for k in ("0", "7", "0511", "511", "512", "1000", "x") if keys.match(k)] == ["0", "7", "0511", "511"]
    assert {"200", "400", "429"} <= set(completions["responses"])
    event = completions["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert event["properties"]["data"]["anyOf"][0]["contentSchema"]["oneOf"][0]["$ref"].endswith("/CompletionChunk")
    page = httpx.get(server.base_url + "/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_documented_contract(case):
    response = case.call(timeout=60)
    case.validate_response(
        response, checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    )
    anthropic = case.path.startswith("/v1/messages")  # Anthropic's API: its error objects and events
    ollama = case.path.startswith("/api/")  # Ollama's: its {"error": "..."} and NDJSON lines
    if response.status_code >= 400:
        (AnthropicErrorResponse if anthropic else OllamaError if ollama else ErrorResponse).model_validate(response.json())
    elif ollama and any(v.startswith("application/x-ndjson") for k, vs in response.headers.items() if k.lower() == "content-type" for v in vs):
        lines = [json.loads(line) for line in response.text.splitlines() if line]
        assert response.stream_cut_short or (lines and (lines[-1].get("done") is True or "error" in lines[-1])), lines[-3:]
    elif any(v.startswith("text/event-stream") for k, vs in response.headers.items() if k.lower() == "content-type" for v in vs):
        # Each event's JSON was checked against its chunk schema above; the stream must also end
        # properly, unless schemathesis stopped reading a long one (stream_cut_short).
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        if case.path == "/v1/responses":  # typed events, the last one the whole response (or an error)
            last = json.loads(events[-1]).get("type") if events else None
            assert response.stream_cut_short or last in ("response.completed", "response.incomplete", "error"), events[-3:]
        elif anthropic:
            last = json.loads(events[-1]).get("type") if events else None
            assert response.stream_cut_short or last in ("message_stop", "error"), events[-3:]
        else:
            assert response.stream_cut_short or (events and events[-1] == "[DONE]"), events[-3:]


_CHAT = {"model": "stories260k", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
_COMPLETION = {"model": "stories260k", "prompt": "Once", "max_tokens": 2}
_RESPONSE = {"model": "stories260k", "input": "Hi", "max_output_tokens": 2}
_TOOLS = [{"type": "function", "function": {"name": "f"}}]
_RESPONSE_TOOLS = [{"type": "function", "name": "f"}]
_NAMED = {"type": "function", "function": {"name": "f"}}
# (route, body): the document's verdict on each must be the server's, accepted or refused.
_VERDICTS = [
    ("/v1/completions", _COMPLETION),
    ("/v1/completions", {**_COMPLETION, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {**_COMPLETION, "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {**_COMPLETION, "response_format": {"type": "json_schema"}}),
    ("/v1/completions", {**_COMPLETION, "response_format": {"type": "text", "json_schema": {"schema": {}}}}),
    ("/v1/completions", {**_COMPLETION, "min_tokens": 2}),
    ("/v1/completions", {**_COMPLETION, "min_tokens": 2, "guided_regex": "[ab]+"}),
    ("/v1/completions", {**_COMPLETION, "min_tokens": 2, "structured_outputs": {"choice": ["a", "b"]}}),
    ("/v1/completions", {**_COMPLETION, "min_tokens": 2, "response_format": {"type": "json_object"}}),
    ("/v1/completions", {**_COMPLETION, "min_tokens": 2, "response_format": {"type": "text"}}),
    ("/v1/completions", {**_COMPLETION, "top_k": False}),
    ("/v1/completions", {**_COMPLETION, "n": 2.0, "top_k": 3.0}),
    ("/v1/completions", {**_COMPLETION, "n": 17}),
    ("/v1/completions", {**_COMPLETION, "prompt": [1, 511]}),
    ("/v1/completions", {**_COMPLETION, "prompt": [1, 512]}),
    ("/v1/completions", {**_COMPLETION, "logit_bias": {"0511": 5}}),
    ("/v1/completions", {**_COMPLETION, "logit_bias": {"600": 5}}),
    ("/v1/completions", {**_COMPLETION, "suffix": "end"}),
    ("/v1/chat/completions", _CHAT),
    ("/v1/chat/completions", {**_CHAT, "top_logprobs": 2}),
    ("/v1/chat/completions", {**_CHAT, "top_logprobs": 2, "logprobs": True}),
    ("/v1/chat/completions", {**_CHAT, "continue_final_message": True}),
    ("/v1/chat/completions", {**_CHAT, "functions": [{"name": "f"}]}),
    ("/v1/chat/completions", {**_CHAT, "functions": [], "function_call": "none"}),
    ("/v1/chat/completions", {**_CHAT, "function_call": "auto"}),
    ("/v1/chat/completions", {**_CHAT, "modalities": ["audio"]}),
    ("/v1/chat/completions", {**_CHAT, "modalities": ["text"]}),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
    # null for a field with a default is that default (the openai SDK sends null for None)
    ("/v1/completions", {**_COMPLETION, "temperature": None, "n": None, "echo": None, "top_k": None}),
    ("/v1/chat/completions", {**_CHAT, "temperature": None, "top_p": None, "stream": None, "logprobs": None}),
    ("/v1/chat/completions", {**_CHAT, "stream": True, "stream_options": {"include_usage": None}}),
    ("/v1/chat/completions", {**_CHAT, "model": None}),
    ("/v1/chat/completions", {**_CHAT, "messages": [{"role": None, "content": "Hi"}]}),
    # One output constraint at most. A forced tool_choice is one (with tools to choose from). That two
    # others are refused together is in the completions document, beyond the chat one
    # (schemas._ONE_CONSTRAINT_WITHOUT_MIN_TOKENS says why).
    ("/v1/completions", {**_COMPLETION, "guided_regex": "[ab]+"}),
    ("/v1/completions", {**_COMPLETION, "response_format": {"type": "text"}, "guided_choice": ["a"]}),
    ("/v1/completions", {**_COMPLETION, "guided_regex": "[ab]+", "guided_choice": ["a"]}),
    ("/v1/completions", {**_COMPLETION, "guided_regex": "[ab]+", "guided_choice": None}),
    ("/v1/completions", {**_COMPLETION, "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}),
    ("/v1/completions", {**_COMPLETION, "structured_outputs": {"json": {}, "choice": ["a"]}}),
    ("/v1/completions", {**_COMPLETION, "structured_outputs": {"json": {}, "choice": None}}),
    # a count of tokens to generate is bounded by the context (128 here), which the prompt shares
    ("/v1/completions", {**_COMPLETION, "max_tokens": 100}),
    ("/v1/completions", {**_COMPLETION, "max_tokens": 129}),
    ("/v1/chat/completions", {**_CHAT, "max_tokens": None, "max_completion_tokens": 129}),
    ("/v1/chat/completions", {**_CHAT, "max_tokens": None, "min_tokens": 129}),
    ("/v1/responses", {**_RESPONSE, "max_output_tokens": 129}),
    ("/v1/completions", {**_COMPLETION, "stop": ["x"] * 64}),
    ("/v1/completions", {**_COMPLETION, "stop": ["x"] * 65}),
    ("/v1/chat/completions", {**_CHAT, "tools": _TOOLS, "tool_choice": "required"}),
    ("/v1/chat/completions", {**_CHAT, "tools": _TOOLS, "tool_choice": "required", "min_tokens": 3}),
    ("/v1/chat/completions", {**_CHAT, "tools": _TOOLS, "tool_choice": _NAMED, "min_tokens": 3}),
    ("/v1/chat/completions", {**_CHAT, "tools": _TOOLS, "tool_choice": "auto", "min_tokens": 1}),
    ("/v1/chat/completions", {**_CHAT, "tool_choice": "required"}),
    ("/v1/chat/completions", {**_CHAT, "tools": [], "tool_choice": _NAMED}),
    ("/v1/chat/completions", {**_CHAT, "tools": _TOOLS, "tool_choice": "required", "guided_regex": "a"}),
    ("/v1/chat/completions", {**_CHAT, "tools": _TOOLS, "tool_choice": "none", "guided_regex": "a"}),
    ("/v1/responses", _RESPONSE),
    ("/v1/responses", {**_RESPONSE, "text": {"format": {"type": "json_schema"}}}),
    ("/v1/responses", {**_RESPONSE, "text": {"format": {"type": "json_object", "schema": {}}}}),
    ("/v1/responses", {**_RESPONSE, "text": {"format": {"type": "json_object"}}}),
    ("/v1/responses", {**_RESPONSE, "tool_choice": "required"}),
    ("/v1/responses", {**_RESPONSE, "tools": _RESPONSE_TOOLS, "tool_choice": "required", "text": {"format": {"type": "json_object"}}}),
    ("/v1/responses", {**_RESPONSE, "tools": _RESPONSE_TOOLS, "tool_choice": "required"}),
    ("/tokenize", {"prompt": "Hi"}),
    ("/tokenize", {"prompt": "Hi", "add_special_tokens": None}),
    ("/tokenize", {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}),
    ("/tokenize", {"prompt": None, "messages": None}),
    ("/detokenize", {"tokens": [1, 2.0]}),
    ("/detokenize", {"tokens": [True]}),
]


def test_the_document_refuses_exactly_what_the_server_refuses(server):
    """Cross-field rules, vocabulary and batch bounds, strict types: jsonschema's verdict on a body
    under the served document is the server's (2xx or a 400)."""
    doc = httpx.get(server.base_url + "/openapi.json").json()
    verdicts = []
    for path, body in _VERDICTS:
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        validator = jsonschema.Draft202012Validator({**schema, "components": doc["components"]})
        r = httpx.post(server.base_url + path, json=body, timeout=60)
        assert r.status_code in (200, 400), r.text
        verdicts.append((path, body, validator.is_valid(body), r.status_code == 200))
    assert [v for v in verdicts if v[2] != v[3]] == []
    assert {accepted for *_, accepted in verdicts} == {True, False}  # both kinds are there
