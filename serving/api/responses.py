"""What the API answers, as pydantic models: the OpenAPI document's response schemas.

The handlers build plain dicts (fast, and shaped by formats.py); these models describe them. The
schemathesis test checks every response it provokes against them, so they cannot drift.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorObject(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error, service_unavailable, ...")
    param: str | None = Field(description="The request field at fault, when there is one")
    code: str | None = Field(description="A stable code: invalid_value, context_length_exceeded, queue_full, ...")


class ErrorResponse(BaseModel):
    """Every error, on every route: OpenAI's error object."""

    error: ErrorObject


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens served from the prefix cache")


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = Field(description="Tokens of a thinking model's <think> block, its tags included")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | None = Field(
        None, description="On chat completions of a thinking model (--reasoning-parser)"
    )


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None


class CompletionResponse(BaseModel):
    """A whole completion. With `"stream": true` the answer is instead a text/event-stream of
    `data: {...}` chunks of the same shape (one choice each, "usage" on the last when
    stream_options.include_usage), ending with `data: [DONE]`."""

    id: str = Field(description="cmpl-<X-Request-Id>")
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice] = Field(description="One choice per event; none in the closing usage event")
    usage: Usage | None = Field(None, description="Present when stream_options.include_usage: null but in the last event")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON string")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    reasoning: str | None = Field(None, description="A thinking model's <think> block, apart from its content")
    reasoning_content: str | None = Field(None, description="The same reasoning, under its older name")
    content: str | None = Field(description="None when the message is tool calls only")
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None


class ChatCompletionResponse(BaseModel):
    """A whole chat completion. With `"stream": true` the answer is instead a text/event-stream of
    `chat.completion.chunk` objects (`delta` in place of `message`), ending with `data: [DONE]`."""

    id: str = Field(description="chatcmpl-<X-Request-Id>")
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = Field(None, description="Whole calls, each in one delta")


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice] = Field(description="One choice per event; none in the closing usage event")
    usage: Usage | None = Field(None, description="Present when stream_options.include_usage: null but in the last event")


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="The values, or with encoding_format base64 their float32 bytes")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """The inputs' embeddings, in their order: each the last token's final hidden state, L2-normalized."""

    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    root: str | None = Field(None, description="a LoRA adapter's source: its directory or Hub id")
    parent: str | None = Field(None, description="a LoRA adapter's base model")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "draining", "failed"]
    model: str | None = None


# -- /v1/responses ----------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[dict] = Field(description="Always empty")
    logprobs: list[dict] = Field(description="Always empty")


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"]
    text: str


class OutputReasoning(BaseModel):
    """A thinking model's <think> block (--reasoning-parser), before the message it led to."""

    type: Literal["reasoning"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list[dict] = Field(description="Always empty: the reasoning is given whole, as content")
    content: list[ReasoningText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str = Field(description="What the function_call_output item that answers it names")
    name: str
    arguments: str = Field(description="A JSON object, as a string")
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """A whole response (OpenAI's Responses API). With `"stream": true` the answer is instead a
    text/event-stream of typed events (response.created, response.output_text.delta, ...), the
    last one response.completed or response.incomplete carrying this object."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[OutputReasoning | OutputMessage | OutputFunctionCall]
    error: None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    parallel_tool_calls: bool
    temperature: float
    top_p: float
    tool_choice: str | dict
    tools: list[dict]
    text: dict
    truncation: Literal["disabled"]
    metadata: dict[str, str]
    store: bool
    background: bool
    previous_response_id: None
    reasoning: None
    user: str | None
    usage: ResponseUsage | None = Field(description="null until the response is done")


class ResponseEvent(BaseModel):
    """One server-sent event of a streamed response (`event: <type>` names it too); an error mid-way
    is an event of type "error" with code, message and param."""

    model_config = {"extra": "allow"}
    type: str
    sequence_number: int


class VersionResponse(BaseModel):
    version: str
