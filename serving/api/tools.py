"""Tool calling on /v1/chat/completions: what the grammar enforces and how the output becomes OpenAI
`tool_calls`.

- tool_choice "required" or a named function: decoding is constrained (engine/grammar.py) to a JSON
  array of calls (one at most unless parallel_tool_calls) or one call object, each naming a declared
  function with arguments valid under its parameters schema, so the call always parses.
- "auto": the model writes what it writes; its calls are parsed in the formats of the families we serve:
  Hermes/Qwen `<tool_call>{...}</tool_call>` blocks, Mistral `[TOOL_CALLS] [...]`, and a bare JSON object
  `{"name": ..., "arguments"|"parameters": ...}` (Llama 3.x). Text that is no call stays content.
- "none" (or no tools): plain chat.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

_HERMES_OPEN = "<tool_call>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_MISTRAL = "[TOOL_CALLS]"


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": function.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def forced_schema(functions: list[dict[str, Any]], choice: Any, parallel: bool) -> dict[str, Any] | None:
    """The JSON schema a forced tool choice constrains the output to, or None for auto/none."""
    if isinstance(choice, dict):
        # A name declared twice (as vLLM, FleetLM takes such a list) is a call under either definition.
        named = [_call_schema(f) for f in functions if f["name"] == choice["function"]["name"]]
        return named[0] if len(named) == 1 else {"anyOf": named}
    if choice == "required":
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": [_call_schema(f) for f in functions]}, "minItems": 1}
        if not parallel:
            schema["maxItems"] = 1
        return schema
    return None


def _call(name: str, arguments: Any) -> dict[str, Any]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def _as_call(value: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            return None
    return _call(value["name"], arguments) if isinstance(arguments, dict) else None


PARSERS = ("hermes", "mistral", "llama3_json")


def parse(
    text: str, functions: list[dict[str, Any]], choice: Any, parser: str = "auto", parallel: bool = True
) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished output; `parser` (--tool-call-parser) picks the auto format.
    Without parallel calls (parallel_tool_calls false), an auto output's first call is the only one."""
    content, calls = _parse(text, functions, choice, parser)
    return content, calls if parallel else calls[:1]


def streamable(text: str, parser: str = "auto") -> int:
    """How much of a growing "auto" output is content whatever follows: the length of its prefix that
    can be streamed before the output ends. The rest could still become a tool call (from a Hermes
    `<tool_call>` on, or all of an output that opens like a Mistral or Llama 3 JSON call), or is
    whitespace that a call after it would drop from the content (parse's content keeps this prefix)."""
    use = set(PARSERS) if parser == "auto" else {parser}
    head = text.lstrip()
    if not head:
        return 0
    if "mistral" in use and (head.startswith(_MISTRAL) or _MISTRAL.startswith(head)):
        return 0
    if "llama3_json" in use and head.startswith("{"):
        return 0
    limit = len(text)
    if "hermes" in use:
        at = text.find(_HERMES_OPEN)
        if at >= 0:
            limit = at
        else:  # a suffix that may be the start of the tag
            limit -= next((k for k in range(min(len(_HERMES_OPEN) - 1, len(text)), 0, -1) if text.endswith(_HERMES_OPEN[:k])), 0)
    return len(text[:limit].rstrip())


def sendable(text: str, mode: Any, parser: str = "auto") -> int:
    """How much of a growing output may stream as content under tool mode `mode`: all of it without
    tools, what `streamable` allows under "auto", none of a forced call (the output is its JSON)."""
    if mode == "none":
        return len(text)
    return streamable(text, parser) if mode == "auto" else 0


def content_rest(content: str, text: str, sent: int) -> str:
    """The content of a finished output still to send once `sent` characters of its text streamed:
    what streamed is where the content starts (parse keeps that prefix), the rest follows."""
    return content[sent:] if content.startswith(text[:sent]) else ""


def _parse(text: str, functions: list[dict[str, Any]], choice: Any, parser: str) -> tuple[str | None, list[dict[str, Any]]]:
    use = set(PARSERS) if parser == "auto" else {parser}
    names = {f["name"] for f in functions}
    if choice == "required" or isinstance(choice, dict):
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            return text, []  # cut by max_tokens: the client sees what was written
        values = value if isinstance(value, list) else [value]
        calls = [c for c in (_as_call(v, names) for v in values) if c]
        return None, calls
    calls = []
    for block in _HERMES.findall(text) if "hermes" in use else []:
        try:
            call = _as_call(json.loads(block), names)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            call = None
        if call:
            calls.append(call)
    if calls:  # the content is the text around the calls (what streamable let through, then the rest)
        rest = _HERMES.sub("", text)
        return (rest.rstrip() if rest.strip() else None), calls
    stripped = text.strip()
    if "mistral" in use and stripped.startswith(_MISTRAL):
        try:
            value = json.loads(stripped[len(_MISTRAL) :].strip())
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            value = None
        values = value if isinstance(value, list) else [value]
        calls = [c for c in (_as_call(v, names) for v in values) if c]
        if calls:
            return None, calls
    if "llama3_json" in use and stripped.startswith("{"):
        try:
            call = _as_call(json.loads(stripped), names)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            call = None
        if call:
            return None, [call]
    return text, []
