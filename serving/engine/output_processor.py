"""Text for the API: each sequence's token outputs, detokenized incrementally, cut at stop strings.

Runs in the API process, off the engine's step loop (as vLLM's v1 engine does it): the engine
sends token ids and stops sequences on tokens (EOS, stop token ids, lengths); here they become text,
and a stop string ends the choice at once. The engine is then told to abort that sequence, and
tokens it produced meanwhile are dropped, so the client sees exactly the tokens up to the stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.engine.detokenizer import Decoder, IncrementalDetokenizer
from serving.engine.protocol import FinishReason, SequenceOutput, TokenLogprob


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice produced since its last delta, as the API streams it."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class ChoiceText:
    """One choice's text state."""

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], stop: tuple[str, ...]):
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, stop)
        self.finished = False
        self.needs_abort = False  # a stop string ended it while the engine still runs the sequence

    def process(self, out: SequenceOutput) -> ChoiceDelta | None:
        """The delta for the client, or None once the choice has already finished."""
        if self.finished:
            return None
        detok = self._detokenizer
        parts: list[str] = []
        kept = len(out.token_ids)
        reason = out.finish_reason
        for i, token in enumerate(out.token_ids):
            if i == len(out.token_ids) - 1 and reason == "stop":
                break  # an EOS or stop token id: counted, never shown as text
            parts.append(detok.add_token(token))
            if detok.stopped:
                kept, reason = i + 1, "stop"
                self.needs_abort = not out.finished
                break
        if reason is not None:
            parts.append(detok.flush())
            self.finished = True
        return ChoiceDelta(
            index=out.index,
            text="".join(parts),
            token_ids=out.token_ids[:kept],
            logprobs=out.logprobs[:kept],
            finish_reason=reason,
            cached_tokens=out.cached_tokens,
            prompt_logprobs=out.prompt_logprobs,
            error=out.error,
        )
