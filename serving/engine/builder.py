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
from serving.engine.protocol import ModelInfo
from serving.models.loader import LoadedModel, load_model, load_tokenizer

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


def kv_cache_tokens(cfg: ServeConfig, device: torch.device, bytes_per_token: int, max_len: int) -> int:
    if cfg.kv_cache_tokens is not None:
        return cfg.kv_cache_tokens
    if device.type == "cuda":
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
        # Loaded on the first constrained request only: the engine process needs no tokenizer otherwise.
        grammars=Grammars(
            lambda: load_tokenizer(cfg, model.directory, model.gguf_file), runner.vocab_size, model.eos_token_ids
        ),
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
