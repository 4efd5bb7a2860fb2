"""The native runner: every chunk of a step packed into one forward pass of our paged Llama-family
model (llama.py), and the builder that loads such a model from safetensors or GGUF."""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from serving.models import gguf
from serving.models.attention import AttentionBatch, PrefillChunk
from serving.models.gguf import BlockRows
from serving.models.llama import LlamaForCausalLM
from serving.models.quant import BlockQuantEmbedding, BlockQuantLinear, quantize_linears
from serving.models.runner import ForwardChunk, kv_bytes_per_token
from serving.models.source import ModelSource
from serving.models.weights import (
    count_safetensors,
    iter_safetensors,
    load_into,
    safetensors_files,
    with_progress,
)


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
        self.block_size = block_size
        shape = (2 * s.num_layers, num_blocks * block_size, s.num_kv_heads, s.head_dim)
        if self.device.type == "cpu":
            # Anonymous memory is zero pages the OS commits only when first written: the cache takes
            # RAM as blocks come into use (the block manager hands out low blocks first), not up front.
            self._kv_memory = mmap.mmap(-1, math.prod(shape) * self.dtype.itemsize)
            cache = torch.frombuffer(self._kv_memory, dtype=self.dtype).view(shape)
        else:
            cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.kv_cache = [(cache[2 * i], cache[2 * i + 1]) for i in range(s.num_layers)]

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
    dummy: bool = False,
) -> NativeRunner:
    """Our model, built on the meta device and materialised on `device`, weights copied in. GGUF
    tensors in a block format we compute with (Q4_0, Q4_1, Q8_0) stay in it; `quantization`
    quantizes the linear layers still in floats; `dummy` fills random weights instead of reading
    any. Raises UnsupportedModel when the checkpoint needs the transformers runner."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions=max_len)
    # Layers that will keep GGUF blocks are swapped out before materialising: their float weights
    # are never allocated.
    plan = _plan_block_layers(model, source.gguf_file) if source.gguf_file is not None and not dummy else None
    model = model.to(dtype).to_empty(device=device)
    model.rotary.build_tables(device)
    optional = ("lm_head.weight",) if model.shape.tie_word_embeddings else ()
    if dummy:
        _random_weights(model)
    elif plan is not None:
        _load_gguf(model, plan, dtype, optional)
    else:
        files = safetensors_files(source.directory)
        tensors = with_progress(iter_safetensors(files), count_safetensors(files))
        load_into(model, tensors, optional, stacked=model.stacked_params())
    if quantization != "none":
        quantize_linears(model, quantization, skip=lambda name: name == "lm_head")
    return NativeRunner(model.eval(), device, dtype)


def _random_weights(model: nn.Module, seed: int = 0) -> None:
    """--load-format dummy: every parameter drawn as a trained model's roughly are (norm weights 1,
    biases 0, matrices N(0, 0.02)), so benchmarks see real shapes and finite, varied logits."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0 if "norm" in name else 0.0)
            else:  # drawn on the CPU in float32 row by row: no full-size float32 copy of a large matrix
                for row in range(0, param.shape[0], 4096):
                    chunk = torch.empty(param[row : row + 4096].shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
                    param[row : row + 4096].copy_(chunk)


class _Pending(nn.Module):
    """Stands where a block-quantized layer goes until its GGUF rows are read; keeps the layer's
    float bias (if any) for the checkpoint's bias tensors to load into."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.bias = getattr(original, "bias", None)


@dataclass(slots=True)
class _BlockPlan:
    path: Path
    targets: dict[str, tuple[str, int]]  # GGUF tensor (HF name) -> its layer (fused, if so) and first row there
    originals: dict[str, nn.Module]  # layer -> the float module it replaces (on the meta device)
    pending: dict[str, _Pending]  # layer -> its stand-in until the rows are read


def _plan_block_layers(model: LlamaForCausalLM, path: Path) -> _BlockPlan:
    """Find the layers whose every GGUF tensor is in a block format and put stand-ins in their place."""
    stacked = model.stacked_params()
    targets: dict[str, tuple[str, int]] = {}
    formats: dict[str, str | None] = {}
    for info in gguf.read_gguf_header(path).tensors.values():
        name = gguf.hf_tensor_name(info.name)
        if not name.endswith(".weight"):
            continue
        layer, first = name.removesuffix(".weight"), 0
        for fragment, (fused, start, _) in stacked.items():
            if layer.endswith(f".{fragment}"):
                layer, first = layer.removesuffix(fragment) + fused, start
                break
        targets[name], formats[name] = (layer, first), gguf.block_format(info)
    by_layer: dict[str, list[str]] = {}
    for name, (layer, _) in targets.items():
        by_layer.setdefault(layer, []).append(name)
    modules = dict(model.named_modules())
    quantized = {
        layer
        for layer, names in by_layer.items()
        if isinstance(modules.get(layer), nn.Linear | nn.Embedding) and all(formats[n] for n in names)
    }
    plan = _BlockPlan(path, {n: t for n, t in targets.items() if t[0] in quantized}, {}, {})
    for layer in quantized:
        parent, _, attribute = layer.rpartition(".")
        plan.originals[layer], plan.pending[layer] = modules[layer], _Pending(modules[layer])
        setattr(model.get_submodule(parent), attribute, plan.pending[layer])
    return plan


def _load_gguf(model: LlamaForCausalLM, plan: _BlockPlan, dtype: torch.dtype, optional: tuple[str, ...]) -> None:
    """Float tensors go into the model's parameters; each planned layer becomes a BlockQuantLinear
    (BlockQuantEmbedding for the token table) on its GGUF rows."""
    stacked = model.stacked_params()
    parts: dict[str, list[tuple[int, BlockRows]]] = {layer: [] for layer in plan.pending}

    def floats() -> Iterator[tuple[str, torch.Tensor]]:
        total = len(gguf.read_gguf_header(plan.path).tensors)
        for name, tensor in with_progress(gguf.iter_gguf_tensors(plan.path, dtype, frozenset(plan.targets)), total):
            if isinstance(tensor, BlockRows):
                layer, first = plan.targets[name]
                parts[layer].append((first, tensor))
            else:
                yield name, tensor

    load_into(model, floats(), optional, stacked=stacked)
    for layer, pieces in parts.items():
        pieces.sort(key=lambda p: p[0])
        parent, _, attribute = layer.rpartition(".")
        original = plan.originals[layer]
        if isinstance(original, nn.Embedding):
            (_, only), = pieces
            replacement: nn.Module = BlockQuantEmbedding(only.fmt, only.rows, original.embedding_dim)
        else:
            groups: list[tuple[str, list[torch.Tensor]]] = []
            for _, piece in pieces:  # neighbouring pieces of one format become one part
                if groups and groups[-1][0] == piece.fmt:
                    groups[-1][1].append(piece.rows)
                else:
                    groups.append((piece.fmt, [piece.rows]))
            parts_ = [(f, torch.cat(r)) for f, r in groups]
            replacement = BlockQuantLinear(original.in_features, parts_, plan.pending[layer].bias)
            if replacement.out_features != original.out_features:
                raise ValueError(f"GGUF tensors of {layer} hold {replacement.out_features} rows, not {original.out_features}")
        setattr(model.get_submodule(parent), attribute, replacement)
