"""/v1/responses (OpenAI's Responses API): the request is generated as the chat completion it
amounts to (schemas.ResponsesRequest.chat_body); this shapes the one choice's deltas into a
Response object, whole or as the typed events of a stream.

A stream: response.created and response.in_progress; then a thinking model's reasoning as an item of its
own (output_item.added, content_part.added, reasoning_text.delta ..., reasoning_text.done,
content_part.done, output_item.done), split off as on the chat path (reasoning.py); then, once there is
text, the message item
(output_item.added, content_part.added, output_text.delta ..., output_text.done, content_part.done,
output_item.done); then each function call as its own item (output_item.added, one
function_call_arguments.delta, function_call_arguments.done, output_item.done); and last
response.completed, or response.incomplete when max_output_tokens cut it. Text that may still
become a tool call is held back as on the chat stream (tools.streamable).
"""

from __future__ import annotations

import uuid
from typing import Any

from serving.api import reasoning, tools
from serving.api.schemas import ChatCompletionRequest, NamedFunctionChoice, ResponsesRequest
from serving.engine.output_processor import ChoiceDelta


def response_usage(chat_usage: dict[str, Any]) -> dict[str, Any]:
    """The chat path's usage object in the Responses API's words."""
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["total_tokens"],
    }


class ResponseShaper:
    def __init__(
        self,
        req: ResponsesRequest,
        chat: ChatCompletionRequest,
        parser: str,
        response_id: str,
        created: int,
        thinking: bool | None = None,
        tags: tuple[int, int] | None = None,
    ):
        self.req, self.chat, self.parser = req, chat, parser
        self.id, self.created = response_id, created
        # thinking: None where the output is all message, else whether the prompt opened the think block.
        self.thinking = thinking
        self._splitter = reasoning.ThinkSplitter(thinking) if thinking is not None else None
        self.reasoning_id = f"rs_{uuid.uuid4().hex}"
        self._thought = ""  # the reasoning so far
        self._thinking_open = False  # its item has been announced and not closed
        self._tags = tags  # the think tags' token ids, to count reasoning_tokens
        self._token_ids: list[int] = []
        self.functions, self.tool_mode = chat.tool_functions(), chat.tool_mode
        self.parallel = chat.parallel_tool_calls is not False
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self._sequence = 0
        self._text = ""  # the choice's text so far
        self._sent = 0  # of which streamed as output_text deltas
        self._opened = False  # the message item has been announced
        self._output: list[dict[str, Any]] = []  # the finished output items
        self._reason: str | None = None

    # -- the Response object ---------------------------------------------------------------

    def response(self, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        req = self.req
        if usage is not None and self.thinking is not None and self._tags is not None:
            thought = reasoning.thought_tokens(self._token_ids, self.thinking, self._tags)
            usage = {**usage, "output_tokens_details": {"reasoning_tokens": thought}}
        done = self._reason is not None
        incomplete = self._reason == "length"
        if isinstance(req.tool_choice, NamedFunctionChoice):
            tool_choice: Any = req.tool_choice.model_dump()
        else:
            tool_choice = req.tool_choice or "auto"
        fmt = req.text.format if req.text and req.text.format else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": ("incomplete" if incomplete else "completed") if done else "in_progress",
            "model": req.model,
            "output": list(self._output) if done else [],
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": self.parallel,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=False) for t in req.tools or []],
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "truncation": "disabled",
            "metadata": req.metadata or {},
            "store": False,  # nothing is stored: previous_response_id is refused
            "background": False,
            "previous_response_id": None,
            "reasoning": None,
            "user": req.user,
            "usage": usage,
        }

    def _parse(self) -> tuple[str, list[dict[str, Any]]]:
        if self.tool_mode == "none":
            return self._text, []
        content, calls = tools.parse(self._text, self.functions, self.tool_mode, self.parser, self.parallel)
        return content or "", calls

    @property
    def _first(self) -> int:
        """The output index of the item after the reasoning."""
        return 1 if self._thought else 0

    def _thought_status(self, reason: str | None) -> str:
        """The reasoning item's status once the choice ended for `reason`: incomplete where the length ran
        out before the block did (no content followed it)."""
        return "incomplete" if reason == "length" and not self._text else "completed"

    def _reasoning_item(self, status: str) -> dict[str, Any]:
        content = [{"type": "reasoning_text", "text": self._thought}]
        return {"type": "reasoning", "id": self.reasoning_id, "status": status, "summary": [], "content": content}

    def _message(self, text: str, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": [part]}

    def _finish(self, reason: str | None) -> tuple[str, list[dict[str, Any]]]:
        """Parse the whole output into its items; (the content, the function call items)."""
        self._reason = reason or "stop"
        content, calls = self._parse()
        content = content or self._text[: self._sent]  # what was streamed stays the message's
        status = "incomplete" if self._reason == "length" else "completed"
        items = [
            {
                "type": "function_call",
                "id": f"fc_{uuid.uuid4().hex}",
                "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"],
                "status": "completed",
            }
            for call in calls
        ]
        thought = [self._reasoning_item(self._thought_status(self._reason))] if self._thought else []
        self._output = thought + ([self._message(content, status)] if content else []) + items
        return content, items

    def whole(self, text: str, token_ids: list[int], reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        self._token_ids = token_ids
        if self.thinking is not None:
            thought, text = reasoning.split(text, self.thinking)
            self._thought = thought or ""
        self._text = text
        self._finish(reason)
        return self.response(usage)

    # -- the stream -------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def error_event(self, body: dict[str, Any]) -> dict[str, Any]:
        """A failure mid-stream, from an OpenAI error object."""
        error = body["error"]
        return self._event("error", code=error.get("code"), message=error["message"], param=error.get("param"))

    def opening(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=self.response()), self._event("response.in_progress", response=self.response())]

    def _reasoning_delta(self, piece: str) -> list[dict[str, Any]]:
        events = []
        where = {"item_id": self.reasoning_id, "output_index": 0, "content_index": 0}
        if not self._thinking_open:
            self._thinking_open = True
            item = {**self._reasoning_item("in_progress"), "content": []}
            events.append(self._event("response.output_item.added", output_index=0, item=item))
            events.append(self._event("response.content_part.added", part={"type": "reasoning_text", "text": ""}, **where))
        self._thought += piece
        events.append(self._event("response.reasoning_text.delta", delta=piece, **where))
        return events

    def _reasoning_done(self, status: str) -> list[dict[str, Any]]:
        self._thinking_open = False
        item = self._reasoning_item(status)
        where = {"item_id": self.reasoning_id, "output_index": 0, "content_index": 0}
        return [
            self._event("response.reasoning_text.done", text=self._thought, **where),
            self._event("response.content_part.done", part=item["content"][0], **where),
            self._event("response.output_item.done", output_index=0, item=item),
        ]

    def _text_delta(self, piece: str) -> list[dict[str, Any]]:
        events = []
        where = {"output_index": self._first}
        if not self._opened:
            self._opened = True
            item = {**self._message("", "in_progress"), "content": []}
            events.append(self._event("response.output_item.added", item=item, **where))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(self._event("response.content_part.added", item_id=self.message_id, content_index=0, part=part, **where))
        where = {"item_id": self.message_id, "content_index": 0, **where}
        events.append(self._event("response.output_text.delta", delta=piece, logprobs=[], **where))
        return events

    def streamed(self, delta: ChoiceDelta) -> list[dict[str, Any]]:
        self._token_ids.extend(delta.token_ids)
        events, text = [], delta.text
        if self._splitter is not None:
            thought, text = self._splitter.feed(text, final=delta.finish_reason is not None)
            if thought:
                events += self._reasoning_delta(thought)
        self._text += text
        if self._thinking_open and (text or delta.finish_reason):
            events += self._reasoning_done(self._thought_status(delta.finish_reason))
        if not delta.finish_reason:
            safe = tools.sendable(self._text, self.tool_mode, self.parser)
            if safe <= self._sent:
                return events
            piece, self._sent = self._text[self._sent : safe], safe
            return events + self._text_delta(piece)
        content, items = self._finish(delta.finish_reason)
        rest = tools.content_rest(content, self._text, self._sent)
        if rest:
            events += self._text_delta(rest)
        if self._opened:
            message = self._output[self._first]
            where = {"item_id": self.message_id, "output_index": self._first, "content_index": 0}
            events.append(self._event("response.output_text.done", text=content, logprobs=[], **where))
            events.append(self._event("response.content_part.done", part=message["content"][0], **where))
            events.append(self._event("response.output_item.done", output_index=self._first, item=message))
        first = self._first + (1 if self._opened else 0)
        for k, item in enumerate(items, start=first):
            events.append(self._event("response.output_item.added", output_index=k, item={**item, "arguments": "", "status": "in_progress"}))
            where = {"item_id": item["id"], "output_index": k}
            events.append(self._event("response.function_call_arguments.delta", delta=item["arguments"], **where))
            events.append(self._event("response.function_call_arguments.done", name=item["name"], arguments=item["arguments"], **where))
            events.append(self._event("response.output_item.done", output_index=k, item=item))
        return events

    def closing(self, usage: dict[str, Any]) -> dict[str, Any]:
        if self._reason is None:  # the engine stream ended without a finish (it does not, but be whole)
            self._finish("stop")
        kind = "response.incomplete" if self._reason == "length" else "response.completed"
        return self._event(kind, response=self.response(usage))
