"""Incremental detokenization with stop strings.

Text is decoded in a sliding window that starts a few tokens back, so that tokenizers which
strip a leading space or merge bytes across tokens still give exactly the text a full decode
would. Text that could be the start of a stop string is held back until it is known not to be
one, so a stop string is never emitted, even when it spans several tokens.
"""

from __future__ import annotations

from typing import Protocol

# Tokens of prompt context kept so the first generated token decodes as it would mid-text.
_CONTEXT_TOKENS = 6


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class _BackendDecoder:
    """A fast tokenizer's Rust `tokenizers.Tokenizer` called directly: what transformers' decode
    returns when it cleans up no spaces, without its Python layers (measured 3.1 -> 1.2 us a call
    for SmolLM2's tokenizer; a generated token takes two calls, in the API process)."""

    __slots__ = ("_backend",)

    def __init__(self, backend: Decoder):
        self._backend = backend

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)


def fast_decoder(tokenizer: Decoder) -> Decoder:
    """The quickest decoder giving exactly `tokenizer.decode`'s text: its backend when it is a fast
    tokenizer with no clean-up of spaces, else the tokenizer itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer
    return _BackendDecoder(backend)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._stop = tuple(s for s in stop if s)
        self.text = ""  # all text decoded so far (cut at a stop string once one is found)
        self._emitted = 0
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that ended the text, once one has

    @property
    def emitted(self) -> int:
        """How much of `text` has been returned to the caller."""
        return self._emitted

    def add_token(self, token_id: int) -> str:
        """Feed one generated token; returns the text that is now safe to emit (may be empty)."""
        self._tokens.append(token_id)
        self._decode_pending(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """The sequence ended without a stop string: emit everything still held back."""
        if not self.stopped:
            self._decode_pending(final=True)
        return self._release(final=True)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._tokens[start:end], skip_special_tokens=True)

    def _decode_pending(self, final: bool) -> None:
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset)
        # A trailing U+FFFD means a multi-byte character is split across tokens: wait for the rest.
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        if self._stop:
            found = [(i, s) for s in self._stop if (i := self.text.find(s, self._emitted)) >= 0]
            if found:
                cut, self.stop_string = min(found, key=lambda hit: hit[0])
                self.text = self.text[:cut]
                self.stopped = True
                end = cut
            elif not final:
                end -= self._held_back()
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def _held_back(self) -> int:
        """Length of the longest unemitted suffix that is a proper prefix of some stop string."""
        pending = len(self.text) - self._emitted
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, pending), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
