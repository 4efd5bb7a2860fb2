"""The OpenAI endpoints: /v1/completions, /v1/chat/completions, /v1/responses, /v1/models, plus /tokenize and
/detokenize."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import math
import re
import sys
import time
import uuid
import zlib
from array import array
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import Blueprint, Response, current_app, g, request

from serving.api import reasoning
from serving.api.errors import APIError, bad_request, from_validation_error
from serving.api.formats import ChatFormat, Choice, CompletionFormat, Format
from serving.api.generation import (
    Prompt,
    admit,
    check_effort,
    check_n,
    compile_grammar,
    completion_budget,
    context_length_exceeded,
    encode_chat,
    encode_completion_prompt,
    first_tokens,
    render_chat,
    sampling_params,
    stream_choices,
    tokenize_within,
    too_many_sequences,
)
from serving.api.messages_api import (
    MESSAGES_PATH,
    AnthropicErrorResponse,
    CountTokensRequest,
    CountTokensResponse,
    MessageEvent,
    MessageObject,
    MessageShaper,
    MessagesRequest,
)
from serving.api.messages_api import error_body as messages_error_body
from serving.api.openapi import GENERATION_ERRORS, documented
from serving.api.response_api import ResponseShaper, response_usage
from serving.api.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    DetokenizeResponse,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    ResponseEvent,
    ResponseObject,
    TokenizeResponse,
)
from serving.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ResponsesRequest,
    TokenizeRequest,
    _Request,
)
from serving.api.state import AppState
from serving.api.tracking import RequestTracker
from serving.engine.grammar import GrammarSpec
from serving.engine.output_processor import ChoiceDelta
from serving.engine.sampling_params import SamplingParams

bp = Blueprint("openai", __name__)
M = TypeVar("M", bound=BaseModel)


def state() -> AppState:
    return current_app.extensions["fleetlm"]


def _parse_int(digits: str) -> int | float:
    return int(digits) if len(digits) <= 40 else float(digits)


def _lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _surrogate_path(data: object) -> str | None:
    """The path of a string (key or value) holding a lone UTF-16 surrogate (JSON's "\\ud800" escape
    parses to one; no tokenizer can encode it), or None. Iterative: the body may nest as deep as the JSON
    parser allows. A path is made only for what can hold a string: a list of 15M token ids is one loop of
    type checks, not 15M paths."""
    stack: list[tuple[object, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if _lone_surrogate(key) or (type(item) is str and _lone_surrogate(item)):
                    return where
                if type(item) is dict or type(item) is list:
                    stack.append((item, where))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                kind = type(item)
                if kind is str and _lone_surrogate(item):
                    return f"{path}[{i}]"
                if kind is dict or kind is list:
                    stack.append((item, f"{path}[{i}]"))
        elif isinstance(value, str) and _lone_surrogate(value):
            return path or "body"
    return None


# A JSON escape of a lone UTF-16 surrogate: a high half not followed by a low one, or a low half not after
# a high one (a pair, which json.loads joins into one character, is fine).
_HIGH, _LOW = rb"\\u[dD][89abAB][0-9a-fA-F]{2}", rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_LONE_SURROGATE_ESCAPE = re.compile(_HIGH + rb"(?!" + _LOW + rb")|(?<!" + _HIGH + rb")" + _LOW)


def _loads(text: str) -> Any:
    """json.loads, and where an integer is too long for int() (Python converts at most 4300 digits) once
    more with such integers as floats (inf), which the field's validation then refuses by name. The
    per-integer callback only then: on every integer it made a 16M-int body take 4 s instead of 1.

    The cyclic garbage collector is paused while it parses: a parse makes no cycles, yet each of its
    lists and objects counts toward the collector's next pass, and a 24 MB body of 6M one-id prompts
    set off passes over everything parsed so far (3.0 s on the event loop; 1.0 s paused)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return json.loads(text)
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError) or "digits" not in str(exc):
            raise
        return json.loads(text, parse_int=_parse_int)
    finally:
        if paused:
            gc.enable()


def _fits(data: dict[str, Any]) -> None:
    """What a generation body asks for that cannot fit is refused before validation, which would check
    every item first, on the event loop, only to have the request refused by size after (9 s for a body
    of 16M prompt ids, or of 3M prompts; 6 s for a logit_bias of 1M tokens, or 300k messages)."""
    st = state()
    if st.model is None:
        return
    limit = st.model.max_model_len
    _prompts_fit(st, data.get("prompt"), "prompt", limit - 1)  # and room for a token to generate
    for field in ("messages", "input"):  # every message or item, and each part of one, is at least a token
        items = data.get(field)
        if not isinstance(items, list):
            continue
        count = len(items) + sum(len(m["content"]) for m in items if isinstance(m, dict) and isinstance(m.get("content"), list))
        if count > limit:
            raise context_length_exceeded(limit, f"more than {limit}", field, f"{count} items and content parts")
    bias = data.get("logit_bias")
    if isinstance(bias, dict) and len(bias) > st.model.vocab_size:
        raise bad_request(
            f"logit_bias has {len(bias)} entries; this model has {st.model.vocab_size} tokens", param="logit_bias"
        )


def _prompts_fit(st: AppState, prompts: Any, param: str, longest_allowed: int) -> None:
    """A list of prompts (texts or token id lists) no longer than one request may hold, and no token id list
    longer than `longest_allowed`: checked on the raw body, before validation looks at every item."""
    assert st.model is not None
    if not isinstance(prompts, list) or not prompts:
        return
    several = isinstance(prompts[0], (str, list))
    if several and len(prompts) > st.most_sequences:
        raise too_many_sequences(st, f"{len(prompts)} {param}s ask for at least as many sequences", param)
    lengths = [len(p) for p in prompts if isinstance(p, list)] if several else [len(prompts)]
    longest = max(lengths, default=0)
    if longest > longest_allowed:
        raise context_length_exceeded(st.model.max_model_len, str(longest), param)


def _embedding_inputs_fit(data: dict[str, Any]) -> None:
    """_fits for /v1/embeddings: its inputs are prompts that generate nothing, so they may fill the context."""
    st = state()
    if st.model is not None:  # with truncate_prompt_tokens an input may hold more than the context: it is cut
        longest = 2**62 if data.get("truncate_prompt_tokens") is not None else st.model.max_model_len
        _prompts_fit(st, data.get("input"), "input", longest)


def _tokens_fit(data: dict[str, Any]) -> None:
    """More token ids than the context holds are not this model's text: refused before each is validated."""
    st, tokens = state(), data.get("tokens")
    if st.model is not None and isinstance(tokens, list) and len(tokens) > st.model.max_model_len:
        raise bad_request(
            f"{len(tokens)} tokens are more than this model's context of {st.model.max_model_len}", param="tokens"
        )


async def parse_body(model: type[M], precheck: Callable[[dict[str, Any]], None] | None = None) -> M:
    """The body as `model`, or an APIError (400, naming the field where it can). `precheck` sees the
    parsed JSON object first, to refuse what validation would only spend time on."""
    raw = await request.get_data()
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        # The client left as its body arrived: quart cancelled this handler inside get_data, whose
        # wait_for on an already complete body swallows a cancel on Python 3.11. Unnoticed, the request
        # ran to its last token for nobody, each SSE event written to a dead socket.
        raise asyncio.CancelledError
    if encoding := request.headers.get("Content-Encoding"):
        raw = decoded_body(raw, encoding, current_app.config["MAX_CONTENT_LENGTH"])
    # Bytes that are not UTF-8 become lone surrogates here (surrogateescape), so that, like a
    # "\\ud800" escape, they are reported with the field that holds them.
    try:
        text, clean = (raw.decode("utf-8"), True) if raw else ("null", True)
    except UnicodeDecodeError:
        text, clean = raw.decode("utf-8", errors="surrogateescape"), False
    try:
        data = _loads(text)
    except RecursionError as exc:
        raise bad_request("The JSON body nests too deeply to parse.") from exc
    except ValueError as exc:  # JSONDecodeError is one
        raise bad_request(f"We could not parse the JSON body of your request: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    if precheck is not None:
        precheck(data)
    # Only bytes that are not UTF-8 or a lone surrogate's escape can make one: the walk of the values is for
    # bodies that hold either.
    if (not clean or _LONE_SURROGATE_ESCAPE.search(raw)) and (where := _surrogate_path(data)) is not None:
        raise bad_request(
            f"'{where}' holds bytes that are not UTF-8 or a lone UTF-16 surrogate, which is not a character.",
            param=where,
        )
    try:
        # Strictly: a JSON true is not the integer 1, nor "yes" or 1 a boolean, as the documented
        # schema says (an integral float is an integer all the same: schemas.INTEGRAL).
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decoded_body(raw: bytes, content_encoding: str, limit: int) -> bytes:
    """A body sent compressed (Content-Encoding gzip or deflate, as HTTP clients and proxies may send it),
    decompressed up to `limit` bytes (the uncompressed body has the size limit of any other: a 413). An
    encoding we cannot undo is a 415, never the JSON parse error of its compressed bytes."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    for coding in reversed(codings):  # listed in the order they were applied
        if coding == "identity":
            continue
        if coding not in _WBITS:
            raise APIError(
                415,
                f"Content-Encoding {coding!r} is not supported: send the body as it is, or gzip or deflate it.",
                code="unsupported_content_encoding",
            )
        wbits = _WBITS[coding]
        if coding == "deflate" and not (len(raw) >= 2 and raw[0] & 0x0F == 8 and int.from_bytes(raw[:2]) % 31 == 0):
            wbits = -zlib.MAX_WBITS  # deflate without its zlib wrapper, as some clients send it
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(raw, limit + 1)
        except zlib.error as exc:
            raise bad_request(f"The body is not valid {coding} data: {exc}") from exc
        if len(out) > limit:
            raise APIError(413, f"The decompressed body is larger than {limit} bytes.", code="request_too_large")
        if not inflater.eof:
            raise bad_request(f"The {coding} body ends before its compressed data does.")
        raw = out
    return raw


def _engine_key(request_id: str) -> str:
    """The engine's name for a request: unique even when clients send one X-Request-Id twice."""
    return f"{request_id}#{uuid.uuid4().hex[:12]}"


def thinking_from(st: AppState, prompt: Prompt, grammar: GrammarSpec | None) -> bool | None:
    """Whether a chat reply's <think> block is split off (None: not), and if so whether the prompt opened it.
    A constrained reply (response_format, a forced tool call) thinks first too where the tags are tokens of
    their own: the engine holds its grammar after the block (SamplingParams.think); where they are not, the
    grammar holds from the first token, and all of the reply is content."""
    assert st.model is not None
    if not st.model.reasoning or (grammar is not None and st.model.think_ids is None):
        return None
    return reasoning.opened_by_prompt(prompt.text)


def think_param(st: AppState, grammar: GrammarSpec | None, thinking: bool | None) -> tuple[int, int, bool] | None:
    """SamplingParams.think: for a constrained reply that may think first (thinking_from)."""
    assert st.model is not None
    if grammar is None or thinking is None or st.model.think_ids is None:
        return None
    return (*st.model.think_ids, thinking)


def check_model(st: AppState, name: str | None) -> None:
    assert st.model is not None
    if st.model.adapter_id(name) is None:
        raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")


def check_generates(st: AppState) -> None:
    """An embedding model's checkpoint has no output projection: generation is refused, not made up."""
    assert st.model is not None
    if not st.model.info.generates:
        raise bad_request(
            f"The model `{st.model.name}` serves embeddings only (its checkpoint has no output projection): use /v1/embeddings",
            param="model",
            code="embeddings_only",
        )


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def raise_if_failed(delta: ChoiceDelta) -> None:
    if delta.error is not None:
        raise APIError(500, f"generation failed: {delta.error}", type="internal_error", code="engine_error")


def usage(prompts: list[Prompt], tracker: RequestTracker, n: int) -> dict[str, Any]:
    """OpenAI's usage object. Each prompt counts once, however many choices it has; so do its cached
    tokens, which are its first choice's (the others share that choice's blocks)."""
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    cached = sum(tracker.cached_tokens.get(i * n, 0) for i in range(len(prompts)))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": tracker.completion_tokens,
        "total_tokens": prompt_tokens + tracker.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def run_tracked(
    tracker: RequestTracker, stream: AsyncIterator[tuple[int, ChoiceDelta]]
) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """Pass deltas through, recording tokens and finish reasons on the tracker."""
    async with aclosing(stream):
        async for index, delta in stream:
            raise_if_failed(delta)
            tracker.cached_tokens.setdefault(index, delta.cached_tokens)
            if delta.num_tokens:
                tracker.token_arrived()
                tracker.completion_tokens += delta.num_tokens
            if delta.finish_reason:
                tracker.finish_reasons.append(delta.finish_reason)
            yield index, delta


def streaming_response(
    tracker: RequestTracker,
    events: AsyncIterator[str],
    error_event: Callable[[APIError], str] = lambda exc: sse(exc.body()),
    done: str | None = "data: [DONE]\n\n",
) -> Response:
    """SSE over `events`; closing it (a client that went away) closes the engine stream at once.
    The stream owns the request's tracker from here: it closes it when the body ends. A failure
    is sent as `error_event` says, and `done` closes the stream."""
    tracker.streaming = True

    async def body() -> AsyncIterator[str]:
        status, error = 200, None
        try:
            async with aclosing(events):
                async for event in events:
                    yield event
        except APIError as exc:
            status, error = exc.status, exc.message
            yield error_event(exc)
        except Exception as exc:  # noqa: BLE001 - mid-stream, the error must reach the client as an event
            status, error = 500, f"{type(exc).__name__}: {exc}"
            yield error_event(APIError(500, error, type="internal_error"))
        except BaseException:  # the client went away (the generator was closed or cancelled)
            status, error = 499, "client disconnected"
            raise
        finally:
            tracker.close(status, error)
        if done is not None:
            yield done

    response = Response(body(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx and friends: do not buffer the stream
    response.timeout = None
    return response


def submitted(
    st: AppState, prompts: list[Prompt], params: SamplingParams, n: int, engine_id: str
) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """Admit the request's n sequences per prompt and run them: their deltas, counted by the request's tracker
    (opened by the app for every generation request) from their prompts' tokens on."""
    admit(st, n * len(prompts))
    tracker: RequestTracker = g.tracker
    tracker.prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return run_tracked(tracker, stream_choices(st, _engine_key(engine_id), prompts, params, n))


async def generate(
    st: AppState, req: _Request, prompts: list[Prompt], params: SamplingParams, fmt: Format
) -> Response | dict[str, Any]:
    """The one generation path of both endpoints: admit, run the engine, shape the output with
    `fmt`, streamed or whole. The request's tracker (opened by the app for every generation
    request) is closed by the app on any error or a whole response, and by the stream otherwise."""
    n = getattr(req, "candidates", req.n)  # best_of, of which req.n are returned
    request_id = f"{fmt.id_prefix}-{g.request_id}"  # the OpenAI id carries the X-Request-Id
    created = int(time.time())
    deltas = submitted(st, prompts, params, n, request_id)
    tracker: RequestTracker = g.tracker
    head = {"id": request_id, "object": fmt.chunk_object, "created": created, "model": req.model}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def event(choices: list[dict[str, Any]], usage_: dict[str, Any] | None = None) -> str:
            return sse({**head, "choices": choices, **({"usage": usage_} if include_usage else {})})

        async def events() -> AsyncIterator[str]:
            if n > req.n:  # best_of: which choices are sent is known once all have ended; each then comes whole
                for choice in await _collected(deltas, fmt, len(prompts), n, req.n):
                    yield event([choice])
            else:
                for choice in fmt.opening():
                    yield event([choice])
                async with aclosing(deltas):
                    async for index, delta in deltas:
                        for choice in fmt.streamed(index, delta):
                            yield event([choice])
            if include_usage:
                yield event([], {**usage(prompts, tracker, n), **fmt.usage_details()})

        return streaming_response(tracker, events())

    choices = await _collected(deltas, fmt, len(prompts), n, req.n)
    return {**head, "object": fmt.object, "choices": choices, "usage": {**usage(prompts, tracker, n), **fmt.usage_details()}}


async def _collected(
    deltas: AsyncIterator[tuple[int, ChoiceDelta]], fmt: Format, prompts: int, candidates: int, n: int
) -> list[dict[str, Any]]:
    """The finished choices of a whole response: of each prompt's `candidates`, the best `n`."""
    choices = {i: Choice() for i in range(candidates * prompts)}
    async with aclosing(deltas):
        async for index, delta in deltas:
            choices[index].add(delta)
    finished = [fmt.finished(i, c) for i, c in choices.items()]
    return _best(finished, list(choices.values()), candidates, n) if candidates > n else finished


def _best(finished: list[dict[str, Any]], choices: list[Choice], candidates: int, n: int) -> list[dict[str, Any]]:
    """best_of: of each prompt's `candidates` choices, the `n` with the highest mean logprob per token of
    their text (a choice without text last), numbered anew."""
    scores = [sum(e.logprob for e in c.logprobs) / len(c.logprobs) if c.logprobs else float("-inf") for c in choices]
    out = []
    for start in range(0, len(finished), candidates):
        ranked = sorted(range(start, start + candidates), key=scores.__getitem__, reverse=True)[:n]
        for i in sorted(ranked):  # in the order they were generated
            out.append({**finished[i], "index": len(out)})
    return out


@bp.post("/v1/completions")
@documented(CompletionRequest, CompletionResponse, GENERATION_ERRORS, streamed=CompletionChunk)
async def completions():
    """Text completion (OpenAI's legacy completions API)

    One prompt or a batch of prompts (text or token ids); n choices each; echo and logprobs of
    the prompt; stream with server-sent events. vLLM's sampling extensions (top_k, min_p,
    repetition_penalty, stop_token_ids, ignore_eos, min_tokens) are accepted too.
    """
    st = state()
    req = await parse_body(CompletionRequest, _fits)
    prompts, params, fmt = await completion_generation(st, req)
    return await generate(st, req, prompts, params, fmt)


async def completion_generation(st: AppState, req: CompletionRequest) -> tuple[list[Prompt], SamplingParams, CompletionFormat]:
    """What a completion request generates: its prompts, their sampling and the output's format (checked)."""
    check_model(st, req.model)
    check_generates(st)
    raw_prompts = req.prompts()
    check_n(st, req, len(raw_prompts))
    prompts = [await st.run_blocking(encode_completion_prompt, st, p, req.echo) for p in raw_prompts]
    explicit = "max_tokens" in req.model_fields_set
    budgets = [completion_budget(st, req, req.max_tokens, explicit, p, "prompt") for p in prompts]
    fmt = CompletionFormat(st, prompts, req.candidates, req.echo, req.logprobs)
    if req.logprobs is not None:
        await st.run_blocking(st.grammars.token_bytes)  # the tokens' bytes, read once, off the event loop
    grammar = await compile_grammar(st, req)
    # best_of ranks its choices by their tokens' logprobs: the sampled token's is wanted even when not shown.
    scored = req.logprobs if req.candidates == req.n else (req.logprobs or 0)
    return prompts, sampling_params(st, req, min(budgets), scored, fmt.prompt_logprobs, grammar), fmt


@bp.post("/v1/chat/completions")
@documented(ChatCompletionRequest, ChatCompletionResponse, GENERATION_ERRORS, streamed=ChatCompletionChunk)
async def chat_completions():
    """Chat completion

    Messages are formatted with the model's chat template (or --chat-template); n choices,
    logprobs and top_logprobs, streaming with server-sent events.
    """
    st = state()
    req = await parse_body(ChatCompletionRequest, _fits)
    prompts, params, fmt = await chat_generation(st, req)
    return await generate(st, req, prompts, params, fmt)


async def chat_generation(
    st: AppState, req: ChatCompletionRequest, param: str = "messages"
) -> tuple[list[Prompt], SamplingParams, ChatFormat]:
    """What a chat request generates: its prompt, its sampling and the output's format (checked). `param`
    names the messages in errors."""
    check_model(st, req.model)
    check_generates(st)
    check_n(st, req, 1)
    check_effort(st, req)
    prompt = await st.run_blocking(encode_chat, st, req, param)
    explicit = req.completion_limit is not None
    max_tokens = completion_budget(st, req, req.completion_limit, explicit, prompt, param)
    top = (req.top_logprobs or 0) if req.logprobs else None
    if req.logprobs:
        await st.run_blocking(st.grammars.token_bytes)  # the tokens' bytes, read once, off the event loop
    grammar = await compile_grammar(st, req)
    thinking = thinking_from(st, prompt, grammar)
    params = sampling_params(st, req, max_tokens, top, False, grammar, think_param(st, grammar, thinking))
    fmt = ChatFormat(
        st, req.n, bool(req.logprobs), req.tool_functions(), req.tool_mode, req.parallel_tool_calls is not False, req.echoed,
        thinking, req.include_reasoning,
    )  # fmt: skip
    return [prompt], params, fmt


@bp.post("/v1/responses")
@documented(ResponsesRequest, ResponseObject, GENERATION_ERRORS, streamed=ResponseEvent)
async def responses():
    """Response (OpenAI's Responses API)

    The input (a string, or message, function_call and function_call_output items) and the
    instructions are generated as a chat completion: the chat template, tools and tool_choice,
    text.format (JSON modes), streaming as typed events. Nothing is stored: previous_response_id
    and conversation are refused.
    """
    st = state()
    req = await parse_body(ResponsesRequest, _fits)
    check_model(st, req.model)
    check_generates(st)
    chat = _as_chat(req.chat_body())
    check_effort(st, chat, "reasoning")
    response_id = f"resp_{uuid.uuid4().hex}"
    prompt, thinking, deltas, _ = await _generate_as_chat(st, chat, "input", response_id)
    assert st.model is not None
    shaper = ResponseShaper(req, chat, st.config.tool_call_parser, response_id, int(time.time()), thinking, st.model.think_ids)
    tracker: RequestTracker = g.tracker

    if req.stream:

        async def events() -> AsyncIterator[str]:
            for opening in shaper.opening():
                yield typed_sse(opening)
            async with aclosing(deltas):
                async for _, delta in deltas:
                    for each in shaper.streamed(delta):
                        yield typed_sse(each)
            yield typed_sse(shaper.closing(response_usage(usage([prompt], tracker, 1))))

        return streaming_response(tracker, events(), lambda exc: typed_sse(shaper.error_event(exc.body())), done=None)

    whole = await _whole(deltas)
    return shaper.whole("".join(whole.text), whole.token_ids, whole.finish_reason, response_usage(usage([prompt], tracker, 1)))


@bp.post(MESSAGES_PATH)
@documented(MessagesRequest, MessageObject, GENERATION_ERRORS, streamed=MessageEvent, error=AnthropicErrorResponse)
async def messages():
    """Message (Anthropic's Messages API)

    What the anthropic SDK sends, generated as the chat completion it amounts to: the system prompt,
    content blocks (text, tool_use, tool_result, thinking), tools and tool_choice, stop_sequences, a
    final assistant turn continued (prefill); streamed as Anthropic's events. Errors are Anthropic's
    error objects.
    """
    st = state()
    req = await parse_body(MessagesRequest, _fits)
    check_model(st, req.model)
    check_generates(st)
    chat = _as_chat(req.chat_body())
    message_id = f"msg_{g.request_id}"
    prompt, thinking, deltas, max_tokens = await _generate_as_chat(st, chat, "messages", message_id, bound=True)
    parallel = chat.parallel_tool_calls is not False
    shaper = MessageShaper(
        req, chat.tool_functions(), chat.tool_mode, parallel, st.config.tool_call_parser, message_id, thinking,
        window_bound=max_tokens < req.max_tokens,
    )  # fmt: skip
    tracker: RequestTracker = g.tracker

    if req.stream:

        async def events() -> AsyncIterator[str]:
            for each in shaper.opening(len(prompt.token_ids)):
                yield typed_sse(each)
            async with aclosing(deltas):
                async for _, delta in deltas:
                    for each in shaper.streamed(delta):
                        yield typed_sse(each)
            for each in shaper.closing(usage([prompt], tracker, 1)):
                yield typed_sse(each)

        return streaming_response(tracker, events(), lambda exc: typed_sse(messages_error_body(exc)), done=None)

    whole = await _whole(deltas)
    return shaper.whole("".join(whole.text), whole.finish_reason, whole.stop_string, usage([prompt], tracker, 1))


def _as_chat(body: dict[str, Any]) -> ChatCompletionRequest:
    """Another API's request as the chat completion it amounts to (a 400 where that is not valid)."""
    return as_request(ChatCompletionRequest, body)


def as_request(model: type[M], body: dict[str, Any]) -> M:
    """A body another API's request amounts to, validated as `model` strictly, as parse_body does (a 400)."""
    try:
        return model.model_validate(body, strict=True)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


async def _generate_as_chat(
    st: AppState, chat: ChatCompletionRequest, param: str, engine_id: str, bound: bool = False
) -> tuple[Prompt, bool | None, AsyncIterator[tuple[int, ChoiceDelta]], int]:
    """One choice of a chat request, submitted (the Responses and Messages APIs' path): its prompt, whether
    its think block is split off (thinking_from), its deltas and its max_tokens. `param` names the messages
    in errors. `bound`: a max_tokens beyond the context's room is a bound, cut to that room, not a 400."""
    prompt = await st.run_blocking(encode_chat, st, chat, param)
    limit = chat.completion_limit
    max_tokens = completion_budget(st, chat, limit, limit is not None and not bound, prompt, param)
    grammar = await compile_grammar(st, chat)
    thinking = thinking_from(st, prompt, grammar)
    params = sampling_params(st, chat, max_tokens, None, False, grammar, think_param(st, grammar, thinking))
    return prompt, thinking, submitted(st, [prompt], params, 1, engine_id), max_tokens


async def _whole(deltas: AsyncIterator[tuple[int, ChoiceDelta]]) -> Choice:
    """One choice's deltas, read to the end."""
    choice = Choice()
    async with aclosing(deltas):
        async for _, delta in deltas:
            choice.add(delta)
    return choice


def typed_sse(payload: dict[str, Any]) -> str:
    """A server-sent event named by its payload's type (the Responses and Messages APIs' streams)."""
    return f"event: {payload['type']}\n{sse(payload)}"


@bp.post(MESSAGES_PATH + "/count_tokens")
@documented(CountTokensRequest, CountTokensResponse, (400, 404, 413, 415), error=AnthropicErrorResponse)
async def count_message_tokens():
    """Tokens a message request's prompt holds (Anthropic's count_tokens), after the chat template"""
    st = state()
    req = await parse_body(CountTokensRequest, _fits)
    check_model(st, req.model)
    prompt = await st.run_blocking(encode_chat, st, _as_chat(req.chat_body()))
    return {"input_tokens": len(prompt.token_ids)}


@bp.post("/v1/embeddings")
@documented(EmbeddingRequest, EmbeddingResponse, GENERATION_ERRORS)
async def embeddings():
    """Embeddings of texts or token ids

    Each input's last token's final hidden state, L2-normalized (last-token pooling, what embedding
    models built on decoders such as Qwen3-Embedding and e5-mistral are trained for; any served model
    gives one). The inputs are prompts like any others: batched with generation, prefix-cached.
    """
    st = state()
    req = await parse_body(EmbeddingRequest, _embedding_inputs_fit)
    check_embedding(st, req.model, req.dimensions)
    if req.truncate_prompt_tokens == 0:
        raise bad_request("truncate_prompt_tokens must be -1 (the context) or at least 1", param="truncate_prompt_tokens")
    vectors = await embed(st, req.model, req.inputs(), req.truncate_prompt_tokens)
    data = [
        {"object": "embedding", "index": i, "embedding": encoded(vector, req.dimensions, req.encoding_format)}
        for i, vector in enumerate(vectors)
    ]
    tokens = g.tracker.prompt_tokens
    return {"object": "list", "data": data, "model": req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def check_embedding(st: AppState, model: str | None, dimensions: int | None) -> None:
    """An embedding request's model is served here, and has at least the dimensions asked for."""
    check_model(st, model)
    assert st.model is not None
    if dimensions is not None and dimensions > st.model.info.hidden_size:
        raise bad_request(f"dimensions ({dimensions}) exceeds this model's {st.model.info.hidden_size}", param="dimensions")


async def embed(st: AppState, model: str | None, inputs: list[str] | list[list[int]], truncate: int | None) -> list[bytes]:
    """Each input's embedding (float32 bytes, normalized), in order; the request's tracker counts their tokens."""
    assert st.model is not None
    if len(inputs) > st.most_sequences:
        raise too_many_sequences(st, f"{len(inputs)} inputs ask for as many sequences", "input")
    prompts = [await st.run_blocking(_embedding_prompt, st, text, truncate) for text in inputs]
    params = SamplingParams(max_tokens=1, embed=True, adapter=st.model.adapter_id(model) or 0)
    vectors: dict[int, bytes] = {}
    async with aclosing(submitted(st, prompts, params, 1, f"embd-{g.request_id}")) as deltas:
        async for index, delta in deltas:
            if delta.embedding is not None:
                vectors[index] = delta.embedding
    return [vectors[i] for i in range(len(prompts))]


def _embedding_prompt(st: AppState, text: str | list[int], truncate: int | None = None) -> Prompt:
    """An input's token ids, within the context (an embedding generates nothing: it may fill it), or its
    first `truncate` of them (-1: as many as the context holds)."""
    assert st.model is not None
    limit = st.model.max_model_len
    if truncate is not None:
        truncate = limit if truncate == -1 else min(truncate, limit)
        text = text[:truncate] if isinstance(text, list) else first_tokens(st.model.tokenizer, text, truncate)
    prompt = encode_completion_prompt(st, text, False, "input")
    if len(prompt.token_ids) > limit:
        raise context_length_exceeded(limit, str(len(prompt.token_ids)), "input")
    if not prompt.token_ids:
        raise bad_request("an input has no tokens", param="input")
    return prompt


def encoded(raw: bytes, dimensions: int | None, encoding_format: str) -> list[float] | str:
    """An engine embedding (float32 bytes, normalized) as the client asked: its first `dimensions`
    normalized again, as floats or base64 of little-endian float32 (what the openai SDK decodes)."""
    vector = array("f", raw)
    if dimensions is not None and dimensions < len(vector):
        del vector[dimensions:]
        norm = math.sqrt(math.fsum(x * x for x in vector)) or 1.0
        vector = array("f", (x / norm for x in vector))
    if encoding_format == "float":
        return vector.tolist()
    if sys.byteorder != "little":
        vector.byteswap()
    return base64.b64encode(vector.tobytes()).decode("ascii")


# -- models, tokenizer ----------------------------------------------------------------------


def model_card(st: AppState, name: str) -> dict[str, Any]:
    """The model, or one of its LoRA adapters (vLLM's card: `parent` the base model, `root` where it came from)."""
    assert st.model is not None
    card = {"id": name, "object": "model", "created": st.started, "owned_by": "fleetlm", "max_model_len": st.model.max_model_len}
    adapter = st.model.adapters.get(name)
    if adapter is not None:
        card.update(root=adapter.source, parent=st.model.name)
    return card


@bp.get("/v1/models")
@documented(None, ModelList)
async def list_models():
    """The served model, and its LoRA adapters"""
    st = state()
    assert st.model is not None
    return {"object": "list", "data": [model_card(st, name) for name in st.model.names]}


@bp.get("/v1/models/<path:name>")
@documented(None, ModelCard, (404,))
async def get_model(name: str):
    """One model, by name"""
    st = state()
    check_model(st, name)
    return model_card(st, name)


# A text far beyond the context is counted whole up to this many contexts: enough to say how much to cut,
# without a 30 MB text taking a worker thread for a minute (and the API gigabytes) to list its 20M ids.
TOKENIZE_CONTEXTS = 4


@bp.post("/tokenize")
@documented(TokenizeRequest, TokenizeResponse, (400, 404, 413, 415))
async def tokenize():
    """Token ids of a prompt, or of chat messages after the chat template"""
    st = state()
    req = await parse_body(TokenizeRequest)
    check_model(st, req.model)
    assert st.model is not None
    tokenizer, cap = st.model.tokenizer, TOKENIZE_CONTEXTS * st.model.max_model_len
    if req.prompt is not None:
        text, param, special = req.prompt, "prompt", req.add_special_tokens
    else:
        chat = ChatCompletionRequest(
            model=st.model.name,
            messages=req.messages or [],
            add_generation_prompt=req.add_generation_prompt,
            chat_template_kwargs=req.chat_template_kwargs,
        )
        text, param, special = await st.run_blocking(render_chat, st, chat), "messages", False
    too_long = bad_request(
        f"The {param} hold more than {cap} tokens: /tokenize counts up to {TOKENIZE_CONTEXTS} times this model's "
        f"maximum context length ({st.model.max_model_len} tokens).",
        param=param,
        code="context_length_exceeded",
    )
    ids = await st.run_blocking(tokenize_within, tokenizer, text, cap, too_long, add_special_tokens=special)
    return {"tokens": ids, "count": len(ids), "max_model_len": st.model.max_model_len}


@bp.post("/detokenize")
@documented(DetokenizeRequest, DetokenizeResponse, (400, 404, 413, 415))
async def detokenize():
    """Text of token ids"""
    st = state()
    req = await parse_body(DetokenizeRequest, _tokens_fit)
    check_model(st, req.model)
    assert st.model is not None
    vocab = st.model.vocab_size
    if any(t >= vocab for t in req.tokens):
        raise bad_request(f"token ids must be below the vocabulary size {vocab}", param="tokens")
    text = await st.run_blocking(st.model.tokenizer.decode, req.tokens, skip_special_tokens=req.skip_special_tokens)
    return {"prompt": text}
