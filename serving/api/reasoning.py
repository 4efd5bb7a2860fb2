"""A reasoning model's thinking, apart from its answer: the `<think>…</think>` block that DeepSeek-R1 (and
its distills), Qwen3, QwQ and SmolLM3 write before they answer.

The chat API returns the block's text as the message's `reasoning` (and `reasoning_content`, the older
name DeepSeek's API and llama.cpp's server use) and only what follows it as `content`, as vLLM does with
a reasoning parser and llama.cpp's server by default. Where the block opens is read from the prompt:
templates of thinking-only models (DeepSeek-R1, Qwen3 *-Thinking-2507) end the prompt with `<think>`
themselves, so the output starts inside the block and holds only its end; otherwise the output thinks
only if it opens with `<think>` (Qwen3's `enable_thinking: false` renders an empty block into the
prompt, and the model answers at once).

A constrained reply (response_format, a forced tool call) thinks first too: the engine holds its grammar
from the token after the block's end (SamplingParams.think), so its content still parses.

One splitter serves a whole response and a stream alike, so the two always agree: fed the text as it
arrives, it hands out what is surely reasoning and surely content, holding back only what could still
be a tag or whitespace at a block's edge (trimmed, as chat UIs show it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

OPEN, CLOSE = "<think>", "</think>"
log = logging.getLogger("fleetlm.api")

ReasoningParser = Literal["auto", "none", "deepseek_r1", "qwen3"]


def tag_ids(tokenizer: Any) -> tuple[int, int] | None:
    """The ids of `<think>` and `</think>` where the tokenizer has each as a token of its own (models that
    think), else None."""
    vocab = tokenizer.get_vocab()
    opening, closing = vocab.get(OPEN), vocab.get(CLOSE)
    return None if opening is None or closing is None else (opening, closing)


def enabled(setting: ReasoningParser, tokenizer: Any, tags: tuple[int, int] | None) -> bool:
    """--reasoning-parser, for a tokenizer with these tag_ids: auto splits for models whose vocabulary has the
    tags; deepseek_r1 and qwen3 (vLLM's names, one format) always; none never. Never where the tags are special
    tokens: generated text is decoded without special tokens, so the block's edges would not be seen (and a
    prompt-opened block would take the whole reply)."""
    if setting == "none":
        return False
    if tags is not None and set(tags) & set(tokenizer.all_special_ids):
        log.warning("the think tags are special tokens, left out of generated text: reasoning is not split off")
        return False
    return setting != "auto" or tags is not None


def opened_by_prompt(prompt: str) -> bool:
    """The chat template ended the prompt inside a think block: the output starts with reasoning."""
    return prompt.rstrip().endswith(OPEN)


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of text that begins the tag (a tag split across deltas)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ThinkSplitter:
    """One choice's text, fed as it arrives, as (reasoning, content) pieces."""

    __slots__ = ("_inside", "_state", "_held", "_reasoning_started")

    def __init__(self, inside: bool):
        self._inside = inside  # the prompt opened the block (a model may open it again: the tag is dropped)
        self._state = "opening"
        self._held = ""  # text not handed out yet
        self._reasoning_started = False  # the block's leading whitespace is behind us

    @property
    def holding(self) -> bool:
        """Whether some text fed so far has not been handed out yet."""
        return bool(self._held)

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """The reasoning and the content that `text` (following all fed before) completes; `final`: the
        choice ends with it, and whatever is held is handed out."""
        held = self._held + text
        reasoning = content = ""
        if self._state == "opening":
            head = held.lstrip()
            if head.startswith(OPEN):
                held, self._state = head[len(OPEN) :], "reasoning"
            elif OPEN.startswith(head) and not final:
                self._held = held  # whitespace, or maybe the tag's beginning
                return "", ""
            else:
                self._state = "reasoning" if self._inside else "content"
        if self._state == "reasoning":
            end = held.find(CLOSE)
            if end >= 0:
                reasoning, held, self._state = held[:end].rstrip(), held[end + len(CLOSE) :], "answer"
            elif final:
                reasoning, held = held.rstrip(), ""
            else:  # hold a tag's possible beginning, and the whitespace before it (trimmed if the block ends)
                cut = len(held[: len(held) - _partial_tag(held, CLOSE)].rstrip())
                reasoning, held = held[:cut], held[cut:]
            if not self._reasoning_started:
                reasoning = reasoning.lstrip()
                self._reasoning_started = bool(reasoning)
        if self._state == "answer":  # the content after the block, its leading whitespace trimmed
            held = held.lstrip()
            if held:
                self._state = "content"
        if self._state == "content":
            content, held = held, ""
        self._held = held
        return reasoning, content


def split(text: str, inside: bool) -> tuple[str | None, str]:
    """A whole output's reasoning (None where there is none) and content."""
    reasoning, content = ThinkSplitter(inside).feed(text, final=True)
    return reasoning or None, content


def thought_tokens(token_ids: Sequence[int], inside: bool, tags: tuple[int, int]) -> int:
    """How many of a reply's tokens are its think block's, tags included (usage's reasoning_tokens): up to
    the `</think>` token, where the prompt opened the block or the reply's first token did."""
    opening, closing = tags
    if not inside and (not token_ids or token_ids[0] != opening):
        return 0
    for count, token in enumerate(token_ids, start=1):
        if token == closing:
            return count
    return len(token_ids)
