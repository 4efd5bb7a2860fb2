"""Per-request generation settings, validated once at the API edge and read by the sampler."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style, over prompt and output
    presence_penalty: float = 0.0  # OpenAI-style, over output only
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    logprobs: int | None = None  # None: none; k: the chosen token plus the k most likely
    prompt_logprobs: bool = False  # echo with logprobs: score the prompt too
    grammar: tuple[str, str] | None = None  # constrained decoding (engine/grammar.py GrammarSpec)
    extra_eos_ids: tuple[int, ...] = field(default=())  # filled by the engine from the model

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )
