"""What a model runner computes in one step, and the interface the engine drives it through.

The engine describes a step as chunks of token ids, each with its position and the KV-cache blocks
of its stream; a runner turns that into logits for the packed rows the engine asks for. Runners
know nothing of requests, sequences or scheduling: `NativeRunner` (native.py) packs every chunk
into one forward pass of our paged model, `TransformersRunner` (hf_runner.py) serves any other
causal LM through transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(slots=True)
class ForwardChunk:
    key: int  # stable id of the token stream (the transformers runner keys its caches by it)
    token_ids: list[int]  # tokens to compute, at positions start, start + 1, ...
    start: int  # tokens of this stream before token_ids[0], whose K/V are already in the cache
    block_table: Sequence[int]  # the stream's KV-cache blocks, covering start + len(token_ids) tokens (an
    # array('q') from the engine: step inputs copy it as raw memory)
    decode: bool  # the scheduler's word: one new token after a fully cached context, never inferred
    adapter: int = 0  # the LoRA adapter its stream runs with (lora.py); 0: the base model


class ModelRunner(Protocol):
    model: torch.nn.Module
    device: torch.device
    vocab_size: int
    hidden_size: int  # the width of run()'s hidden states: an embedding's dimensions
    generates: bool  # False where the checkpoint has no output projection: embeddings only
    kv_bytes_per_token: int  # what one token's K and V cost across all layers
    supports_prefix_caching: bool  # whether chunks may start after blocks another stream computed

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Allocate the paged KV cache once its size is known (after weights are loaded)."""
        ...

    def execute(self, chunks: list[ForwardChunk], logit_rows: list[int]) -> torch.Tensor:
        """Run the step; return float32 logits [len(logit_rows), vocab] for those packed-token rows."""
        ...

    def run(
        self, chunks: list[ForwardChunk], logit_rows: list[int], hidden_rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """execute, and also the final (normed) hidden states [len(hidden_rows), hidden] of those rows,
        float32: what embeddings are pooled from."""
        ...

    def release(self, key: int) -> None:
        """The stream left the batch (finished, aborted or preempted): drop any state kept for it."""
        ...


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
