"""From a ServeConfig to a model runner: resolve the source, device, dtype and architecture, then
build the runner of that kind (native.py or hf_runner.py). The engine sizes the KV cache and drives
the runner; nothing here knows about sequences or scheduling."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from serving.config import ConfigError, ServeConfig
from serving.logs import route_library_logs
from serving.models import gguf
from serving.models.llama import NATIVE_ARCHITECTURES, UnsupportedModel
from serving.models.native import build_native_runner
from serving.models.runner import ModelRunner
from serving.models.source import (
    ModelSource,
    check_model_path,
    hub_cache_dir,
    hub_token,
    is_hub_id,
    resolve_source,
)

log = logging.getLogger("fleetlm.loader")

# transformers sets up its logger on first use (a plain-text stderr handler): now, so that its records
# (e.g. "Token indices sequence length is longer than ...") join ours as JSON lines.
transformers_logging.get_logger()
route_library_logs()


def preflight(cfg: ServeConfig) -> None:
    """Cheap checks worth failing the process on before it binds a port: the device and attention
    backend, and for a
    local model that the path is a model directory or GGUF file whose config parses and names an
    architecture we (or transformers) know. A Hub model is checked once downloaded."""
    resolve_attention_backend(cfg.attention_backend, resolve_device(cfg.device))
    check_model_path(cfg)
    given = cfg.tokenizer_path
    if given and not Path(given).expanduser().is_dir() and not is_hub_id(given):
        raise ConfigError(f"--tokenizer-path {given}: no such directory, and not a Hub id (org/name)")
    if cfg.model_path is not None and not Path(cfg.model_path).expanduser().exists():
        return  # a Hub id
    try:
        source = resolve_source(cfg)
        choose_architecture(cfg.model_arch, load_hf_config(source))
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as exc:  # unreadable, not JSON, an unknown model_type
        where = cfg.model_path or "the demo model"
        raise ConfigError(f"--model-path {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


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


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (comes with CUDA builds of torch)
    except ImportError:
        return False
    return True


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The native runner's attention kernels: Triton's on CUDA when triton is installed, else torch's.
    Triton on CPU runs only in its interpreter (TRITON_INTERPRET=1, for tests: slow)."""
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise ConfigError("--attention-backend triton: triton is not installed (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                f"--attention-backend triton runs on CUDA, not {device.type} "
                "(on CPU only under TRITON_INTERPRET=1, Triton's slow interpreter, for tests)"
            )
    return name


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
    return AutoConfig.for_model(**gguf.read_gguf_config(source.gguf_file))


def choose_architecture(requested: str, config: PretrainedConfig) -> str:
    """'native' or 'transformers'; a --model-arch that contradicts config.json is an error."""
    model_type = config.model_type
    if requested == "transformers":
        return "transformers"
    if requested != "auto" and requested != model_type:
        raise ConfigError(f"--model-arch {requested} contradicts the model's config.json (model_type {model_type!r})")
    return "native" if model_type in NATIVE_ARCHITECTURES else "transformers"


def tokenizer_dir(cfg: ServeConfig, directory: Path) -> Path:
    return Path(cfg.tokenizer_path).expanduser() if cfg.tokenizer_path else directory


def load_tokenizer(cfg: ServeConfig, directory: Path, gguf_file: Path | None) -> PreTrainedTokenizerBase:
    """The model's tokenizer (or --tokenizer-path's: a directory or a Hub id), with --chat-template
    applied. The API process loads it to tokenize, render chats and detokenize; the engine process
    never needs it. A GGUF file's own tokenizer serves only where no other is named or found."""
    tok_dir = tokenizer_dir(cfg, directory)
    given = cfg.tokenizer_path
    if given and not tok_dir.exists() and is_hub_id(given):
        from serving.download import DownloadError, download_tokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(download_tokenizer(given, hub_cache_dir(cfg, given) / "tokenizer", hub_token()))
        except DownloadError as exc:
            raise ConfigError(f"--tokenizer-path {given}: {exc}") from exc
    elif not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
        if gguf_file is None or given:
            raise ConfigError(f"no tokenizer files in {tok_dir}" + (" (--tokenizer-path)" if given else ""))
        tokenizer = gguf.load_gguf_tokenizer(gguf_file)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if cfg.chat_template:
        template_file = Path(cfg.chat_template).expanduser()
        tokenizer.chat_template = template_file.read_text() if template_file.is_file() else cfg.chat_template
    return tokenizer


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _tokenizer_eos_id(tok_dir: Path) -> int | None:
    """The id of the tokenizer's eos_token, read from its files (loading the tokenizer itself would
    cost the engine process seconds and tens of MB it has no other use for)."""
    eos: Any = _read_json(tok_dir / "tokenizer_config.json").get("eos_token")
    eos = eos or _read_json(tok_dir / "special_tokens_map.json").get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if not isinstance(eos, str):
        return None
    spec = _read_json(tok_dir / "tokenizer.json")
    for added in spec.get("added_tokens", []):
        if isinstance(added, dict) and added.get("content") == eos and isinstance(added.get("id"), int):
            return added["id"]
    vocab = spec.get("model", {}).get("vocab")
    token_id = vocab.get(eos) if isinstance(vocab, dict) else None
    return token_id if isinstance(token_id, int) else None


def eos_token_ids(source: ModelSource, config: PretrainedConfig, tok_dir: Path) -> tuple[int, ...]:
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    add(_read_json(source.directory / "generation_config.json").get("eos_token_id"))
    add(getattr(config, "eos_token_id", None))
    add(_tokenizer_eos_id(tok_dir))
    return tuple(sorted(ids))


def _return_freed_memory() -> None:
    """Give the OS back the heap that loading's transient copies left free (glibc keeps it otherwise:
    ~70 MB for a 98 MB GGUF file). A no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


@dataclass(slots=True)
class LoadedModel:
    """A runner ready for its KV cache, and the facts about the model the engine and API need."""

    runner: ModelRunner
    name: str
    architecture: str  # the model_type served natively, or "transformers"
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    directory: Path
    gguf_file: Path | None
    load_seconds: float
    weight_bytes: int  # the weights as held in memory (quantized ones at their packed size)


def load_model(cfg: ServeConfig) -> LoadedModel:
    started = time.monotonic()
    source = resolve_source(cfg)
    device = resolve_device(cfg.device)
    config = load_hf_config(source)
    dtype = resolve_dtype(cfg.dtype, device, config)
    model_limit = getattr(config, "max_position_embeddings", None) or cfg.max_seq_len
    max_len = min(cfg.max_seq_len, model_limit)
    if max_len < cfg.max_seq_len:
        log.info("max sequence length capped by the model", extra={"max_seq_len": max_len})
    runner: ModelRunner | None = None
    architecture = choose_architecture(cfg.model_arch, config)
    if architecture == "native":
        try:
            runner = build_native_runner(
                config, source, device, dtype, max_len, cfg.quantization, dummy=cfg.load_format == "dummy",
                backend=resolve_attention_backend(cfg.attention_backend, device),
            )  # fmt: skip
            architecture = config.model_type
        except UnsupportedModel as exc:
            if cfg.model_arch != "auto":
                raise ConfigError(f"--model-arch {cfg.model_arch}: {exc}") from exc
            log.info("using the transformers runner", extra={"reason": str(exc)})
            architecture = "transformers"
    if runner is None:
        # Imported here: transformers' model classes cost the process 70 MB the native runner never uses.
        from serving.models.hf_runner import build_transformers_runner

        runner = build_transformers_runner(source, device, dtype, cfg.quantization, dummy=cfg.load_format == "dummy")
    _return_freed_memory()
    return LoadedModel(
        runner=runner,
        name=source.name,
        architecture=architecture,
        max_model_len=max_len,
        eos_token_ids=eos_token_ids(source, config, tokenizer_dir(cfg, source.directory)),
        device=device,
        dtype=dtype,
        directory=source.directory,
        gguf_file=source.gguf_file,
        load_seconds=time.monotonic() - started,
        weight_bytes=module_bytes(runner.model),
    )


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's persistent state (parameters and buffers; a tensor tied in two places once)."""
    seen: dict[tuple[int, int], int] = {}
    for tensor in module.state_dict().values():
        seen[(tensor.untyped_storage().data_ptr(), tensor.storage_offset())] = tensor.nbytes
    return sum(seen.values())
