"""From a ServeConfig to a ready engine: load the model runner, size and allocate the KV cache, wire
the block manager, scheduler and engine together."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.config import ConfigError, ServeConfig
from serving.engine.block_manager import BlockManager
from serving.engine.grammar import Grammars
from serving.engine.llm_engine import LLMEngine
from serving.engine.protocol import AdapterInfo, ModelInfo
from serving.engine.sampler import prompt_logprobs, sample
from serving.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from serving.engine.scheduler import SCORED_ROWS_PER_STEP
from serving.engine.sequence import Sequence
from serving.models.loader import LoadedModel, load_model, load_tokenizer
from serving.models.lora import AdapterError
from serving.models.native import NativeRunner
from serving.models.source import resolve_adapter

log = logging.getLogger("fleetlm.engine")

BLOCK_SIZE = 16  # tokens per KV-cache block
DEFAULT_BATCHED_TOKENS = 2048
# On CPU the KV cache may take this share of the memory available (page cache included) at start-up;
# the rest stays for activations, the API process and the OS.
_CPU_KV_SHARE = 0.25


_CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge number


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2's no limit) and junk: None


def cgroup_memory_headroom(cgroup_root: Path = _CGROUP_ROOT) -> int | None:
    """Bytes this container may still take before its memory limit (a Kubernetes pod's
    resources.limits.memory): cgroup v2's memory.max - memory.current, else v1's limit - usage;
    None when there is no limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit = _read_int(cgroup_root / limit_file)
        if limit is not None and limit < _NO_LIMIT:
            usage = _read_int(cgroup_root / usage_file) or 0
            return max(0, limit - usage)
    return None


def available_memory(cgroup_root: Path = _CGROUP_ROOT) -> tuple[int, str]:
    """(bytes the engine could still take without swapping or being OOM-killed, what bounds it):
    MemAvailable (free pages plus the page cache the kernel can reclaim; not MemFree, which a
    healthy machine keeps near zero), capped by the container's cgroup memory limit."""
    available, source = None, "MemAvailable"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        available, source = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free pages"
    headroom = cgroup_memory_headroom(cgroup_root)
    if headroom is not None and headroom < available:
        return headroom, "the cgroup memory limit"
    return available, source


def gpu_kv_budget(
    total: int, free: int, reserved: int, weights: int, activations: int, utilization: float, graph_pool: int = 0
) -> int:
    """Bytes the KV cache may take on a GPU: the `utilization` share of its memory, less the weights,
    the peak activations of the largest step (profiled), the CUDA graphs' memory pool, and what lies
    outside torch's allocator (the CUDA context, cuBLAS workspaces, other processes: total - free -
    what torch has reserved)."""
    outside_torch = max(0, total - free - reserved)
    return max(0, int(total * utilization) - weights - activations - graph_pool - outside_torch)


def _profile_sequences(count: int, vocab: int) -> list[Sequence]:
    """Sequences whose sampling takes every [batch, vocab] temporary the sampler can make (penalties,
    top-k and top-p sorting, logprobs)."""
    params = SamplingParams(
        max_tokens=1, temperature=0.7, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.1, frequency_penalty=0.1, logprobs=5
    )
    return [Sequence(i, "profile", 0, [i % vocab], 1, params) for i in range(count)]


def profile_activations(runner: NativeRunner, num_tokens: int, num_seqs: int, score_prompts: bool = True) -> int:
    """Peak bytes a step of num_tokens prompt tokens over num_seqs sequences takes on the GPU beyond
    what is allocated before it (the weights): the forward pass, then scoring the most prompt rows a
    step scores (echo + logprobs) and sampling its logits."""
    device = runner.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    scored = min(SCORED_ROWS_PER_STEP, num_tokens) if score_prompts else 0
    logits = runner.profile_run(num_tokens, num_seqs, BLOCK_SIZE, scored)
    prompt_logprobs(logits[:scored], [0] * scored, MAX_LOGPROBS)
    sample(logits[scored:], _profile_sequences(logits.shape[0] - scored, runner.vocab_size))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del logits
    torch.cuda.empty_cache()
    return max(0, peak - before - runner.profile_kv_bytes)  # the profile's temporary KV cache is not activations


def _captures_graphs(cfg: ServeConfig, runner: NativeRunner) -> bool:
    """Decode steps replay CUDA graphs: on a GPU, with the Triton attention backend, unless turned off."""
    return cfg.cuda_graphs and runner.device.type == "cuda" and runner.backend == "triton"


def profiled_kv_tokens(cfg: ServeConfig, runner: NativeRunner, max_batched: int) -> int:
    """KV capacity on a GPU from a warm-up profile: the largest step's peak activation memory is
    measured, not guessed, so a large --gpu-memory-utilization cannot run out of memory mid-traffic."""
    device = runner.device
    activations = profile_activations(runner, max_batched, cfg.max_batch_size)
    # The decode graphs' pool holds the activations of the largest batch's step.
    graph_pool = profile_activations(runner, cfg.max_batch_size, cfg.max_batch_size, score_prompts=False) if _captures_graphs(cfg, runner) else 0
    weights = torch.cuda.memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    budget = gpu_kv_budget(total, free, reserved, weights, activations, cfg.gpu_memory_utilization, graph_pool)
    tokens = budget // runner.kv_bytes_per_token
    log.info(
        "KV cache sized",
        extra={
            "kv_cache_tokens": tokens,
            "gpu_total_bytes": total,
            "weights_bytes": weights,
            "peak_activation_bytes": activations,
            "graph_pool_bytes": graph_pool,
            "outside_torch_bytes": max(0, total - free - reserved),
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
        },
    )
    return tokens


def kv_cache_tokens(cfg: ServeConfig, device: torch.device, bytes_per_token: int, max_len: int) -> int:
    if cfg.kv_cache_tokens is not None:
        return cfg.kv_cache_tokens
    if device.type == "cuda":  # the transformers runner: no profile, free memory as it stands
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - cfg.gpu_memory_utilization) * total
        return max(0, int(budget // bytes_per_token))
    wanted = cfg.max_batch_size * max_len
    available, source = available_memory()
    tokens = min(wanted, int(available * _CPU_KV_SHARE // bytes_per_token))
    log.info(
        "KV cache sized",
        extra={
            "kv_cache_tokens": tokens,
            "wanted_tokens": wanted,  # --max-batch-size x the context length
            "available_bytes": available,
            "bounded_by": source if tokens < wanted else "--max-batch-size x --max-seq-len",
            "share_of_available": _CPU_KV_SHARE,
        },
    )
    return tokens


@dataclass(slots=True)
class BuiltEngine:
    engine: LLMEngine
    info: ModelInfo
    model: LoadedModel


def load_adapters(cfg: ServeConfig, model: LoadedModel) -> tuple[AdapterInfo, ...]:
    """--lora-modules, read and given to the runner under ids 1, 2, ... (before the KV cache is sized: their
    memory is the weights')."""
    if not cfg.lora_modules:
        return ()
    runner = model.runner
    if not isinstance(runner, NativeRunner):
        raise ConfigError(f"--lora-modules: LoRA adapters are served by the native runner, not by {model.architecture}'s")
    adapters = []
    for adapter_id, module in enumerate(cfg.lora_modules, start=1):
        if module.name in (model.name, *cfg.served_model_name):
            raise ConfigError(f"--lora-modules: adapter name {module.name!r} is the served model's name")
        try:
            rank = runner.add_adapter(adapter_id, resolve_adapter(cfg, module))
        except (AdapterError, ConfigError) as exc:
            raise ConfigError(f"--lora-modules {module.name}: {exc}") from None
        adapters.append(AdapterInfo(module.name, adapter_id, module.path, rank))
        log.info("LoRA adapter loaded", extra={"adapter": module.name, "source": module.path, "rank": rank})
    return tuple(adapters)


def build_engine(cfg: ServeConfig) -> BuiltEngine:
    model = load_model(cfg)
    adapters = load_adapters(cfg, model)
    runner = model.runner
    batched = cfg.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS
    batched = max(batched, cfg.max_batch_size)
    native_gpu = isinstance(runner, NativeRunner) and model.device.type == "cuda"
    if native_gpu and cfg.kv_cache_tokens is None:
        tokens = profiled_kv_tokens(cfg, runner, batched)
    else:
        tokens = kv_cache_tokens(cfg, model.device, runner.kv_bytes_per_token, model.max_model_len)
    num_blocks = tokens // BLOCK_SIZE
    if num_blocks * BLOCK_SIZE < model.max_model_len:
        raise ConfigError(
            f"the KV cache holds {num_blocks * BLOCK_SIZE} tokens, less than one full-length sequence "
            f"({model.max_model_len}): lower --max-seq-len, or raise --kv-cache-tokens / --gpu-memory-utilization"
        )
    runner.allocate_kv_cache(num_blocks, BLOCK_SIZE)
    if native_gpu and _captures_graphs(cfg, runner):
        runner.use_decode_graphs(cfg.max_batch_size, model.max_model_len, capture=True)
    prefix_caching = cfg.prefix_caching and runner.supports_prefix_caching
    engine = LLMEngine(
        runner=runner,
        blocks=BlockManager(num_blocks, BLOCK_SIZE, prefix_caching=prefix_caching),
        max_batch_size=cfg.max_batch_size,
        max_batched_tokens=batched,
        max_model_len=model.max_model_len,
        eos_token_ids=model.eos_token_ids,
        # Loaded on the first constrained request only: the engine process needs no tokenizer otherwise.
        grammars=Grammars(
            lambda: load_tokenizer(cfg, model.directory, model.gguf_file), runner.vocab_size, model.eos_token_ids
        ),
    )
    engine.adapter_names.update((a.id, a.name) for a in adapters)
    info = ModelInfo(
        name=model.name,
        max_model_len=model.max_model_len,
        vocab_size=runner.vocab_size,
        hidden_size=runner.hidden_size,
        generates=runner.generates,
        architecture=model.architecture,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        directory=str(model.directory),
        gguf_file=str(model.gguf_file) if model.gguf_file else None,
        kv_cache_tokens=num_blocks * BLOCK_SIZE,
        kv_block_size=BLOCK_SIZE,
        prefix_caching=prefix_caching,
        adapters=adapters,
        weight_bytes=model.weight_bytes,
    )
    log.info(
        "model loaded",
        extra={
            "model": info.name,
            "architecture": info.architecture,
            "device": info.device,
            "dtype": info.dtype,
            "quantization": cfg.quantization,
            "attention": getattr(runner, "backend", "transformers"),
            "cuda_graphs": getattr(runner, "graphs", None) is not None,
            "max_seq_len": info.max_model_len,
            "kv_cache_tokens": info.kv_cache_tokens,
            "kv_cache_bytes": info.kv_cache_tokens * runner.kv_bytes_per_token,
            "prefix_caching": prefix_caching,
            "seconds": round(model.load_seconds, 2),
        },
    )
    return BuiltEngine(engine, info, model)
