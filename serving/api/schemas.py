"""OpenAI request bodies, validated by pydantic; unsupported options are refused, never ignored."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import types
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from transformers import PreTrainedTokenizerBase

from serving.engine.sampling_params import MAX_LOGPROBS

NonEmptyStr = Annotated[str, Field(min_length=1)]


def _integral(value: Any) -> Any:
    """JSON has one kind of number, and JSON Schema counts 16.0 as the integer 16: it is one here too.
    16.5 is not, nor is true (bodies are validated strictly, routes.parse_body: no bool, string or
    float stands in for another type)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Goes after the field's constraints in Annotated (Annotated[int, Field(ge=1), INTEGRAL]): before
# them, pydantic writes "ge" instead of "minimum" into the JSON schema.
INTEGRAL = BeforeValidator(_integral)
# Mark schemas that /openapi.json bounds by what this server serves (openapi.py): a token id by the
# model's vocabulary, a count of sequences (n, best_of) by --max-batch-size, a count of tokens to
# generate by the context (prompt and completion share it).
TOKEN_ID = "x-fleetlm-token-id"
SEQUENCES = "x-fleetlm-sequences"
CONTEXT_TOKENS = "x-fleetlm-context-tokens"
PROMPTS = "x-fleetlm-prompts"  # a list of prompts: at most the sequences one request may ask for
# A count of tokens to generate (max_tokens and its kin, min_tokens): bounded by the context once served.
GeneratedTokens = Annotated[int, Field(ge=1, json_schema_extra={CONTEXT_TOKENS: True}), INTEGRAL]


def _non_empty(strings: bool = True, arrays: bool = True, max_items: int | None = None):
    """A field's JSON schema says what its validator refuses: empty strings and/or empty arrays (and
    arrays of more than max_items), at every level of its union (the validator keeps the clearer error
    message)."""

    def mark(schema: dict[str, Any]) -> None:
        if schema.get("type") == "string" and strings:
            schema["minLength"] = max(schema.get("minLength", 0), 1)
        if schema.get("type") == "array":
            if arrays:
                schema["minItems"] = max(schema.get("minItems", 0), 1)
            if max_items is not None:
                schema["maxItems"] = max_items
            mark(schema.get("items", {}))
        for option in schema.get("anyOf", ()):
            mark(option)

    return mark


# logit_bias keys: token ids in ASCII digits, few enough to convert.
_TOKEN_ID_KEYS = {"propertyNames": {"pattern": "^[0-9]{1,18}$", "maxLength": 18, TOKEN_ID: True}}
TOP_K_MAX = 2**31 - 1  # any larger top_k means the same as the vocabulary size
# OpenAI's metadata: at most 16 pairs (Field(max_length=16) where used), keys of 64 characters, values of 512.
Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]
TokenIds = list[Annotated[int, Field(ge=0, json_schema_extra={TOKEN_ID: True}), INTEGRAL]]



MAX_STOP_STRINGS = 64  # OpenAI takes 4; vLLM users pass a handful
# Each sampled token is looked up among them: 15M of them (a 30 MB body) were accepted and slowed every step.
MAX_STOP_TOKEN_IDS = 1024

class RuleError(ValueError):
    """A cross-field rule broken: a model validator's error, naming the field it is about (the
    error object's param; pydantic gives such an error no location)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _given(field: str, schema: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema for "field is there and matches schema"."""
    return {"required": [field], "properties": {field: schema}}


@functools.cache
def _null_means_default(cls: type[BaseModel]) -> frozenset[str]:
    """The body keys of cls's fields that have a default but no null value of their own."""
    keys = set()
    for name, info in cls.model_fields.items():
        if info.is_required() or (info.default_factory is None and info.default is None):
            continue
        options = typing.get_args(info.annotation) if typing.get_origin(info.annotation) in (typing.Union, types.UnionType) else ()
        if info.annotation is not Any and type(None) not in options:
            keys.add(info.alias or name)
    return frozenset(keys)


def _document_rules(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """The model's cross-field rules (its RULES, checked by its validators) in its JSON schema, and
    null among the values of its fields whose null means their default (_Body)."""
    if rules := getattr(cls, "RULES", ()):
        schema.setdefault("allOf", []).extend(rules)
    for key in _null_means_default(cls):
        prop = schema.get("properties", {}).get(key)
        if prop is None:
            continue
        if "anyOf" in prop:
            prop["anyOf"].append({"type": "null"})
            continue
        kept = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        options = [dict(prop), {"type": "null"}]
        prop.clear()
        prop.update(anyOf=options, **kept)


class _Body(BaseModel):
    """An object of a request body. Null for a field with a default means that default, as in
    OpenAI's API (whose SDK sends null for an argument given as None); unknown fields are refused,
    as OpenAI does: a misspelt option must not silently do nothing."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_document_rules)

    @model_validator(mode="before")
    @classmethod
    def _nulls_to_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            keys = _null_means_default(cls)
            if any(data.get(key, 0) is None for key in keys):
                data = {k: v for k, v in data.items() if not (v is None and k in keys)}
        return data


# An object that gives stream_options must stream (the model validator says so too).
_STREAM_OPTIONS_NEED_STREAM = {"if": _given("stream_options", {"type": "object"}), "then": _given("stream", {"const": True})}
def _merged(*schemas: dict[str, Any]) -> dict[str, Any]:
    """The conjunction of object schemas made of properties and required, as one such schema."""
    out: dict[str, Any] = {}
    for schema in schemas:
        for key, value in schema.items():
            if key == "properties":
                props = out.setdefault("properties", {})
                for name, sub in value.items():
                    props[name] = _merged(props[name], sub) if name in props else sub
            elif key == "required":
                out["required"] = sorted({*out.get("required", []), *value})
            else:
                out[key] = value
    return out


def _text_only(field: str) -> dict[str, Any]:
    """`field`, where given, is a format object of type text (no constraint)."""
    return {"properties": {field: {"properties": {"type": {"const": "text"}}}}}


_JSON_FORMAT = {"required": ["type"], "properties": {"type": {"enum": ["json_object", "json_schema"]}}}
# Each way a request gives an output constraint (_Request.constraint): (given, left out). Left out is
# said positively (null, or a text format) rather than with `not`: schemathesis generates from these
# rules only while they stay simple.
_CONSTRAINT_SLOTS = (
    (_given("response_format", _JSON_FORMAT), _text_only("response_format")),
    *(
        (_given(field, {"type": kind}), {"properties": {field: {"type": "null"}}})
        for field, kind in (("guided_json", "object"), ("guided_regex", "string"), ("guided_choice", "array"))
    ),
    *(
        (_given("structured_outputs", _given(key, {"type": kind})), {"properties": {"structured_outputs": {"properties": {key: {"type": "null"}}}}})
        for key, kind in (("json", "object"), ("regex", "string"), ("choice", "array"))
    ),
)
_NO_MIN_TOKENS = {"properties": {"min_tokens": {"maximum": 0}}}
_NO_CONSTRAINT = _merged(*(left_out for _, left_out in _CONSTRAINT_SLOTS))
# A constraint decides when the output ends, so min_tokens must then be 0 (_Request's validator). One
# if/then per constraint: schemathesis cannot generate from one `if` over all of them.
_CONSTRAINT_WITHOUT_MIN_TOKENS = tuple({"if": given, "then": _NO_MIN_TOKENS} for given, _ in _CONSTRAINT_SLOTS)
# And at most one constraint (_Request.constraint): each, given, leaves the others out. Said so for
# completions only: beside the chat document's tool rules, every way of saying it tried (this one, a
# choice among eight, an if/then per pair) made that document too involved for schemathesis to generate
# from at all (its canonical form gives up), so the chat document lets two through that the server refuses.
_ONE_CONSTRAINT_WITHOUT_MIN_TOKENS = tuple(
    {"if": given, "then": _merged(_NO_MIN_TOKENS, *(other for j, (_, other) in enumerate(_CONSTRAINT_SLOTS) if j != i))}
    for i, (given, _) in enumerate(_CONSTRAINT_SLOTS)
)
_FORCED_TOOL_CHOICE = {"anyOf": [{"const": "required"}, {"type": "object"}]}


def _forced_tool_rule(*then: dict[str, Any]) -> dict[str, Any]:
    """A tool_choice of required or of one function (ChatCompletionRequest._unsupported) needs tools to
    choose from, and is the output's constraint: `then` leaves the others out (and min_tokens)."""
    return {"if": _given("tool_choice", _FORCED_TOOL_CHOICE), "then": _merged(_given("tools", {"type": "array", "minItems": 1}), *then)}


# Accepted only to be refused when set (their validator): documented as null or empty.
_UNSET = {"description": "Not supported: null or empty only", "maxItems": 0, "maxLength": 0, "maxProperties": 0}


class StreamOptions(_Body):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object), or json_schema
    (JSON valid under the schema). Decoding is constrained by a grammar, so the output always parses."""

    RULES: ClassVar[tuple[dict[str, Any], ...]] = (
        {
            "if": _given("type", {"const": "json_schema"}),
            "then": _given("json_schema", {"type": "object"}),
            "else": {"properties": {"json_schema": {"type": "null"}}},
        },
    )
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise RuleError("json_schema", "json_schema is required with type json_schema, and only with it")
        return self


class StructuredOutputs(_Body):
    """vLLM's structured_outputs object (its newer form of guided_json / guided_regex / guided_choice)."""

    json_: dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1, max_length=4096)
    choice: list[NonEmptyStr] | None = Field(None, min_length=1, max_length=1024)


class _Request(_Body):
    RULES: ClassVar[tuple[dict[str, Any], ...]] = (_STREAM_OPTIONS_NEED_STREAM, *_CONSTRAINT_WITHOUT_MIN_TOKENS)

    model: NonEmptyStr
    max_tokens: GeneratedTokens | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Annotated[int, Field(ge=1, le=128, json_schema_extra={SEQUENCES: True}), INTEGRAL] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, json_schema_extra=_non_empty(arrays=False, max_items=MAX_STOP_STRINGS))
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, json_schema_extra=_TOKEN_ID_KEYS)
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1), INTEGRAL] | None = None  # a 64-bit generator seed
    user: str | None = None
    # Accepted for compatibility; they do not change the result.
    metadata: Metadata | None = Field(None, max_length=16)
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None  # prefix caching needs no key here
    safety_identifier: str | None = None
    # Extensions vLLM users rely on.
    top_k: Annotated[int, Field(ge=-1, le=TOP_K_MAX), INTEGRAL] = 0  # 0 or -1: off; beyond the vocabulary: the whole of it
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    # llama.cpp's (and Ollama's): the penalty over the last N tokens of the text; -1 all of it, 0 none.
    repeat_last_n: Annotated[int, Field(ge=-1, le=2**31 - 1), INTEGRAL] = -1
    stop_token_ids: Annotated[TokenIds, Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, json_schema_extra={CONTEXT_TOKENS: True}), INTEGRAL] = 0
    response_format: ResponseFormat | None = None
    # vLLM's extensions for the same: exactly one constraint per request.
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = Field(None, min_length=1, max_length=4096)
    guided_choice: list[NonEmptyStr] | None = Field(None, min_length=1, max_length=1024)

    @property
    def constraint(self) -> tuple[str, str, Any] | None:
        """(field, kind, value) of the request's one output constraint, if any."""
        found = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(("response_format", "json_object", None))
        elif fmt is not None and fmt.type == "json_schema":
            found.append(("response_format", "json_schema", fmt.json_schema.schema_))  # type: ignore[union-attr]
        so = self.structured_outputs
        for field, kind, value in (
            ("guided_json", "json_schema", self.guided_json),
            ("guided_regex", "regex", self.guided_regex),
            ("guided_choice", "choice", self.guided_choice),
            ("structured_outputs", "json_schema", so.json_ if so else None),
            ("structured_outputs", "regex", so.regex if so else None),
            ("structured_outputs", "choice", so.choice if so else None),
        ):
            if value is not None:
                found.append((field, kind, value))
        if len(found) > 1:
            raise RuleError(found[1][0], f"give one output constraint, not {len(found)}: {', '.join(f for f, _, _ in found)}")
        return found[0] if found else None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            # Each is looked for in the text of every token: 50,000 of them held the API's event loop for seconds.
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            # ASCII digits only ("²".isdigit() is true, int("²") fails), and few enough to convert.
            if not (key.isascii() and key.isdigit() and len(key) <= 18):
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key[:40]!r}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise RuleError("stream_options", "stream_options is only allowed when stream is true")
        if self.constraint is not None and self.min_tokens:
            raise RuleError("min_tokens", "min_tokens cannot be combined with an output constraint (the grammar decides when it ends)")
        return self


def _one_each(p: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """A prompt field (a text, texts, token ids, or lists of them) as a list of single prompts."""
    if isinstance(p, str):
        return [p]
    if p and all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[list-item]
    return list(p)  # type: ignore[arg-type]


def _none_empty(value: Any) -> Any:
    """A prompt field's validator: neither it nor any prompt it holds is empty."""
    if value == "" or value == [] or (isinstance(value, list) and any(v == [] for v in value)):
        raise ValueError("must not be empty, nor hold an empty prompt")
    return value


def _prompts_schema(schema: dict[str, Any]) -> None:
    """Not empty at any level, and the forms that hold several prompts (of texts, of token id lists) marked
    for /openapi.json to bound their number."""
    _non_empty()(schema)
    for option in schema.get("anyOf", ()):
        if option.get("type") == "array" and option.get("items", {}).get("type") in ("string", "array"):
            option[PROMPTS] = True


class CompletionRequest(_Request):
    RULES: ClassVar[tuple[dict[str, Any], ...]] = (_STREAM_OPTIONS_NEED_STREAM, *_ONE_CONSTRAINT_WITHOUT_MIN_TOKENS)

    prompt: str | list[NonEmptyStr] | TokenIds | list[TokenIds] = Field(json_schema_extra=_prompts_schema)
    max_tokens: GeneratedTokens | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None
    best_of: Annotated[int, Field(ge=1, le=128, json_schema_extra={SEQUENCES: True}), INTEGRAL] | None = Field(
        None,
        description="Choices generated per prompt (at least n), of which the n with the highest mean logprob per token of "
        "their text are returned (streamed, each then comes whole once all have ended). usage counts the tokens of all of them",
    )
    suffix: str | None = Field(None, json_schema_extra=_UNSET)

    _non_empty_prompt = field_validator("prompt")(_none_empty)

    @model_validator(mode="after")
    def _unsupported(self):
        if self.best_of is not None and self.best_of < self.n:
            raise RuleError("best_of", f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.suffix:
            raise RuleError("suffix", "suffix (fill-in-the-middle) is not supported")
        return self

    @property
    def candidates(self) -> int:
        """Choices generated per prompt: best_of, of which n are returned."""
        return self.best_of or self.n

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (each text or token ids)."""
        return _one_each(self.prompt)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")  # tool_call_id, tool_calls ... pass through to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = Field(
        None,
        # What _text_parts_only takes: a string or text parts (it names any other part's type).
        json_schema_extra=lambda schema: schema.update(
            anyOf=[{"type": "string"}, {"type": "array", "items": TextPart.model_json_schema()}, {"type": "null"}]
        ),
    )
    name: str | None = None
    # Typed so that a malformed one is a 400 naming it (they pass through to the template as they are).
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value):
        if isinstance(value, list):
            texts = []
            for part in value:
                if part.get("type") != "text":
                    raise ValueError(f"content part type {part.get('type')!r} is not supported: only 'text'")
                texts.append(TextPart.model_validate(part).text)
            return "".join(texts)
        return value

    def for_template(self) -> dict[str, Any]:
        data = self.model_dump(exclude_none=True)
        data.setdefault("content", "")
        # OpenAI sends a call's arguments as a JSON string; chat templates iterate over them as a mapping.
        for call in data.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                with contextlib.suppress(ValueError, RecursionError):  # not JSON (or too deep): the template gets the string
                    function["arguments"] = json.loads(function["arguments"])
        if data["role"] == "developer":  # OpenAI's newer name for the system role
            data["role"] = "system"
        if "reasoning" in data:  # a reply's reasoning sent back (vLLM's newer name): templates read the older one
            data.setdefault("reasoning_content", data.pop("reasoning"))
        return data


# What a request's chat_template_kwargs may not name: the template's own `messages`, and the parameters of
# transformers' apply_chat_template, which FleetLM sets (or leaves as they are) and a variable would replace.
_TEMPLATE_ARGUMENTS = (
    "messages",
    *(p for p in inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters if p != "kwargs"),
)
TemplateKwargs = Annotated[
    dict[str, Any],
    Field(
        description="More variables for the chat template, e.g. Qwen3's {\"enable_thinking\": false} (vLLM's extension)",
        json_schema_extra={"propertyNames": {"not": {"enum": list(_TEMPLATE_ARGUMENTS)}}},
    ),
]


def _template_kwargs(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value and (taken := [k for k in value if k in _TEMPLATE_ARGUMENTS]):
        raise RuleError("chat_template_kwargs", f"chat_template_kwargs may not set {taken[0]!r}: the server sets it")
    return value


_UNSUPPORTED_CHAT = ("functions", "audio", "prediction", "web_search_options", "verbosity")  # and function_call
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class ChatCompletionRequest(_Request):
    RULES: ClassVar[tuple[dict[str, Any], ...]] = (
        *_Request.RULES,
        _forced_tool_rule(_NO_MIN_TOKENS, _NO_CONSTRAINT),
        {"if": _given("top_logprobs", {"type": "integer"}), "then": _given("logprobs", {"const": True})},
        {"if": _given("continue_final_message", {"const": True}), "then": _given("add_generation_prompt", {"const": False})},
    )
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: GeneratedTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None
    tools: list[Tool] | None = Field(None, max_length=128, description="A function declared twice is called under either definition")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="required or a named function needs tools (the name among them), and no other output constraint"
    )
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(None, json_schema_extra=_UNSET)
    function_call: Any = Field(None, json_schema_extra={"enum": [None, "none"], "description": "Not supported: null or none"})
    modalities: list[str] | None = Field(
        None,  # the validator's message names what is supported; the document says it too
        json_schema_extra=lambda schema: schema["anyOf"][0].update(items={"enum": ["text"]}, maxItems=1),
    )
    audio: dict[str, Any] | None = Field(None, json_schema_extra=_UNSET)
    prediction: dict[str, Any] | None = Field(None, json_schema_extra=_UNSET)
    web_search_options: dict[str, Any] | None = Field(None, json_schema_extra=_UNSET)
    reasoning_effort: ReasoningEffort | None = Field(
        None,
        description="Reaches the chat template as reasoning_effort where it reads one (gpt-oss's), and as enable_thinking "
        "(none: false) where it reads that (Qwen3's); a 400 where it reads neither",
    )
    verbosity: str | None = Field(None, json_schema_extra=_UNSET)
    # Extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False  # vLLM's: a reply to a final assistant message (continued) starts with that message
    chat_template_kwargs: TemplateKwargs | None = None
    include_reasoning: bool = Field(True, description="false leaves a thinking model's reasoning out of the reply (vLLM's)")

    @property
    def echoed(self) -> str:
        """The text echo puts before each choice's content."""
        last = self.messages[-1]
        return last.content if self.echo and last.role == "assistant" and isinstance(last.content, str) else ""

    @model_validator(mode="after")
    def _unsupported(self):
        for name in _UNSUPPORTED_CHAT:
            if getattr(self, name):
                raise RuleError(name, f"{name} is not supported by this server")
        if self.function_call not in (None, "none"):  # "none": no call, as without it
            raise RuleError("function_call", "function_call is not supported by this server")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise RuleError("tool_choice", "tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
            t.function.name for t in self.tools or []
        }:
            raise RuleError("tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools")
        if self.forced_tools and self.constraint is not None:
            raise RuleError("tool_choice", "a forced tool_choice cannot be combined with another output constraint")
        if self.forced_tools and self.min_tokens:
            raise RuleError("min_tokens", "min_tokens cannot be combined with a forced tool_choice (the tool call decides when it ends)")
        if self.modalities and self.modalities != ["text"]:
            raise RuleError("modalities", "only the 'text' modality is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise RuleError("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.continue_final_message and self.add_generation_prompt:
            raise RuleError("continue_final_message", "continue_final_message and add_generation_prompt cannot both be true")
        _template_kwargs(self.chat_template_kwargs)
        return self

    @property
    def tool_mode(self) -> Any:
        """"none", "auto", "required" or the named choice as a dict; "none" without tools."""
        if not self.tools:
            return "none"
        if self.tool_choice is None:
            return "auto"
        return self.tool_choice if isinstance(self.tool_choice, str) else self.tool_choice.model_dump()

    @property
    def forced_tools(self) -> bool:
        return self.tool_mode == "required" or isinstance(self.tool_mode, dict)

    def tool_functions(self) -> list[dict[str, Any]]:
        return [t.function.model_dump(exclude_none=True) for t in self.tools or []]

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Body):
    # The document says what _one_input enforces: a prompt string or a messages array, not both.
    RULES: ClassVar[tuple[dict[str, Any], ...]] = (
        {
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        },
    )
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)  # as a chat request takes them
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: TemplateKwargs | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise RuleError("prompt", "give exactly one of prompt or messages")
        _template_kwargs(self.chat_template_kwargs)
        return self


class EmbeddingRequest(_Body):
    """What /v1/embeddings takes (OpenAI's): one input or several, each a text or token ids."""

    model: NonEmptyStr
    input: str | list[NonEmptyStr] | TokenIds | list[TokenIds] = Field(json_schema_extra=_prompts_schema)
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each embedding as its float32 values' little-endian bytes"
    )
    dimensions: Annotated[int, Field(ge=1), INTEGRAL] | None = Field(
        None, description="Keep the first this many dimensions, normalized again (Matryoshka-trained models)"
    )
    user: str | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1), INTEGRAL] | None = Field(
        None, description="vLLM's: embed each input's first this many tokens (-1: as many as the context holds) "
        "instead of refusing a longer one"
    )

    _non_empty_input = field_validator("input")(_none_empty)

    def inputs(self) -> list[str | list[int]]:
        return _one_each(self.input)


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: TokenIds
    skip_special_tokens: bool = True


# -- /v1/responses (OpenAI's Responses API), run as the chat completion it amounts to ---------------


class InputText(_Body):
    model_config = ConfigDict(extra="ignore")  # a replayed output_text carries annotations, logprobs
    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(_Body):
    model_config = ConfigDict(extra="ignore")  # a replayed output message carries its id and status
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(_Body):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call"]
    call_id: NonEmptyStr
    name: NonEmptyStr
    arguments: str


class FunctionCallOutputItem(_Body):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function_call_output"]
    call_id: NonEmptyStr
    output: str | list[InputText]


class ReasoningTextPart(_Body):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Body):
    """A reasoning item of an earlier response, replayed: the assistant turn after it gets it as its
    reasoning_content (what thinking models' templates read)."""

    model_config = ConfigDict(extra="ignore")  # its id, status, encrypted_content
    type: Literal["reasoning"]
    summary: list[ReasoningTextPart] = Field(default_factory=list)
    content: list[ReasoningTextPart] | None = None

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content or self.summary)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    # A message may leave out its type; another type is refused by name (e.g. web_search_call items).
    Discriminator(lambda v: (v.get("type") or "message") if isinstance(v, dict) else getattr(v, "type", None)),
]


class FunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Body):
    type: Literal["function"]
    name: str


class TextFormat(_Body):
    RULES: ClassVar[tuple[dict[str, Any], ...]] = (
        {
            "if": _given("type", {"const": "json_schema"}),
            "then": _given("schema", {"type": "object"}),
            "else": {"properties": {"schema": {"type": "null"}}},
        },
    )
    model_config = ConfigDict(populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.schema_ is not None):
            raise RuleError("schema", "schema is required with type json_schema, and only with it")
        return self


class TextOptions(_Body):
    model_config = ConfigDict(extra="ignore")  # verbosity: a hint for reasoning models
    format: TextFormat | None = None


# Refused when set (top_logprobs when above 0, max_tool_calls when given at all): documented so.
_UNSUPPORTED_RESPONSES = ("previous_response_id", "conversation", "include", "prompt", "top_logprobs")


class ReasoningOptions(_Body):
    effort: ReasoningEffort | None = Field(None, description="As chat's reasoning_effort")
    summary: Literal["auto", "concise", "detailed"] | None = Field(
        None, description="Accepted: the reasoning item holds the whole reasoning as content, and no summary"
    )
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # summary's older name


class ResponsesRequest(_Body):
    """What /v1/responses takes: the input is turned into chat messages (instructions first, as a
    system message; function calls and their outputs as assistant tool calls and tool messages) and
    generated as a chat completion. There is no stored state: previous_response_id is refused."""

    # A forced tool_choice, as in a chat request (which this one is validated as): text.format's JSON is the other constraint.
    RULES: ClassVar[tuple[dict[str, Any], ...]] = (_forced_tool_rule({"properties": {"text": _text_only("format")}}),)
    model: NonEmptyStr
    input: str | list[InputItem] = Field(json_schema_extra=_non_empty())
    instructions: str | None = None
    max_output_tokens: GeneratedTokens | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    truncation: Literal["disabled"] | None = None
    background: bool | None = Field(None, json_schema_extra={"enum": [False, None], "description": "Not supported: false or null"})
    # Accepted for compatibility; they do not change the result.
    store: bool | None = None
    metadata: Metadata | None = Field(None, max_length=16)
    user: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    previous_response_id: str | None = Field(None, json_schema_extra=_UNSET)
    conversation: str | dict[str, Any] | None = Field(None, json_schema_extra=_UNSET)
    reasoning: ReasoningOptions | None = None
    include: list[str] | None = Field(None, json_schema_extra=_UNSET)
    prompt: dict[str, Any] | None = Field(None, json_schema_extra=_UNSET)
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = Field(None, json_schema_extra={"maximum": 0})
    max_tool_calls: Annotated[int, Field(ge=0), INTEGRAL] | None = Field(None, json_schema_extra={"maximum": -1})

    @field_validator("input")
    @classmethod
    def _non_empty_input(cls, value):
        if value == "" or value == []:
            raise ValueError("the input must not be empty")
        if isinstance(value, list) and all(isinstance(item, ReasoningItem) for item in value):
            raise ValueError("the input holds only reasoning: no message, function call or function call output")
        return value

    @model_validator(mode="after")
    def _unsupported(self):
        for name in _UNSUPPORTED_RESPONSES:
            if getattr(self, name):
                stateful = name in ("previous_response_id", "conversation")
                raise RuleError(name, f"{name} is not supported by this server" + (" (it stores no responses)" if stateful else ""))
        if self.background:
            raise RuleError("background", "background responses are not supported by this server (it stores no responses)")
        if self.max_tool_calls is not None:
            raise RuleError("max_tool_calls", "max_tool_calls is not supported by this server")
        return self

    def chat_body(self) -> dict[str, Any]:
        """The chat completion request this response is generated as (validated by the caller)."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        thought: str | None = None  # a reasoning item's, for the assistant turn it led to
        for item in items:
            if isinstance(item, ReasoningItem):
                thought = item.text
                continue
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)  # parallel calls: one assistant turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
            if thought is not None and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("reasoning_content", thought)
            thought = None
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": self.stream,
        }
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        if self.tools:
            body["tools"] = [
                {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in self.tools
            ]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        if self.reasoning is not None and self.reasoning.effort is not None:
            body["reasoning_effort"] = self.reasoning.effort
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            schema = {"name": fmt.name, "schema": fmt.schema_, **({"strict": fmt.strict} if fmt.strict is not None else {})}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif fmt is not None:
            body["response_format"] = {"type": fmt.type}
        return body
