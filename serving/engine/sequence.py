"""A sequence: one generation stream (a request with n=3 has three), its tokens and its KV blocks."""

from __future__ import annotations

import enum
from array import array
from dataclasses import dataclass, field
from typing import Any

import torch

from serving.engine.protocol import FinishReason, TokenLogprob
from serving.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # choice index within its request
    token_ids: list[int]  # the prompt, then every generated token
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo + logprobs: scores gathered so far
    # Its KV blocks, as int64s: a step's inputs copy the tables of its batch as raw memory (host_inputs.py).
    block_table: array = field(default_factory=lambda: array("q"))
    num_cached: int = 0  # tokens whose K/V are in the cache
    # Tokens to compute before sampling starts, set at each admission: the prompt, or after a
    # preemption the prompt and every output so far. A sequence decodes once they are cached.
    prefill_end: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # content hashes of its full blocks, in order
    num_registered: int = 0  # leading blocks already offered to the prefix cache
    cached_prompt_tokens: int | None = None  # prefix-cache hit at first admission; None until admitted
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    grammar: Any = None  # its xgrammar matcher, advanced by each sampled token (engine/grammar.py)
    thinking: bool = False  # inside a think block, where its grammar does not hold (SamplingParams.think)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.prompt_len]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def constrained(self) -> Any:
        """The matcher that masks its next token: none inside a think block."""
        return None if self.thinking else self.grammar

    @property
    def may_open_thought(self) -> int | None:
        """The <think> id its first token may be, beside what its grammar allows (SamplingParams.think)."""
        think = self.params.think
        if think is None or think[2] or self.grammar is None or self.num_output_tokens:
            return None
        return think[0]

    @property
    def is_decoding(self) -> bool:
        """Prefill done: each step computes the one token sampled last."""
        return self.num_cached >= self.prefill_end

    def scored_positions(self, start: int, end: int) -> range:
        """The positions computed from `start` up to `end` whose logits score the prompt's next token
        (echo with logprobs). Positions scored before a preemption are not scored again."""
        if self.prompt_logprobs is None:
            return range(0)
        return range(max(start, len(self.prompt_logprobs) - 1), min(end, self.prompt_len - 1))

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
