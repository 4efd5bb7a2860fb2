"""Model runners: turn one scheduled step into logits.

The engine hands a runner the step's (sequence, token count) pairs and the packed rows whose
logits it needs. `NativeRunner` packs all tokens into one forward pass of our paged model;
`TransformersRunner` (in hf_runner.py) serves any other causal LM through transformers.
"""

from __future__ import annotations

from typing import Protocol

import torch

from serving.engine.sequence import Sequence
from serving.models.attention import AttentionBatch, PrefillChunk
from serving.models.llama import LlamaForCausalLM


class ModelRunner(Protocol):
    vocab_size: int
    device: torch.device

    def execute(self, items: list[tuple[Sequence, int]], logit_rows: list[int]) -> torch.Tensor:
        """Run the step; return logits [len(logit_rows), vocab] for the given packed-token rows."""
        ...

    def release(self, seq: Sequence) -> None:
        """The sequence left the batch (finished, aborted or preempted): drop any state it holds."""
        ...


def kv_bytes_per_token(model: LlamaForCausalLM, dtype: torch.dtype) -> int:
    s = model.shape
    return 2 * s.num_layers * s.num_kv_heads * s.head_dim * torch.finfo(dtype).bits // 8


class NativeRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.device = device
        self.vocab_size = model.shape.vocab_size
        self.block_size = block_size
        s = model.shape
        slots = num_blocks * block_size
        self.kv_cache = [
            (
                torch.zeros(slots, s.num_kv_heads, s.head_dim, device=device, dtype=dtype),
                torch.zeros(slots, s.num_kv_heads, s.head_dim, device=device, dtype=dtype),
            )
            for _ in range(s.num_layers)
        ]

    def release(self, seq: Sequence) -> None:
        """Blocks belong to the block manager; nothing is held here."""

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _decode_blocks(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, max_blocks] block tables of the decoding sequences (padding points at block 0,
        masked out by length) and [B] context lengths."""
        lengths = [s.num_cached + 1 for s in seqs]
        width = max(-(-n // self.block_size) for n in lengths)
        tables = [table + [0] * (width - len(table)) for table in (s.block_table[:width] for s in seqs)]
        return (
            torch.tensor(tables, dtype=torch.long, device=self.device),
            torch.tensor(lengths, dtype=torch.long, device=self.device),
        )

    @torch.inference_mode()
    def execute(self, items: list[tuple[Sequence, int]], logit_rows: list[int]) -> torch.Tensor:
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        decode_rows: list[int] = []
        decoding: list[Sequence] = []
        prefills: list[PrefillChunk] = []
        for seq, n in items:
            start, end = seq.num_cached, seq.num_cached + n
            row = len(token_ids)
            token_ids.extend(seq.all_token_ids[start:end] if n > 1 else (seq.last_token_id,))
            positions.extend(range(start, end))
            slot_mapping.extend(self._slots(seq, start, end))
            if n == 1:
                decode_rows.append(row)
                decoding.append(seq)
            else:
                slots = torch.tensor(self._slots(seq, 0, end), dtype=torch.long, device=self.device)
                prefills.append(PrefillChunk(slice(row, row + n), start, slots))
        dev = self.device
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
        return self.model.logits(hidden.index_select(0, torch.tensor(logit_rows, dtype=torch.long, device=dev))).float()
