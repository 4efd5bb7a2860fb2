"""/v1/messages: Anthropic's Messages API (what the `anthropic` SDK and tools built on it send, Claude Code
among them), generated as the chat completion it amounts to, as /v1/responses is.

A request becomes chat messages (the system prompt first; a user turn's tool_result blocks as tool
messages; an assistant turn's tool_use blocks as its tool calls and its thinking as reasoning_content; a
final assistant turn is continued, Anthropic's prefill), its tools and tool_choice the chat's, `thinking`
the template's enable_thinking. The reply's content blocks: a thinking model's reasoning (reasoning.py)
as a thinking block, the text, and each tool call as a tool_use block; stop_reason end_turn, max_tokens,
stop_sequence (naming it), tool_use, or model_context_window_exceeded (max_tokens is a bound, as Anthropic's
newer models take it: a reply may fill what the context has room for, and stops there). A stream sends Anthropic's events: message_start, then per block
content_block_start, its deltas (thinking_delta, text_delta, input_json_delta) and content_block_stop,
then message_delta (stop_reason, usage) and message_stop. Errors are Anthropic's error objects.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from serving.api import reasoning, tools
from serving.api.errors import APIError
from serving.api.schemas import GeneratedTokens, NonEmptyStr, RuleError, _Body
from serving.engine.output_processor import ChoiceDelta

MESSAGES_PATH = "/v1/messages"  # and /v1/messages/count_tokens

# -- the request ----------------------------------------------------------------------------------


class TextBlock(_Body):
    model_config = ConfigDict(extra="ignore")  # cache_control, citations
    type: Literal["text"]
    text: str


class ToolUseBlock(_Body):
    model_config = ConfigDict(extra="ignore")
    type: Literal["tool_use"]
    id: NonEmptyStr
    name: NonEmptyStr
    input: dict[str, Any]


class ToolResultBlock(_Body):
    model_config = ConfigDict(extra="ignore")
    type: Literal["tool_result"]
    tool_use_id: NonEmptyStr
    content: str | list[TextBlock] = ""
    is_error: bool | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(block.text for block in self.content)


class ThinkingBlock(_Body):
    model_config = ConfigDict(extra="ignore")  # signature
    type: Literal["thinking"]
    thinking: str


class RedactedThinkingBlock(_Body):
    model_config = ConfigDict(extra="ignore")  # data: another model's encrypted reasoning, of no use here
    type: Literal["redacted_thinking"]


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")],
    # Another type (image, document) is refused by name.
    Discriminator(lambda v: v.get("type") if isinstance(v, dict) else getattr(v, "type", None)),
]


_BLOCKS_OF = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use", "thinking", "redacted_thinking")}


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    @model_validator(mode="after")
    def _blocks_of_its_role(self):
        for block in self.content if isinstance(self.content, list) else ():
            if block.type not in _BLOCKS_OF[self.role]:
                raise RuleError("messages", f"a {self.role} message cannot hold a {block.type} block")
        return self


class AnthropicTool(_Body):
    model_config = ConfigDict(extra="ignore")  # cache_control
    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named_with_tool(self):
        if (self.type == "tool") != (self.name is not None):
            raise RuleError("tool_choice", "tool_choice names a tool when, and only when, its type is tool")
        return self


class ThinkingConfig(_Body):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: Annotated[int, Field(ge=1)] | None = None
    display: Literal["summarized", "omitted"] | None = None


class JSONOutputFormat(_Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")
    model_config = ConfigDict(populate_by_name=True)


class OutputConfig(_Body):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="As chat's reasoning_effort, but a hint: where the template reads neither variable, nothing changes"
    )
    format: JSONOutputFormat | None = None


class MessagesRequest(_Body):
    """What /v1/messages takes (Anthropic's Messages API)."""

    model: NonEmptyStr
    max_tokens: GeneratedTokens
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[NonEmptyStr] | None = Field(None, max_length=64)
    stream: bool = False
    # Sampling, as the API had it before its newest models (the SDK sends them as extra_body now).
    temperature: float = Field(1.0, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: Annotated[int, Field(ge=0)] | None = None
    tools: list[AnthropicTool] | None = Field(None, max_length=128)
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = Field(
        None,
        description="enabled or disabled reaches the chat template as enable_thinking (Qwen3's); budget_tokens is not "
        "enforced; display omitted leaves the thinking block's text out",
    )
    output_config: OutputConfig | None = Field(None, description="format: the reply's text is JSON valid under the schema")
    # Accepted, changing nothing: prefix caching is automatic, and the rest concerns Anthropic's own service.
    cache_control: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    speed: Literal["standard", "fast"] | None = None
    inference_geo: str | None = None
    diagnostics: dict[str, Any] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    container: Any = Field(None, json_schema_extra={"type": "null", "description": "Not supported: null only"})

    @model_validator(mode="after")
    def _no_container(self):
        if self.container is not None:
            raise RuleError("container", "container (code execution) is not supported by this server")
        return self

    @property
    def shows_thinking(self) -> bool:
        return self.thinking is None or self.thinking.display != "omitted"

    def chat_body(self) -> dict[str, Any]:
        """The chat completion request this message is generated as (validated by the caller)."""
        messages: list[dict[str, Any]] = []
        if self.system:
            text = self.system if isinstance(self.system, str) else "".join(block.text for block in self.system)
            messages.append({"role": "system", "content": text})
        for message in self.messages:
            messages.extend(_chat_messages(message))
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature, "stream": self.stream}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.messages[-1].role == "assistant":  # a prefill: the reply continues it
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.top_k is not None:
            body["top_k"] = self.top_k
        if self.stop_sequences:
            body["stop"] = self.stop_sequences
        if self.tools:
            body["tools"] = [
                {"type": "function", "function": {"name": t.name, "parameters": t.input_schema}
                 | ({"description": t.description} if t.description is not None else {})}
                for t in self.tools
            ]  # fmt: skip
        choice = self.tool_choice
        if choice is not None and self.tools:
            kinds = {"auto": "auto", "any": "required", "none": "none"}
            body["tool_choice"] = kinds.get(choice.type) or {"type": "function", "function": {"name": choice.name}}
            if choice.disable_parallel_tool_use:
                body["parallel_tool_calls"] = False
        elif choice is not None and choice.type in ("any", "tool"):
            body["tool_choice"] = "required"  # no tools: the chat request's own 400 says so
        if self.thinking is not None and self.thinking.type in ("enabled", "disabled"):
            body["chat_template_kwargs"] = {"enable_thinking": self.thinking.type == "enabled"}
        output = self.output_config
        if output is not None and output.effort is not None:
            body["reasoning_effort"] = output.effort  # a hint, as Anthropic's API takes it: not refused where unread
        if output is not None and output.format is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": output.format.schema_}}
        return body


def _chat_messages(message: AnthropicMessage) -> list[dict[str, Any]]:
    """One Anthropic turn as chat messages: a user turn's tool results come first, as tool messages."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    texts: list[str] = []
    out: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    thought: list[str] = []
    for block in message.content:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolResultBlock):
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text})
        elif isinstance(block, ToolUseBlock):
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}})
        elif isinstance(block, ThinkingBlock):
            thought.append(block.thinking)  # a redacted one holds nothing to use
    if message.role == "user":
        return out + ([{"role": "user", "content": "".join(texts)}] if texts or not out else [])
    turn: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        turn["tool_calls"] = calls
    if thought:
        turn["reasoning_content"] = "".join(thought)
    return [turn]


# -- what it answers ------------------------------------------------------------------------------


class CountTokensRequest(MessagesRequest):
    """What /v1/messages/count_tokens takes: a message request, max_tokens left out or not."""

    max_tokens: GeneratedTokens | None = None  # type: ignore[assignment]


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = Field(0, description="Prompt tokens served from the prefix cache")
    cache_creation_input_tokens: int = 0


class OutputBlock(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["thinking", "text", "tool_use"] = Field(
        description="thinking (thinking, signature), text (text), or tool_use (id, name, input)"
    )


class MessageObject(BaseModel):
    """A whole reply (Anthropic's Messages API). With `"stream": true` the answer is instead a
    text/event-stream of Anthropic's events, message_start first and message_stop last."""

    id: str = Field(description="msg_<X-Request-Id>")
    type: Literal["message"]
    role: Literal["assistant"]
    content: list[OutputBlock]
    model: str
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded"] | None
    stop_sequence: str | None
    usage: MessageUsage


class MessageEvent(BaseModel):
    """One server-sent event of a streamed reply (`event: <type>` names it too)."""

    model_config = ConfigDict(extra="allow")
    type: str


class AnthropicErrorObject(BaseModel):
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, rate_limit_error, ...")
    message: str


class AnthropicErrorResponse(BaseModel):
    """Every error of /v1/messages: Anthropic's error object."""

    type: Literal["error"]
    error: AnthropicErrorObject


class CountTokensResponse(BaseModel):
    input_tokens: int


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(exc: APIError) -> dict[str, Any]:
    """An error as Anthropic's API words it."""
    kind = _ERROR_TYPES.get(exc.status, "invalid_request_error" if exc.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


# What a streamed block of each kind holds when content_block_start announces it.
_EMPTY_BLOCKS: dict[str, dict[str, str]] = {"thinking": {"thinking": "", "signature": ""}, "text": {"text": ""}}


class MessageShaper:
    """The one choice's deltas as a message, whole or as a stream of events."""

    def __init__(
        self,
        req: MessagesRequest,
        functions: list[dict[str, Any]],
        tool_mode: Any,
        parallel: bool,
        parser: str,
        message_id: str,
        thinking: bool | None,
        window_bound: bool = False,
    ):
        self.req, self.functions, self.tool_mode, self.parallel, self.parser = req, functions, tool_mode, parallel, parser
        self.id = message_id
        self.thinking = thinking
        # max_tokens asked for more than the context had room for: a length stop is the window's, not max_tokens'.
        self.window_bound = window_bound
        self._splitter = reasoning.ThinkSplitter(thinking) if thinking is not None else None
        self._text = ""  # the content so far (after any think block)
        self._sent = 0  # of which streamed as text deltas
        self._block: str | None = None  # the open block's type
        self._index = -1  # the open (or last) block's index
        self._stop_reason: tuple[str, str | None] = ("end_turn", None)

    def _message(self, content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "content": content,
            "model": self.req.model,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }

    def _calls(self, content: str) -> tuple[str, list[dict[str, Any]]]:
        """The content's tool calls as tool_use blocks, and the text left."""
        if self.tool_mode == "none":
            return content, []
        text, calls = tools.parse(content, self.functions, self.tool_mode, self.parser, self.parallel)
        blocks = []
        for call in calls:
            try:
                arguments = json.loads(call["function"]["arguments"])
            except ValueError:
                arguments = {}
            blocks.append({"type": "tool_use", "id": f"toolu_{call['id'].removeprefix('call_')}", "name": call["function"]["name"],
                           "input": arguments if isinstance(arguments, dict) else {}})  # fmt: skip
        return text or "", blocks

    def _stop(self, reason: str | None, stop_string: str | None, calls: bool) -> tuple[str, str | None]:
        if calls:
            return "tool_use", None
        if reason == "length":
            return ("model_context_window_exceeded" if self.window_bound else "max_tokens"), None
        if stop_string is not None:
            return "stop_sequence", stop_string
        return "end_turn", None

    def _usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "input_tokens": usage["prompt_tokens"],
            "output_tokens": usage["completion_tokens"],
            "cache_read_input_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "cache_creation_input_tokens": 0,
        }

    def whole(self, text: str, reason: str | None, stop_string: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        thought = None
        if self.thinking is not None:
            thought, text = reasoning.split(text, self.thinking)
        text, calls = self._calls(text)
        shown = thought if self.req.shows_thinking else ""
        content = [{"type": "thinking", "thinking": shown, "signature": ""}] if thought else []
        content += ([{"type": "text", "text": text}] if text else []) + calls
        stop_reason, stop_sequence = self._stop(reason, stop_string, bool(calls))
        return self._message(content, stop_reason, stop_sequence, self._usage(usage))

    # -- the stream -----------------------------------------------------------------------------

    def opening(self, prompt_tokens: int) -> list[dict[str, Any]]:
        usage = {"input_tokens": prompt_tokens, "output_tokens": 0}
        return [{"type": "message_start", "message": self._message([], None, None, usage)}]

    def _open(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self._index += 1
        self._block = block["type"]
        return events + [{"type": "content_block_start", "index": self._index, "content_block": block}]

    def _close(self) -> list[dict[str, Any]]:
        if self._block is None:
            return []
        self._block = None
        return [{"type": "content_block_stop", "index": self._index}]

    def _delta(self, kind: str, delta: dict[str, Any]) -> list[dict[str, Any]]:
        """A delta of a thinking or text block, opening the block first unless it is open."""
        events = [] if self._block == kind else self._open({"type": kind, **_EMPTY_BLOCKS[kind]})
        return events + [{"type": "content_block_delta", "index": self._index, "delta": delta}]

    def streamed(self, delta: ChoiceDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        text = delta.text
        if self._splitter is not None:
            thought, text = self._splitter.feed(text, final=delta.finish_reason is not None)
            if thought:
                events += self._delta("thinking", {"type": "thinking_delta", "thinking": thought if self.req.shows_thinking else ""})
        self._text += text
        if not delta.finish_reason:
            safe = tools.sendable(self._text, self.tool_mode, self.parser)
            if safe > self._sent:
                piece, self._sent = self._text[self._sent : safe], safe
                events += self._delta("text", {"type": "text_delta", "text": piece})
            return events
        content, calls = self._calls(self._text)
        rest = tools.content_rest(content, self._text, self._sent)
        if rest:
            events += self._delta("text", {"type": "text_delta", "text": rest})
        for call in calls:
            events += self._open({**call, "input": {}})
            events.append({"type": "content_block_delta", "index": self._index,
                           "delta": {"type": "input_json_delta", "partial_json": json.dumps(call["input"], ensure_ascii=False)}})  # fmt: skip
        events += self._close()
        self._stop_reason = self._stop(delta.finish_reason, delta.stop_string, bool(calls))
        return events

    def closing(self, usage: dict[str, Any]) -> list[dict[str, Any]]:
        stop_reason, stop_sequence = self._stop_reason
        return [
            {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}, "usage": self._usage(usage)},
            {"type": "message_stop"},
        ]

