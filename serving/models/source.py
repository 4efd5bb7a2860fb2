"""Where a model's files are: the embedded demo, a local directory or GGUF file, or a Hub snapshot."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from serving.config import ConfigError, LoraModule, ServeConfig
from serving.models import gguf
from serving.models.weights import safetensors_files

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEMO_NAME = "stories260k"


def demo_model_dir() -> Path:
    return Path(str(files("serving") / "demo" / DEMO_NAME))


@dataclass(slots=True)
class ModelSource:
    directory: Path  # config, tokenizer files
    gguf_file: Path | None  # the weights, when they are GGUF
    name: str  # default served name


def is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and not value.startswith((".", "/", "~"))


def hub_cache_dir(cfg: ServeConfig, repo: str) -> Path:
    """Where the server keeps what it fetched of Hub repo `repo` (--download-dir)."""
    return Path(cfg.download_dir or Path.home() / ".cache" / "fleetlm") / repo.replace("/", "--")


def hub_token() -> str | None:
    """HF_TOKEN; empty (an empty Secret value, HF_TOKEN=) is no token."""
    return os.environ.get("HF_TOKEN") or None


def check_model_path(cfg: ServeConfig) -> None:
    """A cheap check worth failing the process on before it binds a port."""
    if cfg.model_path is not None and not Path(cfg.model_path).expanduser().exists() and not is_hub_id(cfg.model_path):
        raise ConfigError(f"--model-path {cfg.model_path}: no such file or directory, and not a Hub id (org/name)")


def served_name(cfg: ServeConfig) -> str:
    """The name clients send as `model`, known before the model is loaded."""
    if cfg.served_model_name:
        return cfg.served_model_name[0]
    if cfg.model_path is None:
        return DEMO_NAME
    path = Path(cfg.model_path).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name  # "." names the directory it is
    return cfg.model_path


def resolve_source(cfg: ServeConfig) -> ModelSource:
    if cfg.model_path is None:
        return ModelSource(demo_model_dir(), None, served_name(cfg))
    path = Path(cfg.model_path).expanduser()
    if path.exists():
        directory = path if path.is_dir() else path.parent
        if cfg.gguf_file is not None and path.is_dir():
            # A path in the directory, in a subfolder too (a repo's Q8_0/model-Q8_0.gguf): the directory's
            # config and tokenizer, if any, still come from the directory itself.
            path = path / cfg.gguf_file
            if not path.is_file():
                raise ConfigError(f"--gguf-file {cfg.gguf_file}: no such file in --model-path {cfg.model_path}")
        try:
            gguf_file = gguf.find_gguf_file(path)
        except ValueError as exc:  # several GGUF files: the user must name one
            raise ConfigError(f"--model-path {path}: {exc} (--gguf-file)") from exc
        has_safetensors = directory.is_dir() and bool(safetensors_files(directory))
        if gguf_file is None and not (directory / "config.json").is_file():
            raise ConfigError(f"{path} holds no config.json and no GGUF file: not a model directory")
        return ModelSource(directory, None if has_safetensors and path.is_dir() else gguf_file, served_name(cfg))
    if is_hub_id(cfg.model_path):
        from serving.download import download_model

        revision = cfg.revision or "main"
        # One directory per GGUF file too, as the operator keys its cache: the download keeps only the one asked for.
        dest = hub_cache_dir(cfg, cfg.model_path) / (revision + (f"--{cfg.gguf_file.replace('/', '--')}" if cfg.gguf_file else ""))
        directory = download_model(cfg.model_path, cfg.revision, dest, token=hub_token(), gguf_file=cfg.gguf_file)
        if cfg.gguf_file is not None:
            gguf_file = directory / cfg.gguf_file
        else:
            gguf_file = None if safetensors_files(directory) else gguf.find_gguf_file(directory)
        return ModelSource(directory, gguf_file, served_name(cfg))
    raise ConfigError(f"--model-path {cfg.model_path}: no such file or directory, and not a Hub id (org/name)")


def resolve_adapter(cfg: ServeConfig, module: LoraModule) -> Path:
    """A LoRA adapter's directory: local, or a Hub repo's snapshot (main) fetched into --download-dir
    (ConfigError: neither; DownloadError: the fetch failed)."""
    try:
        path = Path(module.path).expanduser()
        if path.is_dir():
            return path
        found = path.exists()
    except (OSError, RuntimeError) as exc:  # a name too long, ~user of no user
        raise ConfigError(f"{module.path[:200]}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    if found or not is_hub_id(module.path):
        raise ConfigError(f"{module.path} is neither a directory nor a Hub id (org/name)")
    from serving.download import download_model

    revision = module.revision or "main"
    return download_model(module.path, revision, hub_cache_dir(cfg, module.path) / revision.replace("/", "--"), token=hub_token())
