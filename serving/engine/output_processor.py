"""Text for the API: each sequence's token outputs, detokenized incrementally, cut at stop strings.

Runs in the API process, off the engine's step loop (as vLLM's v1 engine does it): the engine
sends token ids and stops sequences on tokens (EOS, stop token ids, lengths); here they become text,
and a stop string ends the choice at once. The engine is then told to abort that sequence, and
tokens it produced meanwhile are dropped, so the client sees exactly the tokens up to the stop.

A token (with its logprob) is shown with the text it starts: while its text is held back as a
possible start of a stop string, so is the token; a token whose text starts inside the stop string
that ends the choice is never shown, nor is an end token (EOS, a stop token id): OpenAI returns
logprobs only for the text it returns. Usage counts them all (ChoiceDelta.num_tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from serving.engine.detokenizer import Decoder, IncrementalDetokenizer
from serving.engine.protocol import FinishReason, SequenceOutput, TokenLogprob


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice produced since its last delta, as the API streams it."""

    index: int
    text: str
    token_ids: list[int]  # the tokens whose text starts in this delta's text (with logprobs: theirs)
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    num_tokens: int = 0  # tokens generated since the last delta, shown or not (usage counts them)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    embedding: bytes | None = None  # an embedding request's (SequenceOutput.embedding)
    stop_string: str | None = None  # the stop string that ended the choice (finish_reason "stop")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class ChoiceText:
    """One choice's text state."""

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], stop: tuple[str, ...]):
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, stop)
        self.finished = False
        self.needs_abort = False  # a stop string ended it while the engine still runs the sequence
        # Generated tokens not shown yet: (where their text starts, token id, logprob entry).
        self._pending: deque[tuple[int, int, TokenLogprob | None]] = deque()

    def process(self, out: SequenceOutput) -> ChoiceDelta | None:
        """The delta for the client, or None once the choice has already finished."""
        if self.finished:
            return None
        detok = self._detokenizer
        parts: list[str] = []
        kept = len(out.token_ids)
        reason = out.finish_reason
        scored = len(out.logprobs) == len(out.token_ids)
        shown: list[tuple[int, TokenLogprob | None]] = []
        for i, token in enumerate(out.token_ids):
            if i == len(out.token_ids) - 1 and reason == "stop":
                break  # an EOS or stop token id: counted, never shown (it has no text)
            entry = out.logprobs[i] if scored else None
            self._pending.append((len(detok.text), token, entry))
            parts.append(detok.add_token(token))
            if detok.stopped:
                kept, reason = i + 1, "stop"
                self.needs_abort = not out.finished
                break
            self._show(shown, detok.emitted)
        if reason is not None:
            parts.append(detok.flush())
            self._show(shown, len(detok.text) if detok.stopped else None)
            self._pending.clear()  # what is left starts inside the stop string
            self.finished = True
        return ChoiceDelta(
            index=out.index,
            text="".join(parts),
            token_ids=[token for token, _ in shown],
            logprobs=[entry for _, entry in shown if entry is not None],
            finish_reason=reason,
            num_tokens=kept,
            cached_tokens=out.cached_tokens,
            prompt_logprobs=out.prompt_logprobs,
            error=out.error,
            embedding=out.embedding,
            stop_string=detok.stop_string if reason is not None else None,
        )

    def _show(self, shown: list[tuple[int, TokenLogprob | None]], limit: int | None) -> None:
        """Move the held tokens whose text starts before `limit` (all of them: None) to `shown`."""
        pending = self._pending
        while pending and (limit is None or pending[0][0] < limit):
            _, token, entry = pending.popleft()
            shown.append((token, entry))
