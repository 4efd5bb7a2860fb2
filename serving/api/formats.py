"""How each generation endpoint shapes the same engine deltas into OpenAI JSON.

One generation path (routes.generate) drives both endpoints; a Format says only what differs: the
object names, the first stream events, the choice of one streamed delta, and a finished choice.
"""

from __future__ import annotations

import codecs
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from serving.api import reasoning, tools
from serving.api.generation import Prompt
from serving.api.state import AppState
from serving.engine.output_processor import ChoiceDelta
from serving.engine.protocol import TokenLogprob


@dataclass(slots=True)
class Choice:
    """A whole choice, accumulated from its deltas (non-streaming responses)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_string: str | None = None  # the stop string that ended it, where one did

    def add(self, delta: ChoiceDelta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.prompt_logprobs = delta.prompt_logprobs or self.prompt_logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.stop_string = delta.stop_string or self.stop_string


class Format(ABC):
    id_prefix: str
    object: str
    chunk_object: str

    def opening(self) -> list[dict[str, Any]]:
        """Choices of the events sent before the first token."""
        return []

    @abstractmethod
    def streamed(self, index: int, delta: ChoiceDelta) -> list[dict[str, Any]]:
        """Choices of the events for one delta (none when it carries nothing to show)."""

    @abstractmethod
    def finished(self, index: int, choice: Choice) -> dict[str, Any]:
        """One choice of the whole response."""

    def usage_details(self) -> dict[str, Any]:
        """What the usage object holds beside the token counts, once every choice has ended."""
        return {}


def completion_logprobs(
    st: AppState,
    token_ids: list[int],
    entries: list[TokenLogprob | None],
    offset: int,
    opens_text: bool = False,
    pieces: codecs.IncrementalDecoder | None = None,
    generated_from: int = 0,
    prompt_pieces: list[str] | None = None,
    final: bool = False,
) -> tuple[dict[str, Any], int]:
    """Completions' logprobs object, each token at its offset in the choice's text from `offset` on,
    and the offset after them. `opens_text`: the first token begins the text (an echoed prompt's),
    where SentencePiece tokenizers drop a word's leading space, as the text has it.

    A character split over several tokens (byte-fallback or byte-level pieces of "☃") is the text of
    the token that completes it, the ones before it "": alone each would read U+FFFD, and the tokens
    would neither join into the text nor sit at its offsets. `pieces` holds such a character's first
    bytes from one call to the next (a stream's deltas). Generated tokens, from `generated_from` on, are
    "" where special (a BOS sampled mid-text): the generated text leaves them out; an echoed prompt of
    token ids spells them. An echoed text prompt's tokens are `prompt_pieces`, its own characters, where
    the tokenizer gave them (Prompt.pieces). `final`: the choice ends here, and so do the bytes of a
    character it left unfinished, read U+FFFD as the text reads them."""
    pieces = pieces or new_pieces()
    special = st.special_token_ids
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for k, (token_id, entry) in enumerate(zip(token_ids, entries, strict=True)):
        raw = st.token_bytes(token_id)
        if prompt_pieces is not None and k < len(prompt_pieces):
            text = prompt_pieces[k]
        elif k >= generated_from and token_id in special:
            text = ""
        elif pieces.getstate()[0] or not _whole_characters(raw):
            text = pieces.decode(raw)
        else:
            text = st.token_text(token_id, alone=opens_text and k == 0)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        token_logprobs.append(None if entry is None else entry.logprob)
        top_logprobs.append(None if entry is None else {st.token_text(t): lp for t, lp in entry.top})
    if final and tokens and (rest := pieces.decode(b"", final=True)):
        tokens[-1] += rest
        offset += len(rest)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}, offset


def new_pieces() -> codecs.IncrementalDecoder:
    """UTF-8 bytes in, the characters they complete out (a broken sequence reads U+FFFD, as in the text)."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def _whole_characters(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class CompletionFormat(Format):
    """/v1/completions: choice i belongs to prompt i // n; echo puts the prompt before the text. With
    echo and logprobs, the prompt's tokens come first, from the first the client gave (a BOS the
    tokenizer added is not shown, and the first shown token is scored given it)."""

    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, st: AppState, prompts: list[Prompt], n: int, echo: bool, logprobs: int | None):
        self.st, self.prompts, self.n, self.echo, self.logprobs = st, prompts, n, echo, logprobs
        self.prompt_logprobs = echo and logprobs is not None  # the prompt is scored, and arrives with the first delta
        self._offsets: dict[int, int] = {}  # text_offset so far, per streamed choice
        self._pieces: dict[int, codecs.IncrementalDecoder] = {}  # a split character's first bytes, per streamed choice

    def _prompt(self, index: int) -> Prompt:
        return self.prompts[index // self.n]

    def _scored_prompt(self, index: int, entries: list[TokenLogprob | None] | None) -> tuple[list[int], list[TokenLogprob | None]]:
        prompt = self._prompt(index)
        ids = prompt.token_ids
        entries = list(entries or [None] * len(ids))
        return ids[prompt.added :], entries[prompt.added :]

    def opening(self) -> list[dict[str, Any]]:
        if not self.echo or self.prompt_logprobs:
            return []
        out = []
        for i in range(self.n * len(self.prompts)):
            out.append({"index": i, "text": self._prompt(i).text, "logprobs": None, "finish_reason": None})
        return out

    def streamed(self, index: int, delta: ChoiceDelta) -> list[dict[str, Any]]:
        text, lp = delta.text, None
        if self.logprobs is not None:
            token_ids, entries, opens, generated = delta.token_ids, list(delta.logprobs), False, 0
            if self.prompt_logprobs and delta.prompt_logprobs is not None:
                prompt_ids, prompt_entries = self._scored_prompt(index, delta.prompt_logprobs)
                text, token_ids, entries = self._prompt(index).text + text, prompt_ids + token_ids, prompt_entries + entries
                opens, generated = True, len(prompt_ids)
            pieces = self._pieces.setdefault(index, new_pieces())
            offset = self._offsets.get(index, 0)
            lp, self._offsets[index] = completion_logprobs(
                self.st, token_ids, entries, offset, opens, pieces, generated, self._prompt(index).pieces if generated else None,
                final=delta.finish_reason is not None,
            )
        if not (text or lp or delta.finish_reason):
            return []
        return [{"index": index, "text": text, "logprobs": lp, "finish_reason": delta.finish_reason}]

    def finished(self, index: int, choice: Choice) -> dict[str, Any]:
        prompt = self._prompt(index)
        text, lp = "".join(choice.text), None
        if self.logprobs is not None:
            token_ids, entries, generated = choice.token_ids, list(choice.logprobs), 0
            if self.prompt_logprobs:
                prompt_ids, prompt_entries = self._scored_prompt(index, choice.prompt_logprobs)
                token_ids, entries, generated = prompt_ids + token_ids, prompt_entries + entries, len(prompt_ids)
            lp, _ = completion_logprobs(
                self.st, token_ids, entries, 0, self.prompt_logprobs, generated_from=generated,
                prompt_pieces=prompt.pieces if self.prompt_logprobs else None, final=True,
            )
        if self.echo:
            text = prompt.text + text
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": choice.finish_reason}


def _reasoning(text: str) -> dict[str, str]:
    """A message's (or delta's) reasoning, under vLLM's name and the older one DeepSeek and llama.cpp use."""
    return {"reasoning": text, "reasoning_content": text}


def chat_logprobs(st: AppState, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": st.token_text(token_id), "logprob": logprob, "bytes": list(st.token_bytes(token_id))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}


@dataclass(slots=True)
class _Thinking:
    """A streamed choice's reasoning split: the splitter, and logprob entries of text it still holds."""

    splitter: reasoning.ThinkSplitter
    entries: list[TokenLogprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the choice's, counted for usage once it ends


@dataclass(slots=True)
class _HeldChoice:
    """A streamed choice's output under tools: all its text, how much of it went out as content, and
    the logprob entries not sent yet."""

    text: str = ""
    sent: int = 0
    entries: list[TokenLogprob] = field(default_factory=list)


class ChatFormat(Format):
    """/v1/chat/completions: one assistant message per choice; the stream opens with its role."""

    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(
        self,
        st: AppState,
        n: int,
        logprobs: bool,
        functions: list[dict[str, Any]] | None = None,
        tool_mode: Any = "none",
        parallel_tool_calls: bool = True,
        echoed: str = "",
        thinking: bool | None = None,
        include_reasoning: bool = True,
    ):
        self.st, self.n, self.logprobs, self.echoed = st, n, logprobs, echoed
        # A thinking model's <think> block is returned apart, as `reasoning` (reasoning.py): thinking is None
        # where the output is all content, else whether the prompt opened the block. Tool calls are read
        # from the content alone.
        self.thinking, self.include_reasoning = thinking, include_reasoning
        self._thoughts: dict[int, _Thinking] = {}
        self._thought_tokens: dict[int, int] = {}  # each ended choice's reasoning_tokens
        # With tools, what may still become a call is held until the choice ends and is then parsed:
        # tool calls go out as one delta each, which the openai SDK accumulates; under "auto", the
        # text before anything that could be a call streams as content (tools.streamable).
        self.functions, self.tool_mode, self.parallel = functions or [], tool_mode, parallel_tool_calls
        self._held: dict[int, _HeldChoice] = {}

    @property
    def tools(self) -> bool:
        return self.tool_mode != "none"

    def _message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message of a whole choice, and its finish reason ("tool_calls" for calls)."""
        message: dict[str, Any] = {"role": "assistant"}
        if self.thinking is not None:
            thought, text = reasoning.split(text, self.thinking)
            if thought and self.include_reasoning:
                message.update(_reasoning(thought))
        if not self.tools:
            return {**message, "content": text}, finish_reason
        content, calls = tools.parse(text, self.functions, self.tool_mode, self.st.config.tool_call_parser, self.parallel)
        if not calls:
            return {**message, "content": content}, finish_reason
        return {**message, "content": content, "tool_calls": calls}, "tool_calls"

    def opening(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "delta": {"role": "assistant", "content": self.echoed}, "logprobs": None, "finish_reason": None}
            for i in range(self.n)
        ]

    def _content(self, index: int, text: str, entries: list[TokenLogprob]) -> dict[str, Any]:
        lp = chat_logprobs(self.st, entries) if self.logprobs else None
        return {"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}

    def streamed(self, index: int, delta: ChoiceDelta) -> list[dict[str, Any]]:
        out = []
        if self.thinking is not None:
            delta = self._think(index, delta, out)
        if self.tools:
            return out + self._streamed_with_tools(index, delta)
        if delta.text or (self.logprobs and delta.logprobs):
            out.append(self._content(index, delta.text, delta.logprobs))
        if delta.finish_reason:
            out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": delta.finish_reason})
        return out

    def _think(self, index: int, delta: ChoiceDelta, out: list[dict[str, Any]]) -> ChoiceDelta:
        """Split off the delta's reasoning (a chunk of its own, into `out`); the content delta that is left.
        A token's logprob goes out with the piece that completes the text held so far, never before it."""
        state = self._thoughts.get(index)
        if state is None:
            state = self._thoughts[index] = _Thinking(reasoning.ThinkSplitter(self.thinking))
        state.entries.extend(delta.logprobs)
        state.token_ids.extend(delta.token_ids)
        thought, content = state.splitter.feed(delta.text, final=delta.finish_reason is not None)
        if delta.finish_reason is not None:
            self._thought_tokens[index] = self._count_thought(state.token_ids)
        entries: list[TokenLogprob] = []
        if not state.splitter.holding:
            entries, state.entries = state.entries, []
        if thought:
            mine, entries = (entries, []) if not content else ([], entries)  # the last piece's text takes them
            if self.include_reasoning:
                lp = chat_logprobs(self.st, mine) if self.logprobs and mine else None
                out.append({"index": index, "delta": _reasoning(thought), "logprobs": lp, "finish_reason": None})
        return dataclasses.replace(delta, text=content, logprobs=entries)

    def _streamed_with_tools(self, index: int, delta: ChoiceDelta) -> list[dict[str, Any]]:
        held = self._held.setdefault(index, _HeldChoice())
        held.text += delta.text
        held.entries.extend(delta.logprobs)
        if not delta.finish_reason:
            safe = tools.sendable(held.text, self.tool_mode, self.st.config.tool_call_parser)
            if safe <= held.sent:
                return []
            piece, held.sent = held.text[held.sent : safe], safe
            entries = held.entries if safe == len(held.text) else []  # a token's logprob never before its text
            held.entries = [] if entries else held.entries
            return [self._content(index, piece, entries)]
        message, reason = self._message(held.text, delta.finish_reason)
        content = message.get("content") or ""
        rest = tools.content_rest(content, held.text, held.sent)
        body: dict[str, Any] = {"content": rest} if rest else {}
        if "tool_calls" in message:
            body["tool_calls"] = [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]
        out = []
        if body or (self.logprobs and held.entries):
            lp = chat_logprobs(self.st, held.entries) if self.logprobs else None
            out.append({"index": index, "delta": body, "logprobs": lp, "finish_reason": None})
        return out + [{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]

    def _count_thought(self, token_ids: list[int]) -> int:
        tags = self.st.model.think_ids if self.st.model is not None else None
        return reasoning.thought_tokens(token_ids, bool(self.thinking), tags) if tags else 0

    def usage_details(self) -> dict[str, Any]:
        if self.thinking is None:
            return {}
        return {"completion_tokens_details": {"reasoning_tokens": sum(self._thought_tokens.values())}}

    def finished(self, index: int, choice: Choice) -> dict[str, Any]:
        if self.thinking is not None:
            self._thought_tokens[index] = self._count_thought(choice.token_ids)
        message, reason = self._message("".join(choice.text), choice.finish_reason)
        if self.echoed:
            message["content"] = self.echoed + (message["content"] or "")
        return {
            "index": index,
            "message": message,
            "logprobs": chat_logprobs(self.st, choice.logprobs) if self.logprobs else None,
            "finish_reason": reason,
        }
