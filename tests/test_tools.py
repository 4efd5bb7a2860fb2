"""Tool calling through the official openai SDK on the demo model (its chat template ignores tools, so
every call below comes from the grammar or the parsers, not from the model knowing the tools)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from serving.api import tools as tool_parsing

MODEL = "stories260k"
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _valid_call(call, names=("get_weather", "get_time")):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_gives_a_schema_valid_call_every_time(client):
    for seed in range(20):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=120, parallel_tool_calls=False)  # fmt: skip
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1
        _valid_call(choice.message.tool_calls[0])


def test_a_named_function_is_the_one_called(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(20):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named,
                                           temperature=1.0, seed=seed, max_tokens=60)  # fmt: skip
        (call,) = r.choices[0].message.tool_calls
        _valid_call(call, names=("get_time",))


def test_a_function_declared_twice_is_called_under_either_definition(client):
    """As vLLM does, a tools list may name a function twice: a named choice of it is a call valid under
    one of its definitions (here, a weather call with either a city or a zone)."""
    twice = [*TOOLS, {"type": "function", "function": {"name": "get_weather", "parameters": TIME}}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(12):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=twice, tool_choice=named,
                                           temperature=1.0, seed=seed, max_tokens=200)  # fmt: skip
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        arguments = json.loads(call.function.arguments)
        assert any(jsonschema.Draft202012Validator(s).is_valid(arguments) for s in (WEATHER, TIME)), arguments
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=twice, tool_choice="required",
                                       seed=0, max_tokens=300, parallel_tool_calls=False)  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls"


def test_streamed_calls_accumulate_in_the_sdk(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0.7, seed=1, max_tokens=300, stream=True, parallel_tool_calls=False)  # fmt: skip
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = entry["id"] or delta.id
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    assert "tool_calls" in reasons and calls
    for entry in calls.values():
        assert entry["id"] and entry["name"] in SCHEMAS
        jsonschema.validate(json.loads(entry["arguments"]), SCHEMAS[entry["name"]])


def test_a_full_round_trip(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=200, parallel_tool_calls=False)  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=20)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice needs tools"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ],
)
def test_bad_tool_requests_are_400s(server, extra, needle):
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


FUNCTIONS = [t["function"] for t in TOOLS]


@pytest.mark.parametrize(
    "text",
    [
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    ],
    ids=["hermes", "mistral", "llama3-json"],
)
def test_auto_parses_the_formats_of_the_families_we_serve(text):
    content, calls = tool_parsing.parse(text, FUNCTIONS, "auto")
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert content in (None, "Let me check.")


def test_auto_leaves_text_and_unknown_functions_alone():
    assert tool_parsing.parse("Hello there", FUNCTIONS, "auto") == ("Hello there", [])
    text = '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>'
    assert tool_parsing.parse(text, FUNCTIONS, "auto") == (text, [])


def test_tools_with_an_unusable_parameters_schema_are_a_400(server):
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"$ref": "#/none"}}}}}]
    for choice in ("auto", "required"):
        r = httpx.post(server.base_url + "/v1/chat/completions",
                       json={"model": MODEL, "messages": ASK, "tools": bad, "tool_choice": choice}, timeout=30)  # fmt: skip
        assert r.status_code == 400, r.text
        assert "none" in r.json()["error"]["message"]


def test_the_parser_flag_restricts_the_auto_formats():
    text = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]'
    assert tool_parsing.parse(text, FUNCTIONS, "auto", "mistral")[1]
    assert tool_parsing.parse(text, FUNCTIONS, "auto", "hermes") == (text, [])


def _hermes(*calls: dict) -> str:
    return "Let me check.\n" + "".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>\n" for c in calls)


PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
UTC = {"name": "get_time", "arguments": {"zone": "UTC"}}


def test_auto_streams_the_content_before_a_call_and_the_calls_as_the_whole_response_has_them(client):
    """The output is pinned (guided_choice) to a Hermes reply: text, then two calls."""
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 200, "extra_body": {"guided_choice": [_hermes(PARIS, UTC)]}}
    whole = client.chat.completions.create(**body).choices[0]
    assert whole.message.content == "Let me check." and whole.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == [
        (PARIS["name"], PARIS["arguments"]), (UTC["name"], UTC["arguments"])
    ]  # fmt: skip
    chunks = [c.choices[0] for c in client.chat.completions.create(**body, stream=True) if c.choices]
    content_at = [i for i, c in enumerate(chunks) if c.delta.content]
    calls_at = [i for i, c in enumerate(chunks) if c.delta.tool_calls]
    assert "".join(chunks[i].delta.content for i in content_at) == whole.message.content
    assert content_at and content_at[0] < calls_at[0] == calls_at[-1]  # the content first, then the calls in one delta
    calls = chunks[calls_at[0]].delta.tool_calls
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [
        (k, c.function.name, c.function.arguments) for k, c in enumerate(whole.message.tool_calls)
    ]
    assert chunks[-1].finish_reason == "tool_calls"

    one = client.chat.completions.create(**body, parallel_tool_calls=False).choices[0]
    assert [c.function.name for c in one.message.tool_calls] == ["get_weather"]  # the first call only


@pytest.mark.parametrize(
    ("text", "streamable"),
    [
        ("Sure, here", "Sure, here"),
        ("Sure, here <tool", "Sure, here"),  # maybe the tag's start
        ("Sure.\n<tool_call>\n{", "Sure."),
        ("  \n", ""),
        ('{"name": "get_weather"', ""),  # a Llama 3 JSON call, maybe
        ("[TOOL", ""),  # a Mistral call, maybe
        ("[1, 2] are numbers", "[1, 2] are numbers"),
        ("Fine <b>bold</b>", "Fine <b>bold</b>"),
    ],
)
def test_what_an_auto_output_may_stream_before_it_ends(text, streamable):
    assert text[: tool_parsing.streamable(text)] == streamable
    content, calls = tool_parsing.parse(text, FUNCTIONS, "auto")
    assert not calls and (content or "").startswith(streamable)
