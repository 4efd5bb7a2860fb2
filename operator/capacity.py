"""Will the model fit? Weights plus the KV cache for engine.maxSeqLen x maxBatchSize, against the memory of
the GPU product the pods ask for, computed before any pod is scheduled (and crash-loops on OOM).

Pure arithmetic over the model's config.json and its weight files' size (read by the resolve step, hub.py);
reported as status.capacity, and as `Degraded: DoesNotFit` with the numbers when even one full-length
sequence cannot be held.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kubernetes.utils.quantity import parse_quantity
from llm_operator.spec import LLMDeploymentSpec

GIB = 1 << 30
MIB = 1 << 20
# Memory each product reports (nvidia-smi, MiB), keyed by the nvidia.com/gpu.product label GPU feature
# discovery sets. resources.gpu.memory overrides it (other products, MIG slices, other vendors).
GPU_MEMORY_MIB = {
    "NVIDIA-H200": 143771,
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-H100-PCIe": 81559,
    "NVIDIA-H100-NVL": 95830,
    "NVIDIA-A100-SXM4-80GB": 81920,
    "NVIDIA-A100-80GB-PCIe": 81920,
    "NVIDIA-A100-SXM4-40GB": 40960,
    "NVIDIA-A100-PCIE-40GB": 40960,
    "NVIDIA-L40S": 46068,
    "NVIDIA-L40": 46068,
    "NVIDIA-A10G": 23028,
    "NVIDIA-A10": 23028,
    "NVIDIA-L4": 23034,
    "NVIDIA-RTX-A6000": 49140,
    "Tesla-V100-SXM2-32GB": 32768,
    "Tesla-V100-SXM2-16GB": 16384,
    "Tesla-T4": 15360,
}
# What the engine may plan to use of a GPU, and what it keeps for the CUDA context, activations and the
# allocator's slack at the largest batch (a planning figure; the server measures its own at start).
MEMORY_FRACTION = 0.90
RESERVED_BYTES = 1 * GIB
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Bytes per weight of the engine's weight-only quantizations (blocks of 32 with a 16-bit scale).
QUANT_BYTES = {"q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the resolve step learned of the model (hub.py)."""

    config: dict[str, Any]  # config.json
    weight_bytes: int  # the weight files' total size, as stored
    gguf_bytes: dict[str, int] = field(default_factory=dict)  # each GGUF file's size, for hf.ggufFile's choice

    def choosing(self, gguf_file: str | None) -> ModelFacts:
        """The facts of serving `gguf_file` (hf.ggufFile) of the repo, where it is one of its files."""
        if gguf_file is None or gguf_file not in self.gguf_bytes:
            return self
        return replace(self, weight_bytes=self.gguf_bytes[gguf_file])


@dataclass(frozen=True, slots=True)
class Capacity:
    gpu_memory_bytes: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    max_context_tokens: int  # tokens the KV cache holds, over all sequences
    max_concurrent_sequences: int  # full-length (maxSeqLen) sequences at once, at most maxBatchSize
    fits: bool
    message: str

    def status(self) -> dict[str, Any]:
        return {
            "gpuMemoryBytes": self.gpu_memory_bytes,
            "weightBytes": self.weight_bytes,
            "kvCacheBytes": self.kv_cache_bytes,
            "kvBytesPerToken": self.kv_bytes_per_token,
            "maxContextTokens": self.max_context_tokens,
            "maxConcurrentSequences": self.max_concurrent_sequences,
            "fits": self.fits,
            "message": self.message,
        }


def gpu_memory_bytes(spec: LLMDeploymentSpec, table: dict[str, int] | None = None) -> int | None:
    """One GPU's memory: resources.gpu.memory, else the product's in `table` (the operator's --gpu-memory
    entries, in bytes), else in GPU_MEMORY_MIB."""
    gpu = spec.resources.requested_gpu
    if gpu is None:
        return None
    if gpu.memory is not None:
        return int(parse_quantity(str(gpu.memory)))
    if gpu.product and table and gpu.product in table:
        return table[gpu.product]
    mib = GPU_MEMORY_MIB.get(gpu.product or "")
    return mib * MIB if mib is not None else None


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    nested = config.get("text_config")  # multimodal configs nest the language model's
    return nested if isinstance(nested, dict) and nested else config


def positive_int(config: dict[str, Any], *keys: str) -> int | None:
    """The first of `keys` the mapping sets to a positive whole number (not a bool), else None."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int) -> int | None:
    """K and V for every layer: 2 x layers x kv heads x head dim x element size. None when the config
    does not state them (architectures without a KV cache of this shape, configs that leave the
    language model's fields to library defaults): nothing to plan with."""
    c = _text_config(config)
    layers = positive_int(c, "num_hidden_layers", "n_layer")
    heads = positive_int(c, "num_attention_heads", "n_head")
    kv_heads = positive_int(c, "num_key_value_heads") or heads
    hidden = positive_int(c, "hidden_size", "n_embd")
    head_dim = positive_int(c, "head_dim") or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def _engine_dtype_bytes(spec: LLMDeploymentSpec) -> int:
    # On a GPU, "auto" runs float16 checkpoints in float16 and everything else in bfloat16 (the server's
    # resolve_dtype): two bytes either way.
    return DTYPE_BYTES[spec.engine.dtype] if spec.engine.dtype != "auto" else 2


def served_weight_bytes(spec: LLMDeploymentSpec, facts: ModelFacts) -> int:
    """The weights as the engine holds them: the stored size rescaled to the engine's dtype or quantization."""
    stored = _text_config(facts.config).get("torch_dtype") or facts.config.get("torch_dtype") or "bfloat16"
    per_weight = DTYPE_BYTES.get(stored, 2) if isinstance(stored, str) else 2
    target = QUANT_BYTES.get(spec.engine.quantization) or _engine_dtype_bytes(spec)
    return int(facts.weight_bytes * target / per_weight)


def fit(spec: LLMDeploymentSpec, facts: ModelFacts, table: dict[str, int] | None = None) -> Capacity | None:
    """The plan on one GPU of the requested product, or None when that product's memory is unknown (CPU
    pods, a product missing from the table without resources.gpu.memory) or the config does not state
    the KV cache's shape."""
    memory = gpu_memory_bytes(spec, table)
    per_token = kv_bytes_per_token(facts.config, _engine_dtype_bytes(spec))
    if memory is None or per_token is None:
        return None
    weights = served_weight_bytes(spec, facts)
    budget = int(memory * MEMORY_FRACTION) - RESERVED_BYTES - weights
    engine = spec.engine
    tokens = max(budget, 0) // per_token
    sequences = min(engine.max_batch_size, tokens // engine.max_seq_len)
    wanted = engine.max_batch_size * engine.max_seq_len
    kv_bytes = min(tokens, wanted) * per_token
    gib = lambda b: f"{b / GIB:.1f} GiB"  # noqa: E731
    plan = (
        f"weights {gib(weights)} + KV cache {per_token // 1024} KiB/token on {gib(memory)} "
        f"({MEMORY_FRACTION:.0%} planned, {gib(RESERVED_BYTES)} reserved)"
    )
    if sequences < 1:
        short = (
            f"the weights alone exceed the GPU's planned memory by {gib(-budget)}"
            if budget <= 0
            else f"the KV cache holds {tokens} tokens, less than one engine.maxSeqLen ({engine.max_seq_len}) sequence"
        )
        message = (
            f"does not fit: {short}; {plan}. Use a larger GPU (resources.gpu.product), engine.quantization, "
            "or a smaller engine.maxSeqLen"
        )
        return Capacity(memory, weights, per_token, kv_bytes, tokens, 0, False, message)
    message = f"{sequences} sequences of {engine.max_seq_len} tokens ({tokens} tokens of KV cache); {plan}"
    if sequences < engine.max_batch_size:
        message += f"; engine.maxBatchSize {engine.max_batch_size} is more than fits at full length"
    return Capacity(memory, weights, per_token, kv_bytes, tokens, sequences, True, message)
