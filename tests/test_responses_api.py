"""/v1/responses (OpenAI's Responses API) through the official openai SDK, on the demo model with the
test chat template: the same generation as the chat completion it amounts to, whole or streamed."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.test_tools import WEATHER

MODEL = "stories260k"
ASK = "Tell me a story."
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather now", "parameters": WEATHER}]


def test_a_response_is_the_chat_completion_it_amounts_to(client):
    out = client.responses.create(model=MODEL, input=ASK, instructions="Be kind.", max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": ASK}], max_tokens=12, temperature=0
    )
    assert out.object == "response" and out.id.startswith("resp_") and out.model == MODEL
    assert out.output_text == chat.choices[0].message.content
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"  # 12 tokens cut it
    assert out.output[0].type == "message" and out.output[0].role == "assistant" and out.output[0].status == "incomplete"
    assert (out.usage.input_tokens, out.usage.output_tokens) == (chat.usage.prompt_tokens, 12)
    assert out.usage.total_tokens == out.usage.input_tokens + 12


def test_the_stream_sends_the_typed_events_and_ends_with_the_whole_response(client):
    whole = client.responses.create(model=MODEL, input=ASK, max_output_tokens=16, temperature=0)
    events = list(client.responses.create(model=MODEL, input=ASK, max_output_tokens=16, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas and "".join(deltas) == whole.output_text  # how many: as the engine's outputs were read
    assert events[-1].response.output_text == whole.output_text and events[-1].response.usage.output_tokens == 16
    assert {e.item_id for e in events if e.type == "response.output_text.delta"} == {events[-1].response.output[0].id}


def test_input_items_are_the_conversation(client, server):
    """Messages with content parts, a function call and its output: the prompt is the chat one."""
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
        call,
        {"type": "function_call_output", "call_id": "call_1", "output": '{"temperature": 3}'},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is 3.", "annotations": []}]},
        {"role": "user", "content": "Thanks"},
    ]
    out = client.responses.create(model=MODEL, input=items, tools=TOOLS, max_output_tokens=4, temperature=0)
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'},
        {"role": "assistant", "content": "It is 3."},
        {"role": "user", "content": "Thanks"},
    ]  # fmt: skip
    tokenized = httpx.post(server.base_url + "/tokenize", json={"messages": messages}).json()
    assert out.usage.input_tokens == tokenized["count"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_choice_is_a_function_call_item(client, stream):
    body = {"model": MODEL, "input": "Weather in Paris?", "tools": TOOLS, "max_output_tokens": 200, "parallel_tool_calls": False}
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        if stream:
            events = list(client.responses.create(**body, tool_choice=choice, stream=True))
            kinds = [e.type for e in events]
            assert "response.output_text.delta" not in kinds
            done = [e for e in events if e.type == "response.function_call_arguments.done"]
            assert len(done) == 1 and done[0].name == "get_weather"
            out = events[-1].response
            assert events[-1].type == "response.completed"
            assert json.loads(done[0].arguments) == json.loads(out.output[0].arguments)
        else:
            out = client.responses.create(**body, tool_choice=choice)
        assert out.status == "completed" and [item.type for item in out.output] == ["function_call"]
        item = out.output[0]
        assert item.name == "get_weather" and item.call_id.startswith("call_")
        jsonschema.validate(json.loads(item.arguments), WEATHER)


def test_text_format_json_schema_constrains_the_output(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"], "additionalProperties": False}
    out = client.responses.create(
        model=MODEL, input="Name a dog.", max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "dog", "schema": schema, "strict": True}},
    )  # fmt: skip
    jsonschema.validate(json.loads(out.output_text), schema)
    assert out.text.format.type == "json_schema"


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ({"previous_response_id": "resp_1"}, 400, "previous_response_id"),
        ({"input": ""}, 400, "input"),
        ({"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, 400, "input"),  # reasoning alone
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, 400, "input"),
        ({"reasoning": {"effort": "high"}}, 400, "reasoning"),
        ({"temperature": 3}, 400, "temperature"),
        ({"max_output_tokens": 100000}, 400, "input"),
        ({"tool_choice": "required"}, 400, "tool_choice"),
        ({"frobnicate": 1}, 400, "frobnicate"),
        ({"model": "gpt-5"}, 404, "model"),
    ],
)
def test_bad_responses_requests_are_openai_errors(server, extra, status, param):
    r = httpx.post(server.base_url + "/v1/responses", json={"model": MODEL, "input": ASK, **extra}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.json()
