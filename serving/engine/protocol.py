"""The types that cross the pipe between the API process and the engine process.

API -> engine: AddRequest, AbortRequest, Shutdown.
Engine -> API: Ready or LoadFailed once, then StepOutputs after steps and Idle when the engine runs
out of work, and Rejected for a request it refuses. Everything is a pickled slotted dataclass.

The engine speaks tokens only: text (detokenization, stop strings) is the API process's work
(output_processor.py), off the engine's step loop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from serving.engine.sampling_params import SamplingParams


@dataclass(slots=True, frozen=True)
class AdapterInfo:
    """A LoRA adapter served beside the model (--lora-modules)."""

    name: str  # what clients send as `model`
    id: int  # SamplingParams.adapter
    source: str  # its directory or Hub id
    rank: int


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """What the API process needs to know about the loaded model."""

    name: str
    max_model_len: int
    vocab_size: int
    architecture: str
    device: str
    dtype: str
    directory: str  # where config and tokenizer files are (after any download)
    gguf_file: str | None
    kv_cache_tokens: int
    prefix_caching: bool
    kv_block_size: int  # tokens per KV-cache block
    hidden_size: int  # an embedding's dimensions (/v1/embeddings)
    generates: bool = True  # False: an embedding model's checkpoint, with no output projection
    engine_threads: int = 1  # the engine's compute threads (torch's and the C kernels')
    engine_cpus: tuple[int, ...] = ()  # cores the engine pinned itself to (serving/cpus.py); () if none
    adapters: tuple[AdapterInfo, ...] = ()  # LoRA adapters, served under their own names
    weight_bytes: int = 0  # the weights as held in memory (quantized ones at their packed size)


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(slots=True)
class SequenceOutput:
    """What one sequence produced since its last output: the unit streamed to the API process.

    finish_reason "stop" means the last token is an EOS or stop token id (the engine's token-level
    stops); stop strings are found by the API process, which then aborts the sequence."""

    request_id: str
    index: int  # choice index within the request
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, with the first output
    error: str | None = None
    embedding: bytes | None = None  # SamplingParams.embed: the prompt's embedding, float32 (native order)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_outputs(a: SequenceOutput, b: SequenceOutput) -> SequenceOutput:
    """Two consecutive outputs of one sequence as one."""
    return replace(
        b,
        token_ids=a.token_ids + b.token_ids,
        logprobs=a.logprobs + b.logprobs,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
    )


def coalesce(outputs: list[SequenceOutput]) -> list[SequenceOutput]:
    """Merge outputs of the same sequence, keeping each sequence's order."""
    merged: dict[tuple[str, int], SequenceOutput] = {}
    for out in outputs:
        key = (out.request_id, out.index)
        merged[key] = merge_outputs(merged[key], out) if key in merged else out
    return list(merged.values())


@dataclass(slots=True)
class StepStats:
    batch_size: int
    num_tokens: int
    num_waiting: int
    num_running: int
    kv_usage: float
    num_preempted: int
    duration: float
    prefix_queries: int = 0  # prompt tokens of newly admitted requests looked up in the prefix cache
    prefix_hits: int = 0  # ... and found there
    # Running totals since start-up: outputs of several steps may travel as one message with the
    # last step's stats, and counters built from these lose nothing.
    preempted_total: int = 0
    prefix_queries_total: int = 0
    prefix_hits_total: int = 0
    # LoRA adapters with sequences running, and waiting (names, sorted), and how many are loaded: only
    # where adapters are served (vllm:lora_requests_info, which LoRA-aware routers read).
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    adapters_loaded: int = 0


class RequestRejected(Exception):
    """The engine refused a request for a reason that is the client's (a 400 at the API)."""


# -- API -> engine ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    n: int = 1


@dataclass(slots=True, frozen=True)
class AbortRequest:
    request_id: str
    indices: tuple[int, ...] | None = None  # None: every choice of the request


@dataclass(slots=True, frozen=True)
class LoadAdapter:
    """Serve the LoRA adapter in `directory` under `adapter_id` (answered with AdapterLoaded)."""

    request_id: str
    adapter_id: int
    directory: str
    name: str


@dataclass(slots=True, frozen=True)
class UnloadAdapter:
    adapter_id: int


@dataclass(slots=True, frozen=True)
class Shutdown:
    pass


# -- engine -> API ---------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Ready:
    info: ModelInfo


@dataclass(slots=True, frozen=True)
class LoadFailed:
    message: str


@dataclass(slots=True, frozen=True)
class StepOutputs:
    outputs: list[SequenceOutput]
    stats: StepStats
    received: int  # sequences the engine has taken in so far


@dataclass(slots=True, frozen=True)
class Idle:
    stats: StepStats
    received: int


@dataclass(slots=True, frozen=True)
class AdapterLoaded:
    request_id: str
    rank: int
    error: str | None = None  # the adapter cannot be served, and why (the client's fault: a 400)


@dataclass(slots=True, frozen=True)
class Rejected:
    request_id: str
    message: str
    client_error: bool  # True: the request's own fault (400); False: an engine bug (500)
