"""Fallback runner for any transformers causal LM the native model does not cover.

Each stream keeps its own transformers KV cache and runs its own forward pass: slower than the
packed native path, but it serves every architecture transformers knows, with that model's exact
numerics. The engine's block manager still counts KV blocks, so admission and memory limits hold
the same way; prefix caching does not apply (a per-stream cache cannot share blocks).
"""

from __future__ import annotations

import inspect

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel

from serving.models.quant import quantize_linears
from serving.models.runner import ForwardChunk, kv_bytes_per_token
from serving.models.source import ModelSource


class TransformersRunner:
    supports_prefix_caching = False

    def __init__(self, model: PreTrainedModel, device: torch.device, dtype: torch.dtype, generates: bool = True):
        self.model = model.eval()
        self.device = device
        text = model.config.get_text_config()
        self.vocab_size = text.vocab_size
        self.hidden_size = text.hidden_size
        self.generates = generates
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.kv_bytes_per_token = kv_bytes_per_token(text.num_hidden_layers, heads, head_dim, dtype)
        self._caches: dict[int, DynamicCache] = {}
        # transformers renamed past_key_values to cache in 5.x; pass whichever this version takes.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Each stream's cache grows inside transformers; the engine's block count is what bounds it."""

    def release(self, key: int) -> None:
        self._caches.pop(key, None)

    def execute(self, chunks: list[ForwardChunk], logit_rows: list[int]) -> torch.Tensor:
        return self.run(chunks, logit_rows, [])[0]

    @torch.inference_mode()
    def run(
        self, chunks: list[ForwardChunk], logit_rows: list[int], hidden_rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        per_chunk: list[torch.Tensor] = []
        hidden: list[torch.Tensor] = []
        for chunk in chunks:
            start, n = chunk.start, len(chunk.token_ids)
            if start == 0:
                self._caches[chunk.key] = DynamicCache(config=self.model.config)
            out = self.model(
                input_ids=torch.tensor([chunk.token_ids], device=self.device),
                cache_position=torch.arange(start, start + n, device=self.device),
                use_cache=True,
                output_hidden_states=bool(hidden_rows),  # the last is the final norm's output
                **{self._cache_kwarg: self._caches[chunk.key]},
            )
            per_chunk.append(out.logits[0])
            if hidden_rows:
                hidden.append(out.hidden_states[-1][0])
        logits = torch.cat(per_chunk)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        if not hidden_rows:
            return logits[rows].float(), torch.empty(0)
        picked = torch.tensor(hidden_rows, dtype=torch.long, device=self.device)
        return logits[rows].float(), torch.cat(hidden)[picked].float()


def build_transformers_runner(
    source: ModelSource, device: torch.device, dtype: torch.dtype, quantization: str, dummy: bool = False
) -> TransformersRunner:
    kwargs = {"gguf_file": source.gguf_file.name} if source.gguf_file is not None else {}
    generates = True
    if dummy:  # random weights of the config's shapes (transformers' own initialisation)
        config = AutoConfig.from_pretrained(source.directory)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    else:
        model, loading = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, output_loading_info=True, **kwargs)
        model = model.to(device)
        # A base model's checkpoint (an embedding model's) has no output projection: transformers made one up.
        generates = not any(key.startswith("lm_head.") for key in loading.get("missing_keys", ()))
    if quantization != "none":
        quantize_linears(model, quantization, skip=lambda name: name == "lm_head")
    return TransformersRunner(model, device, dtype, generates)
