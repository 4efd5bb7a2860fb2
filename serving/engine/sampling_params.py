"""Per-request generation settings, validated once at the API edge and read by the sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

# A temperature this small is greedy decoding (as vLLM's 1e-5): dividing float32 logits by it overflows
# them (1e-38 and below is zero in float32: inf and NaN, then token 0 every time).
GREEDY_BELOW = 1e-5
# A repetition penalty is applied as at least this: a smaller one turns logits into infinities.
MIN_REPETITION_PENALTY = 1e-4
# Most alternatives reported per token (OpenAI's limit for logprobs and top_logprobs).
MAX_LOGPROBS = 20


@dataclass(slots=True, frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style, over prompt and output
    repetition_window: int = 0  # ... over their last N tokens only (llama.cpp's repeat_last_n); 0: all of them
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
    # A thinking model's (<think> id, </think> id, whether the prompt opened the block): the grammar holds
    # outside the block only, so the model thinks freely first. Unopened, the first token may open it.
    think: tuple[int, int, bool] | None = None
    embed: bool = False  # no generation: the prompt's last hidden state, L2-normalized (/v1/embeddings)
    adapter: int = 0  # the LoRA adapter it runs with (ModelInfo.adapters' id); 0: the base model
    extra_eos_ids: tuple[int, ...] = field(default=())  # filled by the engine from the model

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )
