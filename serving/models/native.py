"""The native runner: every chunk of a step packed into one forward pass of our paged Llama-family
model (llama.py), and the builder that loads such a model from safetensors or GGUF."""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from serving.models import gguf
from serving.models.attention import AttentionBatch, PackedPrefills, PrefillChunk
from serving.models.cuda_graphs import DecodeGraphs
from serving.models.gguf import BlockRows
from serving.models.host_inputs import HostInts, cache_slot, cache_slots, to_device
from serving.models.llama import LlamaForCausalLM
from serving.models.lora import LoraStep, install, read_adapter, uninstall
from serving.models.quant import (
    OUTPUT_SCHEME,
    BlockQuantEmbedding,
    BlockQuantLinear,
    quantize_embedding,
    quantize_linears,
)
from serving.models.runner import ForwardChunk, kv_bytes_per_token
from serving.models.source import ModelSource
from serving.models.weights import checkpoint_tensors, load_into, with_progress


class NativeRunner:
    supports_prefix_caching = True

    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype, backend: str = "torch"):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.backend = backend  # attention: "torch" or "triton" (see attention.py)
        s = model.shape
        self.vocab_size = s.vocab_size
        self.hidden_size = s.hidden_size
        self.generates = True  # False for a checkpoint without an output projection (embeddings only)
        self.kv_bytes_per_token = kv_bytes_per_token(s.num_layers, s.num_kv_heads, s.head_dim, dtype)
        self.block_size = 0
        self.scratch_block = 0
        self.profile_kv_bytes = 0  # the temporary cache of the last profile_run
        self.kv_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.graphs: DecodeGraphs | None = None

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """num_blocks for the block manager, plus one scratch block past them that padded rows of a
        CUDA graph's batch write to (cuda_graphs.py)."""
        s = self.model.shape
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.graphs = None
        self.kv_cache = []
        shape = (2 * s.num_layers, (num_blocks + 1) * block_size, s.num_kv_heads, s.head_dim)
        if self.device.type == "cpu":
            # Anonymous memory is zero pages the OS commits only when first written: the cache takes
            # RAM as blocks come into use (the block manager hands out low blocks first), not up front.
            self._kv_memory = mmap.mmap(-1, math.prod(shape) * self.dtype.itemsize)
            cache = torch.frombuffer(self._kv_memory, dtype=self.dtype).view(shape)
        else:
            cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.kv_cache = [(cache[2 * i], cache[2 * i + 1]) for i in range(s.num_layers)]

    def free_kv_cache(self) -> None:
        self.graphs = None
        self.kv_cache = []
        self.__dict__.pop("_kv_memory", None)

    def use_decode_graphs(self, max_batch: int, max_model_len: int, capture: bool) -> None:
        """Pure-decode steps of up to max_batch sequences run over static buffers, replaying a CUDA graph
        per bucketed batch size when `capture` (CUDA and the Triton backend), else eagerly (tests)."""
        if capture and (self.device.type != "cuda" or self.backend != "triton"):
            raise ValueError("CUDA graphs need a CUDA device and the triton attention backend")
        self.graphs = DecodeGraphs(self, max_batch, max_model_len, capture)

    def profile_run(self, num_tokens: int, num_seqs: int, block_size: int, scored_rows: int = 0) -> torch.Tensor:
        """The largest step the scheduler can make, num_tokens prompt tokens over num_seqs sequences, on a
        temporary KV cache just large enough; returns the logits of `scored_rows` prompt rows (as echo +
        logprobs scores them), then of each sequence's last row. The builder measures the device's peak
        memory across this (and scoring and sampling those logits) to size the real cache."""
        num_seqs = max(1, min(num_seqs, num_tokens))
        lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        tables, first = [], 0
        for n in lengths:
            count = -(-n // block_size)
            tables.append(list(range(first, first + count)))
            first += count
        self.allocate_kv_cache(first, block_size)
        # Not activations: the builder takes it off the measured peak (some 0.5 GiB for an 8B model at
        # the default token budget, which the real cache would otherwise lose).
        self.profile_kv_bytes = (first + 1) * block_size * self.kv_bytes_per_token
        try:
            chunks = [ForwardChunk(i, [0] * n, 0, t, False) for i, (n, t) in enumerate(zip(lengths, tables, strict=True))]
            rows = [sum(lengths[: i + 1]) - 1 for i in range(num_seqs)]
            return self.execute(chunks, list(range(min(scored_rows, num_tokens))) + rows)
        finally:
            self.free_kv_cache()

    def release(self, key: int) -> None:
        """KV blocks belong to the engine's block manager; nothing is kept per stream here."""

    def add_adapter(self, adapter_id: int, directory: Path) -> int:
        """Serve the PEFT LoRA adapter in `directory` to chunks with this id; its rank (AdapterError: why it
        cannot be, another model's adapter say)."""
        adapter = read_adapter(directory)
        install(self.model, adapter_id, adapter, self.device, self.dtype)
        return adapter.rank

    def remove_adapter(self, adapter_id: int) -> None:
        uninstall(self.model, adapter_id)

    def execute(self, chunks: list[ForwardChunk], logit_rows: list[int]) -> torch.Tensor:
        return self.run(chunks, logit_rows, [])[0]

    @torch.inference_mode()
    def run(
        self, chunks: list[ForwardChunk], logit_rows: list[int], hidden_rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not hidden_rows and self.graphs is not None and self.graphs.fits(chunks):
            logits = self.graphs.run(chunks)
            if logit_rows != list(range(len(chunks))):
                # Indexing with a list would copy it from pageable memory: a wait for the GPU.
                logits = logits.index_select(0, to_device(torch.tensor(logit_rows), logits.device))
            return logits, _NO_ROWS
        step = StepInputs.build(chunks, logit_rows, self.block_size, self.backend, self.device)
        hidden = self.model(step.token_ids, step.positions, self.kv_cache, step.batch)
        logits = self.model.logits(hidden.index_select(0, step.logit_rows)).float()
        if not hidden_rows:
            return logits, _NO_ROWS
        return logits, hidden.index_select(0, to_device(torch.tensor(hidden_rows), hidden.device)).float()


_NO_ROWS = torch.empty(0)


@dataclass(slots=True)
class StepInputs:
    """One step's model inputs on the device: packed token ids and positions, the rows to compute
    logits for, and the attention metadata of the chosen backend."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    logit_rows: torch.Tensor
    batch: AttentionBatch

    @classmethod
    def build(
        cls, chunks: list[ForwardChunk], logit_rows: list[int], block_size: int, backend: str, device: torch.device
    ) -> StepInputs:
        """Every integer the step needs goes to the device in one copy: gathered into one host tensor
        (pinned, for a CUDA device: the copy is asynchronous and the host goes on building nothing
        else that waits for it), then sliced there into the tensors below."""
        ints = HostInts()
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        decoding: list[ForwardChunk] = []
        prefill: list[tuple[int, ForwardChunk]] = []
        adapted: dict[int, list[int]] = {}  # LoRA adapter -> its rows
        for chunk in chunks:
            start, row = chunk.start, len(token_ids)
            if chunk.adapter:
                adapted.setdefault(chunk.adapter, []).extend(range(row, row + len(chunk.token_ids)))
            if chunk.decode:  # most rows of most steps: one token, no ranges
                token_ids.append(chunk.token_ids[0])
                positions.append(start)
                slots.append(cache_slot(chunk.block_table, start, block_size))
                decode_rows.append(row)
                decoding.append(chunk)
                continue
            n = len(chunk.token_ids)
            token_ids.extend(chunk.token_ids)
            positions.extend(range(start, start + n))
            slots.extend(cache_slots(chunk.block_table, start, start + n, block_size))
            prefill.append((row, chunk))
        t_ids, t_pos, t_slots, t_rows = ints.add(token_ids), ints.add(positions), ints.add(slots), ints.add(logit_rows)
        d_rows = d_tables = d_lens = None
        if decoding:
            lengths = [c.start + 1 for c in decoding]
            width = max(-(-n // block_size) for n in lengths)
            d_rows, d_lens = ints.add(decode_rows), ints.add(lengths)
            d_tables = ints.add_rows([c.block_table for c in decoding], width)
        p_parts = p_context = None
        if prefill and backend == "triton":
            width = max(-(-(c.start + len(c.token_ids)) // block_size) for _, c in prefill)
            p_parts = (
                ints.add([row for row, _ in prefill]),
                ints.add([len(c.token_ids) for _, c in prefill]),
                ints.add([c.start for _, c in prefill]),
                ints.add_rows([c.block_table for _, c in prefill], width),
            )
        elif prefill:
            p_context = [ints.add(cache_slots(c.block_table, 0, c.start + len(c.token_ids), block_size)) for _, c in prefill]
        lora_rows = {adapter: _consecutive(rows) or ints.add(rows) for adapter, rows in adapted.items()}
        on = ints.to(device)
        batch = AttentionBatch(slot_mapping=on(t_slots), block_size=block_size, backend=backend)
        if lora_rows:
            batch.lora = LoraStep([(a, rows if isinstance(rows, slice) else on(rows)) for a, rows in lora_rows.items()])
        if decoding:
            batch.decode_rows, batch.decode_blocks, batch.decode_lens = on(d_rows), on(d_tables), on(d_lens)
            batch.decodes_first = decode_rows == list(range(len(decode_rows)))
        if p_parts is not None:
            starts, lens, cached, tables = (on(part) for part in p_parts)
            batch.packed_prefills = PackedPrefills(starts, lens, cached, tables, max(len(c.token_ids) for _, c in prefill))
        if p_context is not None:
            batch.prefills = [
                PrefillChunk(slice(row, row + len(c.token_ids)), c.start, on(context))
                for (row, c), context in zip(prefill, p_context, strict=True)
            ]
        return cls(on(t_ids), on(t_pos), on(t_rows), batch)


def _consecutive(rows: list[int]) -> slice | None:
    """rows as a slice, where they are one run (rows are ascending)."""
    return slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == len(rows) else None


@contextlib.contextmanager
def _no_random_init() -> Iterator[None]:
    """torch's Linear and Embedding draw random weights as they are built, meta tensors too, whose
    weights are read or drawn later anyway (load_into, _random_weights). On the meta device the draw goes
    through torch's reference ops, whose first call imports torch._dynamo and with it triton: 0.8 s of the
    engine's start on a CPU, and triton's leak report printed as plain text among the JSON log lines at
    every exit."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = _skip  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved  # type: ignore[method-assign]


def _skip(module: nn.Module) -> None:
    pass


def build_native_runner(
    config: PretrainedConfig,
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    max_len: int,
    quantization: str,
    dummy: bool = False,
    backend: str = "torch",
) -> NativeRunner:
    """Our model, built on the meta device and materialised on `device`, weights copied in. GGUF
    tensors in a block format we compute with (Q4_0, Q4_1, Q8_0) stay in it; `quantization`
    quantizes the linear layers still in floats; `dummy` fills random weights instead of reading
    any. Raises UnsupportedModel when the checkpoint needs the transformers runner."""
    with torch.device("meta"), _no_random_init():
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
        _load_gguf(model, plan, dtype, optional, device)
    generates = True
    if not dummy and plan is None:
        tensors, count = checkpoint_tensors(source.directory)
        absent_ok = () if model.shape.tie_word_embeddings else ("lm_head.weight",)
        lacked = load_into(model, _as_causal_lm(with_progress(tensors, count)), optional, model.stacked_params(), absent_ok)
        if lacked:  # a base model's checkpoint (an embedding model's): no output projection to generate with
            logging.getLogger("fleetlm.loader").warning(
                "the checkpoint has no output projection (lm_head): the model serves embeddings only"
            )
            model.lm_head.weight = model.model.embed_tokens.weight  # a defined forward pass; nothing samples from it
            generates = False
    if quantization != "none":
        quantize_linears(model, quantization, skip=lambda name: name == "lm_head")
        quantize_linears(model, OUTPUT_SCHEME, skip=lambda name: name != "lm_head")  # untied output projection
        model.model.embed_tokens = quantize_embedding(model.model.embed_tokens, dtype)
    runner = NativeRunner(model.eval(), device, dtype, backend)
    runner.generates = generates
    return runner


def _as_causal_lm(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A base model's checkpoint (Qwen3Model's, MistralModel's: an embedding model's) names its tensors
    without the causal LM's `model.` prefix: they are the same tensors."""
    for name, tensor in tensors:
        yield (name if name.startswith(("model.", "lm_head.")) else f"model.{name}"), tensor


def _random_weights(model: nn.Module, seed: int = 0) -> None:
    """--load-format dummy: every parameter drawn as a trained model's roughly are (norm weights 1,
    biases 0, matrices N(0, 0.02)), so benchmarks see real shapes and finite, varied logits. Drawn
    where the weights live: on a GPU in place (seconds for 8B parameters, where the CPU's single
    generator takes a minute), on the CPU in float32 a slab at a time (no full-size float32 copy)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0 if "norm" in name else 0.0)
            elif device.type != "cpu":
                param.normal_(0.0, 0.02, generator=generator)
            else:
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


def _load_gguf(
    model: LlamaForCausalLM, plan: _BlockPlan, dtype: torch.dtype, optional: tuple[str, ...], device: torch.device
) -> None:
    """Float tensors go into the model's parameters; each planned layer becomes a BlockQuantLinear
    (BlockQuantEmbedding for the token table) on its GGUF rows, moved to `device` first: a layer picks
    its compute path by where its rows are."""
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
            replacement: nn.Module = BlockQuantEmbedding(only.fmt, only.rows.to(device), original.embedding_dim, dtype)
        else:
            groups: list[tuple[str, list[torch.Tensor]]] = []
            for _, piece in pieces:  # neighbouring pieces of one format become one part
                if groups and groups[-1][0] == piece.fmt:
                    groups[-1][1].append(piece.rows)
                else:
                    groups.append((piece.fmt, [piece.rows]))
            parts_ = [(f, torch.cat(r).to(device)) for f, r in groups]
            replacement = BlockQuantLinear(original.in_features, parts_, plan.pending[layer].bias)
            if replacement.out_features != original.out_features:
                raise ValueError(f"GGUF tensors of {layer} hold {replacement.out_features} rows, not {original.out_features}")
        setattr(model.get_submodule(parent), attribute, replacement)
