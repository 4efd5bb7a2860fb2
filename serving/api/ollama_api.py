"""Ollama's API over the same generation path: what Ollama's clients send (the ollama SDK, Open WebUI,
LangChain's ChatOllama, editor plugins that speak only Ollama) served as the chat completion,
completion or embeddings it amounts to.

/api/chat and /api/generate stream by default, as Ollama does: NDJSON, one JSON object per line, the
last with done: true and the counts and durations Ollama reports (nanoseconds). Errors are Ollama's
{"error": "..."}. Model management (pull, push, create, copy, delete) has no counterpart here: the
server serves the model it was started with, its aliases and its LoRA adapters.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response, g

from serving.api.errors import APIError, bad_request
from serving.api.formats import Format
from serving.api.generation import Prompt
from serving.api.openapi import documented
from serving.api.responses import VersionResponse
from serving.api.routes import (
    _collected,
    _embedding_inputs_fit,
    _fits,
    as_request,
    chat_generation,
    check_embedding,
    check_generates,
    check_model,
    completion_generation,
    embed,
    encoded,
    parse_body,
    state,
    streaming_response,
    submitted,
)
from serving.api.schemas import ChatCompletionRequest, CompletionRequest
from serving.api.state import AppState
from serving.api.tracking import RequestTracker
from serving.engine.sampling_params import SamplingParams

PREFIX = "/api/"
# The Ollama API these routes follow (clients read /api/version to know what a server speaks).
OLLAMA_VERSION = "0.12.0"
bp = Blueprint("ollama", __name__)


class _Loose(BaseModel):
    # Ollama ignores fields it does not know (clients send keep_alive, options for the runtime, ...).
    model_config = ConfigDict(extra="ignore")


class Options(_Loose):
    """Ollama's options that are sampling settings here; its runtime ones (num_ctx, num_gpu, num_thread, ...)
    are the server's own flags and are ignored, as Ollama ignores options a runner does not use."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = Field(None, description="tokens to generate; -1 (or unset): as many as the context holds")
    stop: list[str] | str | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class ToolCallFunction(_Loose):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(_Loose):
    function: ToolCallFunction


class Message(_Loose):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


Format_ = Literal["", "json"] | dict[str, Any]
Think = bool | Literal["low", "medium", "high"]


class _Generating(_Loose):
    model: str = Field(min_length=1)
    stream: bool = True
    format: Format_ | None = None
    options: Options | None = None
    think: Think | None = None
    keep_alive: float | str | None = None


class ChatRequest(_Generating):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Generating):
    prompt: str = ""
    system: str | None = None
    suffix: str | None = None
    raw: bool = False
    images: list[str] | None = None
    context: list[int] | None = None


class EmbedRequest(_Loose):
    model: str = Field(min_length=1)
    input: str | list[str]
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class EmbeddingsRequest(_Loose):
    model: str = Field(min_length=1)
    prompt: str = ""


class ShowRequest(_Loose):
    model: str | None = None
    name: str | None = None  # older clients' field


class OllamaError(BaseModel):
    error: str


class _Done(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OutToolCall(BaseModel):
    function: ToolCallFunction


class OutMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    thinking: str | None = None
    tool_calls: list[OutToolCall] | None = None


class ChatResponse(_Done):
    message: OutMessage


class GenerateResponse(_Done):
    response: str
    thinking: str | None = None


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class EmbeddingsResponse(BaseModel):
    embedding: list[float]


class ModelDetails(BaseModel):
    parent_model: str
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ModelEntry(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[ModelEntry]


class RunningModel(ModelEntry):
    expires_at: str
    size_vram: int
    context_length: int


class PsResponse(BaseModel):
    models: list[RunningModel]


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


def error_body(exc: APIError) -> dict[str, Any]:
    return {"error": exc.message}


_ERRORS = (400, 404, 408, 413, 415, 429)


# -- generation ------------------------------------------------------------------------------


@bp.post("/api/chat")
@documented(ChatRequest, ChatResponse, _ERRORS, error=OllamaError, ndjson=ChatResponse)
async def chat():
    """Chat (Ollama's API)

    Messages (with thinking, tool_calls and tool results), tools, format (json or a JSON schema), the
    sampling options and think, generated as a chat completion; streamed as NDJSON unless stream is false.
    """
    st = state()
    req = await parse_body(ChatRequest, _fits)
    check_model(st, req.model)
    if not req.messages:  # Ollama: no messages loads the model, and says it is done
        check_generates(st)
        return _done_line(req.model, "load", {"message": {"role": "assistant", "content": ""}}, None, time.monotonic())
    body = {**_common(req), "messages": _chat_messages(req.messages)}
    if req.tools:
        body["tools"] = req.tools
    chat_req = as_request(ChatCompletionRequest, body)
    prompts, params, fmt = await chat_generation(st, chat_req)
    return await _generate(st, req, prompts, params, fmt, _chat_line)


@bp.post("/api/generate")
@documented(GenerateRequest, GenerateResponse, _ERRORS, error=OllamaError, ndjson=GenerateResponse)
async def generate():
    """Generate a completion (Ollama's API)

    The prompt, with the system prompt, through the chat template; raw sends it as it is. format, the
    sampling options and think as /api/chat; streamed as NDJSON unless stream is false.
    """
    st = state()
    req = await parse_body(GenerateRequest, _fits)
    check_model(st, req.model)
    if req.images:
        raise bad_request("images: this model reads text only", param="images")
    if req.suffix:
        raise bad_request("suffix (fill-in-the-middle) is not supported", param="suffix")
    if req.context:
        raise bad_request("context is not supported: send the conversation's messages to /api/chat", param="context")
    if not req.prompt and not req.system:  # Ollama: an empty request loads the model, and says it is done
        check_generates(st)
        return _done_line(req.model, "load", {"response": ""}, None, time.monotonic())
    if req.raw:
        completion = as_request(CompletionRequest, {**_common(req), "prompt": req.prompt})
        prompts, params, fmt = await completion_generation(st, completion)
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [{"role": "user", "content": req.prompt}]
        chat_req = as_request(ChatCompletionRequest, {**_common(req), "messages": messages})
        prompts, params, fmt = await chat_generation(st, chat_req)
    return await _generate(st, req, prompts, params, fmt, _generate_line)


# Ollama's own defaults where options leave them unset (its DefaultOptions), not OpenAI's temperature 1, no
# cut and no penalty: its clients count on them (small models loop without the penalty).
_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1, "repeat_last_n": 64}


def _common(req: _Generating) -> dict[str, Any]:
    """The OpenAI request fields of Ollama's format, options and think."""
    body: dict[str, Any] = {"model": req.model, **_DEFAULTS}
    options = req.options or Options()
    for ours, value in (
        ("temperature", options.temperature), ("top_p", options.top_p), ("top_k", options.top_k),
        ("min_p", options.min_p), ("seed", options.seed), ("repetition_penalty", options.repeat_penalty),
        ("repeat_last_n", options.repeat_last_n),
        ("presence_penalty", options.presence_penalty), ("frequency_penalty", options.frequency_penalty),
    ):  # fmt: skip
        if value is not None:
            body[ours] = value
    if options.num_predict is not None and options.num_predict >= 0:  # -1, -2: as many as the context holds
        body["max_tokens"] = options.num_predict
    if options.stop:
        body["stop"] = [options.stop] if isinstance(options.stop, str) else options.stop
    if req.format == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(req.format, dict):
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": req.format}}
    if isinstance(req.think, str):
        body["reasoning_effort"] = req.think
    elif req.think is not None:  # a template that reads it (Qwen3's) thinks or not; none is asked to otherwise
        body["chat_template_kwargs"] = {"enable_thinking": req.think}
        body["include_reasoning"] = req.think
    return body


def _chat_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's. Its tool results name their tool, not a call: each answers the first
    call of that name not yet answered (else the first one not yet answered)."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (call id, tool name) not yet answered
    for i, m in enumerate(messages):
        if m.images:
            raise bad_request("images: this model reads text only", param=f"messages[{i}].images")
        if m.role == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": m.content or ""}
            if m.thinking:
                message["reasoning_content"] = m.thinking
            if m.tool_calls:
                calls = [
                    {"id": f"call_{i}_{k}", "type": "function", "function": {"name": c.function.name, "arguments": json.dumps(c.function.arguments)}}
                    for k, c in enumerate(m.tool_calls)
                ]
                message["tool_calls"] = calls
                open_calls = [(c["id"], c["function"]["name"]) for c in calls]
            out.append(message)
        elif m.role == "tool":
            answered = next((c for c in open_calls if c[1] == m.tool_name), open_calls[0] if open_calls else None)
            if answered is not None:
                open_calls.remove(answered)
            out.append({"role": "tool", "tool_call_id": answered[0] if answered else f"call_{i}", "content": m.content or ""})
        else:
            out.append({"role": m.role, "content": m.content or ""})
    return out


# An OpenAI choice (a chunk's, or with whole=True a finished one's) -> the fields of an Ollama line, or None.
Line = Callable[..., dict[str, Any] | None]


async def _generate(st: AppState, req: _Generating, prompts: list[Prompt], params: SamplingParams, fmt: Format, line: Line) -> Any:
    """Run the request; its OpenAI chunks (or whole choice), reshaped by `line`, as NDJSON or one object."""
    started = time.monotonic()
    deltas = submitted(st, prompts, params, 1, f"ollama-{g.request_id}")
    tracker: RequestTracker = g.tracker
    if not req.stream:
        (choice,) = await _collected(deltas, fmt, 1, 1, 1)
        return _done_line(req.model, choice["finish_reason"], line(choice, whole=True), tracker, started)

    async def lines() -> AsyncIterator[str]:
        reason = "stop"
        calls: list[dict[str, Any]] = []  # a chat's tool calls: whole, in the last line, as Ollama sends them
        async with aclosing(deltas):
            async for index, delta in deltas:
                for choice in fmt.streamed(index, delta):
                    reason = choice.get("finish_reason") or reason
                    calls += choice.get("delta", {}).get("tool_calls", [])
                    piece = line(choice, whole=False)
                    if piece is not None:
                        yield _ndjson({"model": req.model, "created_at": _now(), **piece, "done": False})
        last = line({"message": {"content": "", "tool_calls": calls}}, whole=True)
        yield _ndjson(_done_line(req.model, reason, last, tracker, started))

    return _ndjson_response(streaming_response(tracker, lines(), lambda exc: _ndjson(error_body(exc)), done=None))


def _chat_line(choice: dict[str, Any], whole: bool) -> dict[str, Any] | None:
    part = choice.get("message") if whole else choice.get("delta", {})
    if part is None:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": part.get("content") or ""}
    if part.get("reasoning"):
        message["thinking"] = part["reasoning"]
    if whole and part.get("tool_calls"):
        message["tool_calls"] = [{"function": {"name": c["function"]["name"], "arguments": _arguments(c)}} for c in part["tool_calls"]]
    if not whole and not message["content"] and "thinking" not in message:
        return None  # a tool call's delta (sent whole in the last line) or the finish marker
    return {"message": message}


def _generate_line(choice: dict[str, Any], whole: bool) -> dict[str, Any] | None:
    if "text" in choice:  # the completions format (raw)
        return {"response": choice["text"]} if whole or choice["text"] else None
    part = choice.get("message") if whole else choice.get("delta", {})
    assert part is not None
    out: dict[str, Any] = {"response": part.get("content") or ""}
    if part.get("reasoning"):
        out["thinking"] = part["reasoning"]
    return out if whole or out["response"] or "thinking" in out else None


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    try:
        arguments = json.loads(call["function"]["arguments"] or "{}")
    except ValueError:
        return {}
    return arguments if isinstance(arguments, dict) else {}


def _done_line(model: str, reason: str | None, last: dict[str, Any] | None, tracker: RequestTracker | None, started: float) -> dict[str, Any]:
    """The closing object: Ollama's done_reason (a tool call ends with "stop" there), counts and durations in ns."""
    now = time.monotonic()
    first = tracker.first_token_at if tracker is not None and tracker.first_token_at else now
    return {
        "model": model,
        "created_at": _now(),
        **(last or {}),
        "done": True,
        "done_reason": reason if reason in ("length", "load") else "stop",
        "total_duration": int((now - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": tracker.prompt_tokens if tracker is not None else 0,
        "prompt_eval_duration": int((first - started) * 1e9),
        "eval_count": tracker.completion_tokens if tracker is not None else 0,
        "eval_duration": int((now - first) * 1e9),
    }


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ndjson(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def _ndjson_response(response: Response) -> Response:
    response.mimetype = "application/x-ndjson"
    return response


# -- embeddings ------------------------------------------------------------------------------


@bp.post("/api/embed")
@documented(EmbedRequest, EmbedResponse, _ERRORS, error=OllamaError)
async def embed_route():
    """Embeddings (Ollama's API): each input's, L2-normalized; truncate cuts an input to the context"""
    st = state()
    req = await parse_body(EmbedRequest, _embedding_inputs_fit)
    check_embedding(st, req.model, req.dimensions)
    inputs = [req.input] if isinstance(req.input, str) else req.input
    if not inputs:
        raise bad_request("input holds no text", param="input")
    started = time.monotonic()
    vectors = await embed(st, req.model, inputs, -1 if req.truncate else None)
    return {
        "model": req.model,
        "embeddings": [encoded(v, req.dimensions, "float") for v in vectors],
        "total_duration": int((time.monotonic() - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": g.tracker.prompt_tokens,
    }


@bp.post("/api/embeddings")
@documented(EmbeddingsRequest, EmbeddingsResponse, _ERRORS, error=OllamaError)
async def embeddings_route():
    """An embedding (Ollama's older API): of the prompt"""
    st = state()
    req = await parse_body(EmbeddingsRequest)
    check_model(st, req.model)
    if not req.prompt:
        return {"embedding": []}  # as Ollama answers an empty prompt
    (vector,) = await embed(st, req.model, [req.prompt], -1)
    return {"embedding": encoded(vector, None, "float")}


# -- models ----------------------------------------------------------------------------------


def _entry(st: AppState, name: str) -> dict[str, Any]:
    assert st.model is not None
    info = st.model.info
    modified = datetime.fromtimestamp(st.started, UTC).isoformat().replace("+00:00", "Z")
    adapter = st.model.adapters.get(name)
    details = {
        "parent_model": st.model.name if adapter is not None else "",
        "format": "gguf" if info.gguf_file else "safetensors",
        "family": info.architecture,
        "families": [info.architecture],
        "parameter_size": "",
        "quantization_level": "",
    }
    digest = hashlib.sha256(f"{name}:{info.directory}:{adapter.source if adapter else ''}".encode()).hexdigest()
    size = info.weight_bytes if adapter is None else 0  # an adapter's own weights are not counted apart
    return {"name": name, "model": name, "modified_at": modified, "size": size, "digest": digest, "details": details}


@bp.get("/api/tags")
@documented(None, TagsResponse, error=OllamaError)
async def tags():
    """The models served (Ollama's API): the model, its aliases and its LoRA adapters"""
    st = state()
    assert st.model is not None
    return {"models": [_entry(st, name) for name in st.model.names]}


@bp.get("/api/ps")
@documented(None, PsResponse, error=OllamaError)
async def ps():
    """The models loaded (Ollama's API): all of them, for as long as the server runs"""
    st = state()
    assert st.model is not None
    forever = "9999-12-31T23:59:59Z"
    context = st.model.max_model_len
    on_gpu = st.model.info.device.startswith("cuda")
    return {
        "models": [
            {**(entry := _entry(st, n)), "expires_at": forever, "size_vram": entry["size"] if on_gpu else 0, "context_length": context}
            for n in st.model.names
        ]
    }


@bp.post("/api/show")
@documented(ShowRequest, ShowResponse, (400, 404, 413, 415), error=OllamaError)
async def show():
    """A model's details (Ollama's API): its architecture, context length and capabilities"""
    st = state()
    req = await parse_body(ShowRequest)
    name = req.model or req.name
    if not name:
        raise bad_request("model is required", param="model")
    check_model(st, name)
    assert st.model is not None
    info, entry = st.model.info, _entry(st, name)
    arch = info.architecture
    capabilities = (["completion", "tools"] if info.generates else []) + ["embedding"]
    if st.model.reasoning:
        capabilities.append("thinking")
    template = getattr(st.model.tokenizer, "chat_template", None)
    return {
        "modelfile": f"# served by FleetLM\nFROM {info.directory}\n",
        "parameters": "",
        "template": template if isinstance(template, str) else "",
        "details": entry["details"],
        "model_info": {
            "general.architecture": arch,
            f"{arch}.context_length": st.model.max_model_len,
            f"{arch}.embedding_length": info.hidden_size,
            f"{arch}.vocab_size": info.vocab_size,
        },
        "capabilities": capabilities,
        "modified_at": entry["modified_at"],
    }


@bp.get("/api/version")
@documented(None, VersionResponse, error=OllamaError)
async def version():
    """The Ollama API version these routes follow"""
    return {"version": OLLAMA_VERSION}
