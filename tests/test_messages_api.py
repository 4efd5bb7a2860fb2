"""/v1/messages (Anthropic's Messages API) through the anthropic SDK: text, streaming as the SDK
accumulates it, stop sequences, tool use (forced by the grammar), a prefill, token counting, errors in
Anthropic's shape, and a thinking model's thinking block."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.server_util import TEST_CHAT_TEMPLATE, RunningServer
from tests.tiny_models import make_thinking_model

MODEL = "stories260k"
GREEDY = {"temperature": 0}  # the SDK no longer has sampling arguments; clients may still send them
ASK = [{"role": "user", "content": "Tell me a story."}]
WEATHER = {
    "name": "get_weather",
    "description": "Weather now",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def server():
    with RunningServer(chat_template=TEST_CHAT_TEMPLATE, api_key="sekrit") as s:
        yield s


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key="sekrit", max_retries=0)


def test_a_message_and_its_stream_agree(client):
    whole = client.messages.create(model=MODEL, max_tokens=24, messages=ASK, extra_body=GREEDY)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == MODEL
    assert [b.type for b in whole.content] == ["text"] and whole.content[0].text
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.usage.input_tokens > 0
    with client.messages.stream(model=MODEL, max_tokens=24, messages=ASK, extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == whole.content[0].text == final.content[0].text
    assert (final.stop_reason, final.usage.output_tokens) == (whole.stop_reason, whole.usage.output_tokens)


def test_max_tokens_and_stop_sequences_name_why_it_stopped(client):
    cut = client.messages.create(model=MODEL, max_tokens=3, messages=ASK, extra_body=GREEDY)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    text = client.messages.create(model=MODEL, max_tokens=40, messages=ASK, extra_body=GREEDY).content[0].text
    word = text.split()[2]
    stopped = client.messages.create(model=MODEL, max_tokens=40, messages=ASK, stop_sequences=["zzz", word], extra_body=GREEDY)
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", word)
    assert word not in stopped.content[0].text and text.startswith(stopped.content[0].text)


def test_a_forced_tool_use_and_its_result(client):
    forced = {"type": "tool", "name": "get_weather"}
    reply = client.messages.create(model=MODEL, max_tokens=80, messages=ASK, tools=[WEATHER], tool_choice=forced)
    (call,) = [b for b in reply.content if b.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and call.name == "get_weather" and isinstance(call.input["city"], str)
    with client.messages.stream(model=MODEL, max_tokens=80, messages=ASK, tools=[WEATHER], tool_choice=forced) as stream:
        final = stream.get_final_message()  # the SDK assembles input_json_delta into the input
    (streamed_call,) = [b for b in final.content if b.type == "tool_use"]
    assert streamed_call.name == "get_weather" and set(streamed_call.input) == {"city"}
    # The result goes back as a tool_result block; the history renders and the turn goes on.
    history = [*ASK, {"role": "assistant", "content": reply.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]  # fmt: skip
    after = client.messages.create(model=MODEL, max_tokens=8, messages=history, tools=[WEATHER])
    assert after.usage.input_tokens > reply.usage.input_tokens


def test_a_prefill_is_continued(client):
    prefill = [*ASK, {"role": "assistant", "content": "Once upon a time"}]
    reply = client.messages.create(model=MODEL, max_tokens=12, messages=prefill, extra_body=GREEDY)
    counted = client.messages.count_tokens(model=MODEL, messages=prefill)
    assert reply.usage.input_tokens == counted.input_tokens
    assert not reply.content[0].text.startswith("Once upon a time")  # the reply is what follows it


def test_output_config_format_gives_json_valid_under_the_schema(client):
    import json

    schema = {"type": "object", "properties": {"pet": {"enum": ["cat", "dog"]}}, "required": ["pet"], "additionalProperties": False}
    reply = client.messages.create(
        model=MODEL, max_tokens=40, messages=ASK, output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
        cache_control={"type": "ephemeral"},
    )
    assert json.loads(reply.content[0].text)["pet"] in ("cat", "dog")


def test_errors_are_anthropic_error_objects(server, client):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=MODEL, max_tokens=0, messages=ASK)
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="claude-opus-9", max_tokens=8, messages=ASK)
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=8, messages=ASK
        )
    for body in (
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]}]},
        {"messages": ASK, "tool_choice": {"type": "any"}},  # no tools
        {"messages": ASK, "temperature": 1.5},
        {"messages": ASK, "frobnicate": 1},
    ):
        r = httpx.post(server.base_url + "/v1/messages", json={"model": MODEL, "max_tokens": 8, **body},
                       headers={"x-api-key": "sekrit"})  # fmt: skip
        assert r.status_code == 400, r.text
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"


def test_a_thinking_models_thinking_is_a_block_of_its_own(tmp_path):
    with RunningServer(model_path=str(make_thinking_model(tmp_path))) as s:
        client = anthropic.Anthropic(base_url=s.base_url, api_key="unused", max_retries=0)
        reply = client.messages.create(model="thinking", max_tokens=32, messages=[{"role": "user", "content": "Big?"}])
        assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in reply.content] == [
            ("thinking", "The cat big."), ("text", "Yes, it")
        ]  # fmt: skip
        with client.messages.stream(model="thinking", max_tokens=32, messages=[{"role": "user", "content": "Big?"}]) as stream:
            final = stream.get_final_message()
        assert [b.type for b in final.content] == ["thinking", "text"] and final.content[0].thinking == "The cat big."
        off = client.messages.create(model="thinking", max_tokens=32, messages=[{"role": "user", "content": "Big?"}],
                                     thinking={"type": "disabled"})  # fmt: skip
        assert [b.type for b in off.content] == ["text"] and off.content[0].text.strip() == "Yes, it"
        hidden = client.messages.create(model="thinking", max_tokens=32, messages=[{"role": "user", "content": "Big?"}],
                                        thinking={"type": "adaptive", "display": "omitted"})  # fmt: skip
        assert [(b.type, getattr(b, "thinking", None)) for b in hidden.content] == [("thinking", ""), ("text", None)]


def test_max_tokens_is_a_bound_the_context_may_cut(tmp_path):
    """Clients of Anthropic's API (Claude Code among them) ask for tens of thousands of tokens: beyond the
    context's room that is no 400 but a reply that fills the room and stops there, saying so."""
    from transformers import AutoTokenizer

    model_dir = make_thinking_model(tmp_path)
    ask = [{"role": "user", "content": "Big?"}]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(ask, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    room = 5  # the scripted reply is 12 tokens and an EOS
    with RunningServer(model_path=str(model_dir), max_seq_len=len(prompt) + room) as s:
        client = anthropic.Anthropic(base_url=s.base_url, api_key="unused", max_retries=0)
        filled = client.messages.create(model="thinking", max_tokens=16000, messages=ask)  # the SDK streams above ~21k
        assert (filled.stop_reason, filled.usage.output_tokens) == ("model_context_window_exceeded", room)
        with client.messages.stream(model="thinking", max_tokens=64000, messages=ask) as stream:
            assert stream.get_final_message().stop_reason == "model_context_window_exceeded"
        assert client.messages.create(model="thinking", max_tokens=3, messages=ask).stop_reason == "max_tokens"
        too_long = [{"role": "user", "content": "Big? " * 20}]
        with pytest.raises(anthropic.BadRequestError):  # a prompt with no room left is still refused
            client.messages.create(model="thinking", max_tokens=8, messages=too_long)
