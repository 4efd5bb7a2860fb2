"""From a ServeConfig to a ready engine: load the model runner, size and allocate the KV cache, wire
the block manager, scheduler and engine together."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from serving.config import ConfigError, ServeConfig
from serving.engine.block_manager import BlockManager
from serving.engine.llm_engine import LLMEngine
from serving.engine.protocol import ModelInfo
from serving.models.loader import LoadedModel, load_model

log = logging.getLogger("fleetlm.engine")

BLOCK_SIZE = 16  # tokens per KV-cache block
DEFAULT_BATCHED_TOKENS = 2048
# On CPU the KV cache may take this share of the memory available (page cache included) at start-up;
# the rest stays for activations, the API process and the OS.
_CPU_KV_SHARE = 0.25


def available_memory() -> int:
    """Bytes the kernel could hand out without swapping: MemAvailable (free pages plus the page cache
    it can reclaim), not MemFree, which a healthy machine keeps near zero."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_cache_tokens(cfg: ServeConfig, device: torch.device, bytes_per_token: int, max_len: int) -> int:
    if cfg.kv_cache_tokens is not None:
        return cfg.kv_cache_tokens
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - cfg.gpu_memory_utilization) * total
        return max(0, int(budget // bytes_per_token))
    wanted = cfg.max_batch_size * max_len
    return min(wanted, int(available_memory() * _CPU_KV_SHARE // bytes_per_token))


@dataclass(slots=True)
class BuiltEngine:
    engine: LLMEngine
    info: ModelInfo
    model: LoadedModel


def build_engine(cfg: ServeConfig) -> BuiltEngine:
    model = load_model(cfg)
    runner = model.runner
    num_blocks = kv_cache_tokens(cfg, model.device, runner.kv_bytes_per_token, model.max_model_len) // BLOCK_SIZE
    if num_blocks * BLOCK_SIZE < model.max_model_len:
        raise ConfigError(
            f"the KV cache holds {num_blocks * BLOCK_SIZE} tokens, less than one full-length sequence "
            f"({model.max_model_len}): lower --max-seq-len, or raise --kv-cache-tokens / --gpu-memory-utilization"
        )
    runner.allocate_kv_cache(num_blocks, BLOCK_SIZE)
    prefix_caching = cfg.prefix_caching and runner.supports_prefix_caching
    batched = cfg.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS
    engine = LLMEngine(
        runner=runner,
        blocks=BlockManager(num_blocks, BLOCK_SIZE, prefix_caching=prefix_caching),
        max_batch_size=cfg.max_batch_size,
        max_batched_tokens=max(batched, cfg.max_batch_size),
        max_model_len=model.max_model_len,
        eos_token_ids=model.eos_token_ids,
    )
    info = ModelInfo(
        name=model.name,
        max_model_len=model.max_model_len,
        vocab_size=runner.vocab_size,
        architecture=model.architecture,
        device=str(model.device),
        dtype=str(model.dtype).removeprefix("torch."),
        directory=str(model.directory),
        gguf_file=str(model.gguf_file) if model.gguf_file else None,
        kv_cache_tokens=num_blocks * BLOCK_SIZE,
        prefix_caching=prefix_caching,
    )
    log.info(
        "model loaded",
        extra={
            "model": info.name,
            "architecture": info.architecture,
            "device": info.device,
            "dtype": info.dtype,
            "quantization": cfg.quantization,
            "max_seq_len": info.max_model_len,
            "kv_cache_tokens": info.kv_cache_tokens,
            "kv_cache_bytes": info.kv_cache_tokens * runner.kv_bytes_per_token,
            "prefix_caching": prefix_caching,
            "seconds": round(model.load_seconds, 2),
        },
    )
    return BuiltEngine(engine, info, model)
