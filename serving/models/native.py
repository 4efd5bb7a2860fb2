"""The native runner: every chunk of a step packed into one forward pass of our paged Llama-family
model (llama.py), and the builder that loads such a model from safetensors or GGUF."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from serving.models import gguf
from serving.models.attention import AttentionBatch, PrefillChunk
from serving.models.llama import LlamaForCausalLM
from serving.models.quant import quantize_linears
from serving.models.runner import ForwardChunk, kv_bytes_per_token
from serving.models.source import ModelSource
from serving.models.weights import iter_safetensors, load_into, safetensors_files


class NativeRunner:
    supports_prefix_caching = True

    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.device = device
        self.dtype = dtype
        s = model.shape
        self.vocab_size = s.vocab_size
        self.kv_bytes_per_token = kv_bytes_per_token(s.num_layers, s.num_kv_heads, s.head_dim, dtype)
        self.block_size = 0
        self.kv_cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        s = self.model.shape
        slots = num_blocks * block_size
        self.block_size = block_size
        self.kv_cache = [
            (
                torch.zeros(slots, s.num_kv_heads, s.head_dim, device=self.device, dtype=self.dtype),
                torch.zeros(slots, s.num_kv_heads, s.head_dim, device=self.device, dtype=self.dtype),
            )
            for _ in range(s.num_layers)
        ]

    def release(self, key: int) -> None:
        """KV blocks belong to the engine's block manager; nothing is kept per stream here."""

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _decode_blocks(self, chunks: list[ForwardChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, max_blocks] block tables of the decoding chunks (padding points at block 0, masked out
        by length) and [B] context lengths (query included)."""
        lengths = [c.start + 1 for c in chunks]
        width = max(-(-n // self.block_size) for n in lengths)
        tables = [table + [0] * (width - len(table)) for table in (c.block_table[:width] for c in chunks)]
        return (
            torch.tensor(tables, dtype=torch.long, device=self.device),
            torch.tensor(lengths, dtype=torch.long, device=self.device),
        )

    @torch.inference_mode()
    def execute(self, chunks: list[ForwardChunk], logit_rows: list[int]) -> torch.Tensor:
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        decode_rows: list[int] = []
        decoding: list[ForwardChunk] = []
        prefills: list[PrefillChunk] = []
        dev = self.device
        for chunk in chunks:
            n = len(chunk.token_ids)
            start, end, row = chunk.start, chunk.start + n, len(token_ids)
            token_ids.extend(chunk.token_ids)
            positions.extend(range(start, end))
            slot_mapping.extend(self._slots(chunk.block_table, start, end))
            if chunk.decode:
                decode_rows.append(row)
                decoding.append(chunk)
            else:
                context = torch.tensor(self._slots(chunk.block_table, 0, end), dtype=torch.long, device=dev)
                prefills.append(PrefillChunk(slice(row, row + n), start, context))
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev), block_size=self.block_size, prefills=prefills
        )
        if decoding:
            batch.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=dev)
            batch.decode_blocks, batch.decode_lens = self._decode_blocks(decoding)
            batch.decodes_first = decode_rows == list(range(len(decode_rows)))
        hidden = self.model(
            torch.tensor(token_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.kv_cache,
            batch,
        )
        rows = torch.tensor(logit_rows, dtype=torch.long, device=dev)
        return self.model.logits(hidden.index_select(0, rows)).float()


def build_native_runner(
    config: PretrainedConfig,
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    max_len: int,
    quantization: str,
) -> NativeRunner:
    """Our model, built on the meta device and materialised on `device`, weights copied in.
    Raises UnsupportedModel when the checkpoint needs the transformers runner."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions=max_len)
    model = model.to(dtype).to_empty(device=device)
    model.rotary.build_tables(device)
    optional = ("lm_head.weight",) if model.shape.tie_word_embeddings else ()
    if source.gguf_file is not None:
        tensors = gguf.iter_gguf_tensors(source.gguf_file, dtype)
    else:
        tensors = iter_safetensors(safetensors_files(source.directory))
    load_into(model, tensors, optional, stacked=model.stacked_params())
    if quantization != "none":
        quantize_linears(model, quantization)
    return NativeRunner(model.eval(), device, dtype)
