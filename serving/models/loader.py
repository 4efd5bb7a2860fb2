"""From a ServeConfig to a ready engine: resolve the model source, device and dtype, load weights
and tokenizer, size the KV cache."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from serving.config import ConfigError, ServeConfig
from serving.engine.block_manager import BlockManager
from serving.engine.engine_process import ModelInfo
from serving.engine.llm_engine import LLMEngine
from serving.models import gguf
from serving.models.hf_runner import TransformersRunner
from serving.models.llama import NATIVE_ARCHITECTURES, LlamaForCausalLM, UnsupportedModel
from serving.models.quant import quantize_linears
from serving.models.runner import NativeRunner, kv_bytes_per_token
from serving.models.weights import iter_safetensors, load_into, safetensors_files

log = logging.getLogger("fleetlm.loader")

BLOCK_SIZE = 16
DEFAULT_BATCHED_TOKENS = 2048
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def demo_model_dir() -> Path:
    return Path(str(files("serving") / "demo" / "stories260k"))


@dataclass(slots=True)
class ModelSource:
    directory: Path  # config, tokenizer files
    gguf_file: Path | None  # the weights, when they are GGUF
    name: str  # default served name


def _is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and not value.startswith((".", "/", "~"))


def preflight(cfg: ServeConfig) -> None:
    """Cheap checks worth failing the process on before it binds a port."""
    resolve_device(cfg.device)
    if cfg.model_path is not None and not Path(cfg.model_path).expanduser().exists() and not _is_hub_id(cfg.model_path):
        raise ConfigError(f"--model-path {cfg.model_path}: no such file or directory, and not a Hub id (org/name)")


def served_name(cfg: ServeConfig) -> str:
    """The name clients send as `model`, known before the model is loaded."""
    if cfg.served_model_name:
        return cfg.served_model_name
    if cfg.model_path is None:
        return "stories260k"
    path = Path(cfg.model_path).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.name
    return cfg.model_path


def resolve_source(cfg: ServeConfig) -> ModelSource:
    if cfg.model_path is None:
        return ModelSource(demo_model_dir(), None, "stories260k")
    path = Path(cfg.model_path).expanduser()
    if path.exists():
        try:
            gguf_file = gguf.find_gguf_file(path)
        except ValueError as exc:  # several GGUF files: the user must name one
            raise ConfigError(f"--model-path {path}: {exc}") from exc
        directory = path if path.is_dir() else path.parent
        has_safetensors = directory.is_dir() and bool(safetensors_files(directory))
        if gguf_file is None and not (directory / "config.json").is_file():
            raise ConfigError(f"{path} holds no config.json and no GGUF file: not a model directory")
        return ModelSource(directory, None if has_safetensors and path.is_dir() else gguf_file, served_name(cfg))
    if _is_hub_id(cfg.model_path):
        from serving.download import download_model

        dest = Path(cfg.download_dir or Path.home() / ".cache" / "fleetlm") / cfg.model_path.replace("/", "--")
        dest = dest / (cfg.revision or "main")
        directory = download_model(cfg.model_path, cfg.revision, dest, token=os.environ.get("HF_TOKEN"))
        gguf_file = None if safetensors_files(directory) else gguf.find_gguf_file(directory)
        return ModelSource(directory, gguf_file, served_name(cfg))
    raise ConfigError(f"--model-path {cfg.model_path}: no such file or directory, and not a Hub id (org/name)")


def resolve_device(name: str) -> torch.device:
    mps_ok = torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available to torch on this machine")
    if name == "metal":
        if not mps_ok:
            raise ConfigError("--device metal: Apple Metal (MPS) is not available on this machine")
        return torch.device("mps")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, config: PretrainedConfig) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cpu":
        return torch.float32  # CPU matmuls are fastest and exact in float32
    if device.type == "mps":
        return torch.float16
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if declared in (torch.float16, "float16"):
        return torch.float16
    return torch.bfloat16


def load_hf_config(source: ModelSource) -> PretrainedConfig:
    if (source.directory / "config.json").is_file():
        return AutoConfig.from_pretrained(source.directory)
    assert source.gguf_file is not None
    data = gguf.read_gguf_config(source.gguf_file)
    return AutoConfig.for_model(**data)


def choose_architecture(requested: str, config: PretrainedConfig) -> str:
    """'native' or 'transformers'; a --model-arch that contradicts config.json is an error."""
    model_type = config.model_type
    if requested == "transformers":
        return "transformers"
    if requested != "auto" and requested != model_type:
        raise ConfigError(f"--model-arch {requested} contradicts the model's config.json (model_type {model_type!r})")
    return "native" if model_type in NATIVE_ARCHITECTURES else "transformers"


def load_tokenizer(cfg: ServeConfig, directory: Path, gguf_file: Path | None) -> PreTrainedTokenizerBase:
    """The model's tokenizer (or --tokenizer-path's), with --chat-template applied; loaded by the
    engine process to detokenize and by the API process to tokenize and render chats."""
    tok_dir = Path(cfg.tokenizer_path) if cfg.tokenizer_path else directory
    if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
        if gguf_file is None:
            raise ConfigError(f"no tokenizer files in {tok_dir}")
        tokenizer = gguf.load_gguf_tokenizer(gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if cfg.chat_template:
        template_file = Path(cfg.chat_template)
        tokenizer.chat_template = template_file.read_text() if template_file.is_file() else cfg.chat_template
    return tokenizer


def eos_token_ids(source: ModelSource, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids: set[int] = set()

    def add(value: int | list[int] | None) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    generation_config = source.directory / "generation_config.json"
    if generation_config.is_file():
        add(json.loads(generation_config.read_text()).get("eos_token_id"))
    add(getattr(config, "eos_token_id", None))
    add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def _native_model(config: PretrainedConfig, source: ModelSource, device: torch.device, dtype: torch.dtype, max_len: int):
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
    return model.eval()


def _transformers_model(source: ModelSource, device: torch.device, dtype: torch.dtype):
    kwargs = {"gguf_file": source.gguf_file.name} if source.gguf_file is not None else {}
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, **kwargs)
    return model.to(device).eval()


def _kv_cache_tokens(cfg: ServeConfig, device: torch.device, bytes_per_token: int, max_len: int) -> int:
    if cfg.kv_cache_tokens is not None:
        return cfg.kv_cache_tokens
    wanted = cfg.max_batch_size * max_len
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - cfg.gpu_memory_utilization) * total
        return max(0, int(budget // bytes_per_token))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(wanted, int(available * 0.25 // bytes_per_token))  # leave RAM for activations and the OS


@dataclass(slots=True)
class LoadedModel:
    engine: LLMEngine
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo
    load_seconds: float

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def architecture(self) -> str:
        return self.info.architecture


def load(cfg: ServeConfig) -> LoadedModel:
    started = time.monotonic()
    source = resolve_source(cfg)
    device = resolve_device(cfg.device)
    config = load_hf_config(source)
    dtype = resolve_dtype(cfg.dtype, device, config)
    architecture = choose_architecture(cfg.model_arch, config)
    model_limit = getattr(config, "max_position_embeddings", None) or cfg.max_seq_len
    max_len = min(cfg.max_seq_len, model_limit)
    if max_len < cfg.max_seq_len:
        log.info("max sequence length capped by the model", extra={"max_seq_len": max_len})
    tokenizer = load_tokenizer(cfg, source.directory, source.gguf_file)

    runner: NativeRunner | TransformersRunner
    if architecture == "native":
        try:
            model = _native_model(config, source, device, dtype, max_len)
        except UnsupportedModel as exc:
            if cfg.model_arch != "auto":
                raise ConfigError(f"--model-arch {cfg.model_arch}: {exc}") from exc
            log.info("using the transformers runner", extra={"reason": str(exc)})
            architecture = "transformers"
    if architecture == "native":
        if cfg.quantization != "none":
            quantize_linears(model, cfg.quantization)
        bytes_per_token = kv_bytes_per_token(model, dtype)
    else:
        model = _transformers_model(source, device, dtype)
        if cfg.quantization != "none":
            quantize_linears(model, cfg.quantization, skip=lambda name: name == "lm_head")
        text = config.get_text_config()
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        bytes_per_token = 2 * text.num_hidden_layers * heads * head_dim * torch.finfo(dtype).bits // 8

    cache_tokens = _kv_cache_tokens(cfg, device, bytes_per_token, max_len)
    num_blocks = cache_tokens // BLOCK_SIZE
    if num_blocks * BLOCK_SIZE < max_len:
        raise ConfigError(
            f"the KV cache holds {num_blocks * BLOCK_SIZE} tokens, less than one full-length sequence "
            f"({max_len}): lower --max-seq-len, or raise --kv-cache-tokens / --gpu-memory-utilization"
        )
    if architecture == "native":
        runner = NativeRunner(model, num_blocks, BLOCK_SIZE, device, dtype)
    else:
        runner = TransformersRunner(model, device)
    batched = cfg.max_num_batched_tokens or max(DEFAULT_BATCHED_TOKENS, cfg.max_batch_size)
    engine = LLMEngine(
        runner=runner,
        tokenizer=tokenizer,
        blocks=BlockManager(num_blocks, BLOCK_SIZE),
        max_batch_size=cfg.max_batch_size,
        max_batched_tokens=max(batched, cfg.max_batch_size),
        max_model_len=max_len,
        eos_token_ids=eos_token_ids(source, config, tokenizer),
    )
    info = ModelInfo(
        name=source.name,
        max_model_len=max_len,
        vocab_size=runner.vocab_size,
        architecture=architecture if architecture == "transformers" else config.model_type,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        directory=str(source.directory),
        gguf_file=str(source.gguf_file) if source.gguf_file else None,
    )
    loaded = LoadedModel(engine=engine, tokenizer=tokenizer, info=info, load_seconds=time.monotonic() - started)
    log.info(
        "model loaded",
        extra={
            "model": info.name,
            "architecture": info.architecture,
            "device": info.device,
            "dtype": info.dtype,
            "quantization": cfg.quantization,
            "max_seq_len": max_len,
            "kv_cache_tokens": num_blocks * BLOCK_SIZE,
            "seconds": round(loaded.load_seconds, 2),
        },
    )
    return loaded
