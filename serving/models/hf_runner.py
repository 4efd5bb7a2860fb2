"""Fallback runner for any transformers causal LM the native model does not cover.

Each sequence keeps its own transformers KV cache and runs its own forward pass: slower than
the packed native path, but it serves every architecture transformers knows, with that model's
exact numerics. Admission control still counts KV blocks, so memory limits hold the same way.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel

from serving.engine.sequence import Sequence


class TransformersRunner:
    def __init__(self, model: PreTrainedModel, device: torch.device):
        self.model = model.eval()
        self.device = device
        self.vocab_size = model.config.get_text_config().vocab_size
        self._caches: dict[int, DynamicCache] = {}
        # transformers renamed past_key_values to cache in 5.x; pass whichever this version takes.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def release(self, seq: Sequence) -> None:
        self._caches.pop(seq.seq_id, None)

    @torch.inference_mode()
    def execute(self, items: list[tuple[Sequence, int]], logit_rows: list[int]) -> torch.Tensor:
        per_seq: list[torch.Tensor] = []
        for seq, n in items:
            start = seq.num_cached
            if start == 0:
                self._caches[seq.seq_id] = DynamicCache(config=self.model.config)
            ids = torch.tensor([seq.all_token_ids[start : start + n]], device=self.device)
            out = self.model(
                input_ids=ids,
                cache_position=torch.arange(start, start + n, device=self.device),
                use_cache=True,
                **{self._cache_kwarg: self._caches[seq.seq_id]},
            )
            per_seq.append(out.logits[0])
        logits = torch.cat(per_seq)
        return logits[torch.tensor(logit_rows, dtype=torch.long, device=self.device)].float()
