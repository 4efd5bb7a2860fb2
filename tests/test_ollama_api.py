"""Ollama's API through Ollama's own Python client (ollama on PyPI) against the real server: what Open WebUI,
LangChain's ChatOllama and editor plugins that speak only Ollama send."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server_util import TEST_CHAT_TEMPLATE, RunningServer

ollama = pytest.importorskip("ollama")

MODEL = "stories260k"
PROMPT = "Once upon a time"
GREEDY = ", there was a little girl named Lily. She loved to play outside in the park."  # SOURCE.md of stories260k


@pytest.fixture(scope="module")
def server():
    with RunningServer(chat_template=TEST_CHAT_TEMPLATE, served_model_name=[MODEL, "demo:latest"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.base_url)


def test_generate_raw_is_the_completion_and_streams_lines(client):
    whole = client.generate(model=MODEL, prompt=PROMPT, raw=True, options={"temperature": 0, "num_predict": 16}, stream=False)
    assert whole.done and whole.done_reason == "length" and GREEDY.startswith(whole.response) and len(whole.response) > 20
    assert whole.eval_count == 16 and whole.prompt_eval_count == 5 and whole.total_duration > 0
    parts = list(client.generate(model=MODEL, prompt=PROMPT, raw=True, options={"temperature": 0, "num_predict": 16}, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].eval_count == 16
    assert "".join(p.response for p in parts) == whole.response


def test_chat_streams_the_chat_completion(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    options = {"temperature": 0, "num_predict": 24, "seed": 1}
    whole = client.chat(model=MODEL, messages=messages, options=options)
    assert whole.message.role == "assistant" and whole.message.content and whole.done_reason == "length"
    parts = list(client.chat(model=MODEL, messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content and parts[-1].done
    # the same text as the chat completion of the same request
    openai_body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 24, "seed": 1,
                   "repetition_penalty": 1.1, "repeat_last_n": 64}  # Ollama's defaults  # fmt: skip
    assert httpx.post(server.base_url + "/v1/chat/completions", json=openai_body).json()["choices"][0]["message"]["content"] == whole.message.content
    stopped = client.chat(model="demo:latest", messages=messages, options={**options, "stop": [" "]})
    assert " " not in stopped.message.content and stopped.done_reason == "stop" and stopped.model == "demo:latest"


def test_format_constrains_chat_to_json(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}
    out = client.chat(model=MODEL, messages=[{"role": "user", "content": "Name?"}], format=schema, options={"temperature": 0})
    assert isinstance(json.loads(out.message.content)["name"], str)
    loose = client.chat(model=MODEL, messages=[{"role": "user", "content": "Data?"}], format="json", options={"num_predict": 60})
    assert loose.message.content.lstrip().startswith("{")


def test_tool_results_answer_the_calls_of_their_tool_name():
    """Ollama's clients send a tool result with the tool's name, not a call id: each answers the first open
    call of that name."""
    from serving.api.ollama_api import Message, _chat_messages

    calls = [{"function": {"name": "a", "arguments": {"x": 1}}}, {"function": {"name": "b", "arguments": {}}}]
    history = [
        Message(role="user", content="go"),
        Message(role="assistant", content="", tool_calls=calls),
        Message(role="tool", content="B", tool_name="b"),
        Message(role="tool", content="A"),
    ]
    out = _chat_messages(history)
    ids = [c["id"] for c in out[1]["tool_calls"]]
    assert json.loads(out[1]["tool_calls"][0]["function"]["arguments"]) == {"x": 1}
    assert [m["tool_call_id"] for m in out[2:]] == [ids[1], ids[0]] and [m["content"] for m in out[2:]] == ["B", "A"]


def test_a_chat_with_tools_from_ollamas_client_is_served(client):
    def get_weather(city: str) -> str:
        """The weather in a city.

        Args:
          city: The city.
        """
        return "sunny"

    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    out = client.chat(model=MODEL, messages=history, tools=[get_weather], options={"temperature": 0, "num_predict": 8})
    assert out.done and out.message.role == "assistant" and out.eval_count <= 8


def test_a_thinking_models_thoughts_are_the_messages_thinking(tmp_path):
    from tests.tiny_models import make_thinking_model

    with RunningServer(model_path=str(make_thinking_model(tmp_path))) as s:
        client = ollama.Client(host=s.base_url)
        out = client.chat(model="thinking", messages=[{"role": "user", "content": "Is it big?"}])
        assert (out.message.thinking, out.message.content) == ("The cat big.", "Yes, it")  # as the chat completion's
        parts = list(client.chat(model="thinking", messages=[{"role": "user", "content": "Is it big?"}], stream=True))
        assert "".join(p.message.thinking or "" for p in parts).strip() == "The cat big."
        assert "".join(p.message.content for p in parts).strip() == "Yes, it"
        hidden = client.chat(model="thinking", messages=[{"role": "user", "content": "Is it big?"}], think=False)
        assert hidden.message.thinking is None


def test_embed_and_the_older_embeddings(client, server):
    out = client.embed(model=MODEL, input=["Once upon a time", "there was a cat"])
    direct = httpx.post(server.base_url + "/v1/embeddings", json={"model": MODEL, "input": ["Once upon a time", "there was a cat"]}).json()
    assert len(out.embeddings) == 2 and out.prompt_eval_count == direct["usage"]["prompt_tokens"]
    for got, want in zip(out.embeddings, direct["data"], strict=True):
        assert got == pytest.approx(want["embedding"], abs=1e-5)
    assert client.embed(model=MODEL, input="x", dimensions=8).embeddings[0].__len__() == 8
    assert client.embeddings(model=MODEL, prompt="Once upon a time").embedding == pytest.approx(out.embeddings[0], abs=1e-5)


def test_models_show_ps_and_version(client, server):
    assert [m.model for m in client.list().models] == [MODEL, "demo:latest"]
    assert 0.9e6 < client.list().models[0].size < 1.2e6  # the 1 MB demo's weights
    shown = client.show(MODEL)
    context = httpx.get(server.base_url + "/v1/models").json()["data"][0]["max_model_len"]
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["llama.context_length"] == context
    assert "completion" in shown.capabilities and shown.details.family == "llama"
    assert [m.model for m in client.ps().models] == [MODEL, "demo:latest"]
    assert httpx.get(server.base_url + "/api/version").json()["version"]
    root = httpx.get(server.base_url + "/")  # what clients check before anything else
    assert root.status_code == 200 and "running" in root.text
    assert httpx.get(server.base_url + "/version").json()["version"]  # vLLM's


def test_errors_are_ollamas(client, server):
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "nope" in missing.value.error
    r = httpx.post(server.base_url + "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": -1}})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = httpx.post(server.base_url + "/api/generate", json={"model": MODEL, "prompt": "hi", "images": ["aGk="]})
    assert r.status_code == 400 and "images" in r.json()["error"]
    r = httpx.post(server.base_url + "/api/chat", content=b"{")
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


def test_an_empty_request_loads_the_model(client):
    """What clients send to load a model ahead of use: an answer at once, done_reason load."""
    out = client.generate(model=MODEL, prompt="")
    assert out.done and out.done_reason == "load" and out.response == ""
    chat = client.chat(model=MODEL, messages=[])
    assert chat.done and chat.done_reason == "load" and chat.message.content == ""


def test_ollamas_sampling_defaults_hold_where_options_leave_them():
    from serving.api.ollama_api import ChatRequest, _common

    defaults = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "repeat_last_n": 64}
    assert {k: _common(ChatRequest(model="m"))[k] for k in defaults} == defaults
    options = {"temperature": 0, "num_predict": -1, "stop": "x", "repeat_penalty": 1.2, "repeat_last_n": 0}
    chosen = _common(ChatRequest(model="m", options=options))
    assert chosen["temperature"] == 0 and "max_tokens" not in chosen and chosen["stop"] == ["x"] and chosen["repetition_penalty"] == 1.2
    assert chosen["repeat_last_n"] == 0
