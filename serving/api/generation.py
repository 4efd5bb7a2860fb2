"""From a validated OpenAI request to engine streams: tokenization, limits, sampling parameters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from serving.api.errors import APIError, bad_request
from serving.api.grammar_check import GrammarBusy
from serving.api.schemas import ChatCompletionRequest, CompletionRequest, _Request
from serving.api.state import AppState
from serving.api.tools import forced_schema
from serving.engine.async_engine import (
    EngineInternalError,
    EngineStoppedError,
    EngineStream,
    QueueFullError,
    SlowReaderError,
)
from serving.engine.grammar import JSON_OBJECT, GrammarError, GrammarSpec, choice_spec, json_schema_spec
from serving.engine.output_processor import ChoiceDelta
from serving.engine.protocol import RequestRejected
from serving.engine.sampling_params import SamplingParams

RETRY_AFTER_SECONDS = 1


@dataclass(slots=True)
class Prompt:
    token_ids: list[int]
    text: str  # for echo; empty for token-id prompts that are not echoed
    # Tokens the tokenizer put before a text prompt (a BOS): not the client's, so echo does not show them.
    added: int = 0
    # An echoed text prompt's own characters, one string per token after the added ones (a character split
    # over several tokens is the last one's): what echo's logprobs show, joining into the text exactly.
    pieces: list[str] | None = None


def _text_pieces(tokenizer: Any, text: str, ids: list[int]) -> tuple[int, list[str]] | None:
    """(added, pieces) from a fast tokenizer's character offsets, or None where it gives none (a slow
    tokenizer) or they are not of these ids. A token the tokenizer added spans nothing (0, 0): a BOS is
    one, a "<s>" the text spells is not."""
    if not getattr(tokenizer, "is_fast", False):  # only fast tokenizers map tokens to characters
        return None
    encoded = tokenizer(text, return_offsets_mapping=True)
    offsets = encoded.get("offset_mapping")
    if offsets is None or list(encoded["input_ids"]) != ids:
        return None
    special = set(tokenizer.all_special_ids)
    added = 0
    while added < len(ids) and ids[added] in special and tuple(offsets[added]) == (0, 0):
        added += 1
    pieces, start = [], 0
    for i in range(added, len(ids)):
        end = offsets[i][1]
        if i + 1 < len(ids) and offsets[i + 1][1] == end and end > offsets[i + 1][0]:
            pieces.append("")  # the next token ends the same character: it completes it
            continue
        pieces.append(text[start:end] if end > start else "")
        start = max(start, end)
    if pieces and start < len(text):
        pieces[-1] += text[start:]
    return added, pieces


def _added_ahead(tokenizer: Any, ids: list[int], text: str) -> int:
    """How many of ids' first tokens are special ones that the text does not spell out."""
    special = set(tokenizer.all_special_ids)
    added = 0
    while added < len(ids) and ids[added] in special and not text.startswith(tokenizer.convert_ids_to_tokens(ids[added])):
        added += 1
    return added


def context_length_exceeded(limit: int, tokens: str, param: str, why: str = "") -> APIError:
    """The 400 for a prompt beyond the context (clients know it by "maximum context length")."""
    verb = "have" if param == "messages" else "has"
    return bad_request(
        f"This model's maximum context length is {limit} tokens. However, your {param} {verb} {tokens} tokens"
        f"{f' ({why})' if why else ''}. Please reduce the length of the {param}.",
        param=param,
        code="context_length_exceeded",
    )


# A text longer than this many characters per token of the context is first counted a part at a time.
PROBE_CHARS_PER_TOKEN = 8
PROBE_MARGIN = 16  # tokens a part may count beyond the whole's first ones, where it was cut


def _part_holding(tokenizer: Any, text: str, count: int, **kwargs: Any) -> str | None:
    """A first part of text that already holds more than `count` tokens (its first ones are the whole's), or
    None where no part shorter than the text does. Parts grow fourfold, so a text of unusually long tokens
    costs at most a third more than tokenizing it once."""
    probe = PROBE_CHARS_PER_TOKEN * count
    while probe < len(text):
        cut = text.rfind(" ", probe // 2, probe)  # before a word: the part's tokens are the whole's first ones
        part = text[: cut if cut > 0 else probe]
        if len(tokenizer(part, **kwargs).input_ids) > count + PROBE_MARGIN:
            return part
        probe *= 4
    return None


def tokenize_within(tokenizer: Any, text: str, limit: int, too_long: APIError, **kwargs: Any) -> list[int]:
    """text's token ids, unless a first part of it already holds more than `limit` tokens: then `too_long`,
    without tokenizing the rest (a 30 MB prompt took a worker thread minutes to be told it was too long,
    while other requests queued for the thread)."""
    if _part_holding(tokenizer, text, limit, **kwargs) is not None:
        raise too_long
    return tokenizer(text, **kwargs).input_ids


def first_tokens(tokenizer: Any, text: str, count: int) -> list[int]:
    """The text's first `count` tokens, special ones the tokenizer adds included (an EOS an embedding model
    appends stays last), from as much of the text as holds them: a 30 MB document is not tokenized whole
    to keep its first thousand tokens."""
    part = _part_holding(tokenizer, text, count)
    return tokenizer(text if part is None else part, truncation=True, max_length=count).input_ids


def check_vocabulary(state: AppState, ids: list[int], param: str, code: str | None = None) -> None:
    """Token ids the client gave are the model's: a 400 naming the first that is not."""
    assert state.model is not None
    vocab = state.model.vocab_size
    if bad := [t for t in ids if t >= vocab]:
        raise bad_request(f"token id {bad[0]} is out of the vocabulary (size {vocab})", param=param, code=code)


def encode_completion_prompt(state: AppState, prompt: str | list[int], echo: bool, param: str = "prompt") -> Prompt:
    """A prompt (text or token ids) as the engine takes it; `param` names it in errors."""
    assert state.model is not None
    tokenizer = state.model.tokenizer
    if isinstance(prompt, str):
        limit = state.model.max_model_len
        ids = tokenize_within(tokenizer, prompt, limit, context_length_exceeded(limit, f"more than {limit}", param))
        if not echo:
            return Prompt(ids, prompt)
        if (spans := _text_pieces(tokenizer, prompt, ids)) is not None:
            return Prompt(ids, prompt, *spans)
        return Prompt(ids, prompt, _added_ahead(tokenizer, ids, prompt))
    check_vocabulary(state, prompt, param)
    return Prompt(list(prompt), tokenizer.decode(prompt) if echo else "")


def encode_chat(state: AppState, req: ChatCompletionRequest, param: str = "messages") -> Prompt:
    """The messages through the chat template, as token ids; `param` names them in a context overflow."""
    assert state.model is not None
    text, limit = render_chat(state, req), state.model.max_model_len
    too_long = context_length_exceeded(limit, f"more than {limit}", param)
    return Prompt(tokenize_within(state.model.tokenizer, text, limit, too_long, add_special_tokens=False), text)


def render_chat(state: AppState, req: ChatCompletionRequest) -> str:
    """The messages (and tools) through the chat template, as text."""
    assert state.model is not None
    tokenizer = state.model.tokenizer
    if not tokenizer.chat_template:
        raise bad_request(
            "This model has no chat template to format messages with: "
            "use /v1/completions, or start the server with --chat-template",
            param="messages",
            code="chat_template_missing",
        )
    messages = [m.for_template() for m in req.messages]
    variables = {**effort_variables(tokenizer, req.reasoning_effort), **(req.chat_template_kwargs or {})}
    try:
        tools = [{"type": "function", "function": f} for f in req.tool_functions()] if req.tool_mode != "none" else None
        return tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            **variables,
        )
    except (TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        # The template renders the client's messages: whatever it fails on in them (an undefined field
        # passed to tojson, a mapping where it wants a list) is the request's fault, a 400.
        raise bad_request(f"the chat template rejected these messages: {type(exc).__name__}: {exc}", param="messages") from exc


def effort_variables(tokenizer: Any, effort: str | None) -> dict[str, Any]:
    """reasoning_effort as the chat template's variables: itself where the template reads reasoning_effort
    (gpt-oss's), and enable_thinking (false for none) where it reads that (Qwen3's); none where it reads
    neither (check_effort refuses it then)."""
    if effort is None:
        return {}
    template = tokenizer.chat_template
    source = " ".join(template.values()) if isinstance(template, dict) else template or ""
    variables: dict[str, Any] = {}
    if "reasoning_effort" in source:
        variables["reasoning_effort"] = effort
    if "enable_thinking" in source:
        variables["enable_thinking"] = effort != "none"
    return variables


def check_effort(state: AppState, req: ChatCompletionRequest, param: str = "reasoning_effort") -> None:
    """A reasoning_effort the chat template would not read changes nothing: refused, not ignored."""
    assert state.model is not None
    if req.reasoning_effort is not None and not effort_variables(state.model.tokenizer, req.reasoning_effort):
        raise bad_request(
            "this model's chat template reads neither reasoning_effort nor enable_thinking: reasoning_effort would change nothing",
            param=param,
        )


def completion_budget(state: AppState, req: _Request, requested: int | None, explicit: bool, prompt: Prompt, param: str) -> int:
    """max_tokens after checking prompt + completion against the context length."""
    assert state.model is not None
    limit = state.model.max_model_len
    used = len(prompt.token_ids)
    room = limit - used
    if requested is None or (not explicit and requested > room):
        requested = room  # an unspecified limit fills the context, like vLLM
    if room < 1 or used + requested > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{used + max(requested, 1)} tokens ({used} in the {param}, {max(requested, 1)} for the completion). "
            "Please reduce the length of the prompt or completion.",
            param=param,
            code="context_length_exceeded",
        )
    if req.min_tokens > requested:
        raise bad_request(f"min_tokens ({req.min_tokens}) is larger than max_tokens ({requested})", param="min_tokens")
    return requested


GRAMMAR_COMPILE_TIMEOUT_S = 10.0


async def compile_grammar(state: AppState, req: _Request) -> GrammarSpec | None:
    """The request's response_format as a grammar, compiled once here (cached) so that a schema the
    grammar library refuses, or one that takes too long, is a 400 before any response starts."""
    constraint = req.constraint
    if isinstance(req, ChatCompletionRequest) and req.tool_mode == "auto":
        # Not constrained, but a tool whose parameters are not a usable JSON schema is refused all the same.
        schema = forced_schema(req.tool_functions(), "required", True)
        try:
            await state.grammar_check.compile(json_schema_spec(schema), GRAMMAR_COMPILE_TIMEOUT_S)
        except GrammarError as exc:
            raise bad_request(f"tools: a function's parameters are not a usable JSON schema: {exc}", param="tools") from exc
        except TimeoutError as exc:
            raise bad_request(
                f"tools: the functions' parameters took more than {GRAMMAR_COMPILE_TIMEOUT_S:g} s to compile as a grammar", param="tools"
            ) from exc
        except GrammarBusy as exc:
            raise grammars_busy() from exc
    if isinstance(req, ChatCompletionRequest) and req.forced_tools:
        constraint = ("tool_choice", "json_schema", forced_schema(req.tool_functions(), req.tool_mode, req.parallel_tool_calls is not False))
    if constraint is None:
        return None
    field, kind, value = constraint
    if kind == "json_object":
        spec = JSON_OBJECT
    elif kind == "json_schema":
        spec = json_schema_spec(value)
    elif kind == "regex":
        spec = ("regex", value)
    else:
        spec = choice_spec(value)
    try:
        await state.grammar_check.compile(spec, GRAMMAR_COMPILE_TIMEOUT_S)
    except GrammarError as exc:
        raise bad_request(f"{field}: the {kind} cannot be used: {exc}", param=field) from exc
    except TimeoutError as exc:
        raise bad_request(f"{field}: the {kind} took more than {GRAMMAR_COMPILE_TIMEOUT_S:g} s to compile", param=field) from exc
    except GrammarBusy as exc:
        raise grammars_busy() from exc
    return spec


def grammars_busy() -> APIError:
    """Other grammars held every compile slot for the whole timeout: the server's state, not the request's
    fault, so a 503 to retry (the openai client does), not a 400."""
    return APIError(
        503,
        f"the server is busy compiling other requests' grammars; retry in {RETRY_AFTER_SECONDS} s",
        type="server_error",
        code="grammar_compiler_busy",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def sampling_params(
    state: AppState,
    req: _Request,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: bool,
    grammar: GrammarSpec | None = None,
    think: tuple[int, int, bool] | None = None,
) -> SamplingParams:
    assert state.model is not None
    bias = tuple((int(k), v) for k, v in (req.logit_bias or {}).items())
    for param, ids in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", req.stop_token_ids or [])):
        check_vocabulary(state, ids, param, code="invalid_value")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty if req.repeat_last_n != 0 else 1.0,
        repetition_window=max(req.repeat_last_n, 0),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        stop=tuple(req.stop or ()),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        seed=req.seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logit_bias=bias,
        grammar=grammar,
        think=think,
        adapter=state.model.adapter_id(req.model) or 0,
    )


def check_n(state: AppState, req: CompletionRequest | ChatCompletionRequest, prompts: int) -> None:
    """A prompt's choices (n, or best_of) are at most --max-batch-size, as the served OpenAPI document says;
    a request's sequences over all its prompts queue like any others, so at most what can ever be let in at
    once: a full batch plus a full queue (more would be a 429 however long the client waited)."""
    assert state.model is not None
    each = getattr(req, "candidates", req.n)  # sequences per prompt: best_of where given
    field = "best_of" if getattr(req, "best_of", None) else "n"
    if each > state.config.max_batch_size:
        raise bad_request(
            f"{field}={each}: this server decodes at most {state.config.max_batch_size} sequences together "
            "(--max-batch-size)",
            param=field,
        )
    if each * prompts > state.most_sequences:
        asked = f"{field}={each} over {prompts} prompts asks for {each * prompts} sequences"
        raise too_many_sequences(state, asked, field if each > 1 else "prompt")


def too_many_sequences(state: AppState, asked: str, param: str) -> APIError:
    return bad_request(
        f"{asked}; this server takes at most {state.most_sequences} from one request (--max-batch-size decoding "
        "plus --queue-capacity waiting)",
        param=param,
    )


def queue_full(message: str) -> APIError:
    """The one 429 for a full queue, whether the API sees it up front or the engine on arrival."""
    return APIError(
        429, message, type="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
    )


def admit(state: AppState, sequences: int) -> None:
    """Refuse up front when the queue is full, before any response headers are sent."""
    engine = state.engine
    assert engine is not None
    if not engine.healthy:
        raise APIError(503, "the engine is not running", type="service_unavailable", code="engine_stopped")
    if engine.would_wait(sequences) > engine.queue_capacity:
        raise queue_full(
            f"The server is overloaded: {engine.num_waiting} sequences are waiting (queue capacity "
            f"{engine.queue_capacity}). Retry shortly."
        )


def stream_choices(
    state: AppState, request_id: str, prompts: list[Prompt], params: SamplingParams, n: int
) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    """(choice index, delta) for every choice of every prompt; choice = prompt_index * n + i.

    Every prompt's sequences are submitted now, before the caller answers anything: a full queue is a
    429 here, never an error inside a stream that has already said 200 (as it would be were they sent
    when the stream is first read, after other requests were let in meanwhile)."""
    engine = state.engine
    assert engine is not None
    streams: list[EngineStream] = []
    try:
        for i, prompt in enumerate(prompts):
            engine_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            streams.append(engine.submit(engine_id, prompt.token_ids, params, n))
    except Exception as exc:
        for stream in streams:
            stream.close()
        raise engine_api_error(exc) from exc
    return _read_choices(streams, n)


def engine_api_error(exc: Exception) -> Exception:
    """The client's answer to an engine stream's failure (other exceptions pass as they are)."""
    if isinstance(exc, QueueFullError):
        return queue_full(str(exc))
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc), type="service_unavailable", code=exc.code)
    if isinstance(exc, SlowReaderError):
        return APIError(408, str(exc), type="timeout_error", code="slow_reader")
    if isinstance(exc, RequestRejected):  # the engine refused the request itself
        return bad_request(str(exc))
    if isinstance(exc, EngineInternalError):
        return APIError(500, "the engine failed to take the request", type="internal_error", code="engine_error")
    return exc


async def _read_choices(streams: list[EngineStream], n: int) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    try:
        if len(streams) == 1:
            async with aclosing(streams[0].deltas()) as deltas:
                async for delta in deltas:
                    yield delta.index, delta
            return
        async with aclosing(_merged(streams, n)) as merged:
            async for item in merged:
                yield item
    except Exception as exc:
        error = engine_api_error(exc)
        if error is exc:
            raise
        raise error from exc
    finally:
        for stream in streams:  # a departed client's (or a failed one's): abort what is left
            stream.close()


async def _merged(streams: list[EngineStream], n: int) -> AsyncIterator[tuple[int, ChoiceDelta]]:
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: EngineStream) -> None:
        try:
            async with aclosing(stream.deltas()) as deltas:
                async for delta in deltas:
                    await queue.put((i * n + delta.index, delta))
            await queue.put(done)
        except Exception as exc:
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()  # closes the engine streams of a departed client
        await asyncio.gather(*tasks, return_exceptions=True)
