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

    @torch.inference_mode()
    def execute(self, items: list[tuple[Sequence, int]], logit_rows: list[int]) -> torch.Tensor:
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        decode_rows: list[int] = []
        decode_slots: list[list[int]] = []
        prefills: list[PrefillChunk] = []
        for seq, n in items:
            start, end = seq.num_cached, seq.num_cached + n
            row = len(token_ids)
            token_ids.extend(seq.all_token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(self._slots(seq, start, end))
            context = self._slots(seq, 0, end)
            if n == 1:
                decode_rows.append(row)
                decode_slots.append(context)
            else:
                slots = torch.tensor(context, dtype=torch.long, device=self.device)
                prefills.append(PrefillChunk(slice(row, row + n), start, slots))
        dev = self.device
        batch = AttentionBatch(slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev), prefills=prefills)
        if decode_rows:
            width = max(len(c) for c in decode_slots)
            padded = torch.zeros(len(decode_slots), width, dtype=torch.long)
            for i, c in enumerate(decode_slots):
                padded[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            batch.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=dev)
            batch.decode_slots = padded.to(dev)
            batch.decode_lens = torch.tensor([len(c) for c in decode_slots], dtype=torch.long, device=dev)
        hidden = self.model(
            torch.tensor(token_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            self.kv_cache,
            batch,
        )
        return self.model.logits(hidden[torch.tensor(logit_rows, dtype=torch.long, device=dev)]).float()
