"""One typed server config from CLI flags, LLM_* environment variables and a TOML file.

Precedence: flags > environment > --config file > defaults. pydantic validates the merged
result, so a bad value is rejected with the same message whichever source it came from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "LLM_"
ARCHITECTURES = ("auto", "llama", "mistral", "qwen2", "qwen3", "phi3", "transformers")


class ConfigError(ValueError):
    """A setting is invalid or cannot be honoured on this machine."""


class LoraModule(BaseModel):
    """A LoRA adapter served beside the base model, as vLLM's --lora-modules takes one: `name=path` or
    the JSON object {"name": ..., "path": ...} (path: a PEFT adapter's directory, or a Hub id)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    revision: str | None = Field(None, min_length=1)  # a Hub path's branch, tag or commit (default main)
    base_model_name: str | None = None  # vLLM's field: accepted; this server has one base model

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("{"):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not a JSON object: {exc}") from None
        name, equals, path = value.partition("=")
        if not equals:
            raise ValueError(f"{value!r} is neither name=path nor a JSON object")
        return {"name": name.strip(), "path": path.strip()}


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # --cpus inf is no count

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8080, ge=1, le=65535, description="port to listen on")
    model_path: str | None = Field(
        None,
        description="local model directory or GGUF file, or a Hugging Face Hub id org/name "
        "(default: the embedded stories260k demo model)",
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit (with a Hub id)")
    model_arch: Literal[ARCHITECTURES] = Field(  # type: ignore[valid-type]
        "auto",
        description="model architecture; auto reads config.json, 'transformers' forces the generic runner",
    )
    tokenizer_path: str | None = Field(None, description="tokenizer directory or Hub id (default: the model's)")
    gguf_file: str | None = Field(None, description="the GGUF file to serve where the model's directory or Hub repo holds several")
    served_model_name: tuple[str, ...] = Field(
        (),
        description="model name clients use (default: from the path); more names after it are aliases clients may "
        "send too, as vLLM takes them",
    )
    max_batch_size: int = Field(16, ge=1, le=1024, description="most sequences decoded together")
    max_seq_len: int = Field(2048, ge=16, description="context length (prompt + completion), capped by the model's")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="most tokens computed in one step; longer prompts prefill in chunks (default 2048)"
    )
    device: Literal["auto", "cpu", "cuda", "metal"] = Field("auto", description="where the model runs")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weight and activation dtype (auto: float32 on CPU, bfloat16 on GPU)"
    )
    load_format: Literal["auto", "dummy"] = Field(
        "auto",
        description="dummy: random weights of the config's shapes (benchmarks of real architectures without "
        "their weights; bench/configs)",
    )
    quantization: Literal["none", "q8_0", "q4_0"] = Field(
        "none", description="weight-only quantization of linear layers at load time"
    )
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        "auto",
        description="attention kernels of the native runner: triton (CUDA; reads the paged KV cache in place, and "
        "fuses RMS norm, rotary and silu * up), "
        "torch (plain torch, and a C decode kernel on CPU), or auto (triton on CUDA, else torch)",
    )
    cuda_graphs: bool = Field(
        True,
        description="replay CUDA graphs for decode steps (CUDA with the triton backend; --no-cuda-graphs runs every "
        "step eagerly)",
    )
    workers: int = Field(
        2,
        ge=1,
        le=64,
        description="threads that tokenize prompts and render chat templates off the event loop; "
        "the model is loaded once per process whatever this is",
    )
    queue_capacity: int = Field(100, ge=0, description="most requests waiting for a batch slot; beyond it, 429")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer <key>' on /v1 routes")
    chat_template: str | None = Field(None, description="Jinja chat template, inline or a file path")
    tool_call_parser: Literal["auto", "hermes", "mistral", "llama3_json"] = Field(
        "auto",
        description="how tool_choice=auto output is read as calls: hermes (<tool_call> blocks, Qwen too), "
        "mistral ([TOOL_CALLS]), llama3_json (a bare JSON call), or auto (each of them)",
    )
    reasoning_parser: Literal["auto", "none", "deepseek_r1", "qwen3"] = Field(
        "auto",
        description="a thinking model's <think> block is returned as the chat message's reasoning, apart from its "
        "content: auto (models whose vocabulary has <think> and </think>), deepseek_r1 or qwen3 (always: vLLM's "
        "names, one format), none (the block stays in the content)",
    )
    drain_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests may finish after SIGTERM")
    kv_cache_tokens: int | None = Field(None, ge=16, description="KV cache capacity in tokens (default: from memory)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of GPU memory FleetLM may use")
    num_threads: int | None = Field(
        None,
        ge=1,
        description="compute threads of the engine, torch's and the CPU kernels' (default: every usable core for a "
        "model of 32 MiB of weights or more, else usable cores - 1; a container CPU limit and --cpus count)",
    )
    cpus: float | None = Field(
        None,
        gt=0,
        description="cores to count on where no CPU limit says so, e.g. a Kubernetes pod's CPU request "
        "(default: the cores this process may run on)",
    )
    cpu_affinity: Literal["auto", "none"] = Field(
        "auto",
        description="auto: on CPU, the engine's threads get cores of their own and the API process the rest "
        "(when there are more cores than engine threads); none: the OS schedules both",
    )
    prefix_caching: bool = Field(
        True,
        description="reuse the KV cache of prompt prefixes earlier requests computed "
        "(--no-prefix-caching turns it off)",
    )
    download_dir: str | None = Field(None, description="where Hub models are stored (default: ~/.cache/fleetlm)")
    lora_modules: tuple[LoraModule, ...] = Field(
        (),
        description="LoRA adapters (PEFT format) served beside the model, each as NAME=PATH or a JSON object "
        '{"name": ..., "path": ..., "revision": ...}; PATH is a directory or a Hub id (revision: its branch, tag or '
        "commit, default main); clients send NAME as the model",
    )
    max_loras: int = Field(
        16,
        ge=1,
        le=1024,
        description="most LoRA adapters served at once (each stays in memory beside the model): --lora-modules and "
        "those loaded at run time together",
    )
    allow_runtime_lora_updating: bool = Field(
        False,
        description="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes) load and unload LoRA "
        "adapters while the server runs (they read any path the server can)",
    )
    cors_origins: str = Field("*", description="comma-separated origins allowed by CORS ('' disables CORS)")

    @field_validator("model_path", "tokenizer_path", "api_key", "chat_template", "revision", "gguf_file")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        """One string (a variable, a TOML key) is one name; empty ones are none."""
        if value is None or isinstance(value, str):
            return (value,) if value else ()
        return tuple(v for v in value if v) if isinstance(value, list | tuple) else value

    @field_validator("served_model_name")
    @classmethod
    def _names_differ(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) < len(value):
            raise ValueError("a name is given twice")
        return value

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _adapter_list(cls, value: Any) -> Any:
        """One string (an LLM_LORA_MODULES variable): a JSON list, else entries separated by spaces."""
        if isinstance(value, str):
            return json.loads(value) if value.lstrip().startswith("[") else value.split()
        return value

    @field_validator("lora_modules")
    @classmethod
    def _adapter_names_differ(cls, value: tuple[LoraModule, ...]) -> tuple[LoraModule, ...]:
        names = [m.name for m in value]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"adapter name {twice[0]!r} is given twice")
        return value

    @model_validator(mode="after")
    def _adapters_within_max_loras(self) -> ServeConfig:
        if len(self.lora_modules) > self.max_loras:
            raise ValueError(f"--lora-modules names {len(self.lora_modules)} adapters, more than --max-loras {self.max_loras}")
        return self

    @field_validator("chat_template")
    @classmethod
    def _template_or_its_file(cls, value: str | None) -> str | None:
        # Text with no Jinja tag is a file's path: a missing one (an unmounted ConfigMap) would
        # otherwise become the template itself, and every chat prompt that literal path.
        if value is not None and "{{" not in value and "{%" not in value and not Path(value).expanduser().is_file():
            raise ValueError(f"{value!r} is neither a Jinja template nor a readable file")
        return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# vLLM's names for the same settings, so that a `vllm serve` command line needs no rewriting for the
# settings both servers have (`--model` also ends argparse's ambiguity between --model-path and
# --model-arch). On the command line only: the environment and --config files use FleetLM's names.
VLLM_ALIASES = {
    "model_path": "--model",
    "tokenizer_path": "--tokenizer",
    "max_seq_len": "--max-model-len",
    "max_batch_size": "--max-num-seqs",
    "prefix_caching": "--enable-prefix-caching",
}


def program_name() -> str:
    """What the user typed: `fleetlm` (the console script) or `python -m serving`."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name and name not in ("__main__.py", "-c", "-m") else "python -m serving"


def build_parser() -> argparse.ArgumentParser:
    prog = program_name()
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"%(prog)s [-h] [--config FILE] [--FLAG VALUE ...] [MODEL]\n       {prog} download [-h] ...",
        description="Serve a model behind an OpenAI-compatible API. Every flag can also be set as an "
        f"{ENV_PREFIX}<NAME> environment variable (e.g. {ENV_PREFIX}MODEL_PATH) or in a TOML --config file; "
        "flags win over the environment, which wins over the file. "
        f"Subcommand: '{prog} download --help' fetches a model for later serving.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="TOML file with settings (keys as flag names, - or _)")
    parser.add_argument(
        "model", nargs="?", metavar="MODEL", help="the model to serve, as --model-path takes it (`vllm serve MODEL` style)"
    )
    for name, field in ServeConfig.model_fields.items():
        env = f"env {ENV_PREFIX}{name.upper()}"
        description = field.description or ""
        if "(default" in description or field.default in (None, ()):  # the description says it, or it is unset
            help_text = f"{description} ({env})"
        else:
            default = {True: "on", False: "off"}.get(field.default, field.default) if field.annotation is bool else field.default
            help_text = f"{description} (default: {default}; {env})"
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        flags = [_flag(name)] + ([VLLM_ALIASES[name]] if name in VLLM_ALIASES else [])
        if field.annotation is bool:  # --prefix-caching / --no-prefix-caching
            parser.add_argument(*flags, dest=name, help=help_text, action=argparse.BooleanOptionalAction)
        elif get_origin(field.annotation) is tuple:  # --lora-modules a=/x b=/y
            parser.add_argument(*flags, dest=name, help=help_text, metavar=name.upper(), nargs="+")
        elif choices:  # listed in the help; checked by the model, which names the flag in its error
            parser.add_argument(*flags, dest=name, help=help_text, metavar="{" + ",".join(choices) + "}")
        else:
            parser.add_argument(*flags, dest=name, help=help_text, metavar=name.upper())
    parser.add_argument(
        "--enforce-eager", dest="cuda_graphs", action="store_false", help="vLLM's name for --no-cuda-graphs"
    )
    return parser


def _from_env(environ: dict[str, str]) -> dict[str, str]:
    return {name: environ[ENV_PREFIX + name.upper()] for name in ServeConfig.model_fields if ENV_PREFIX + name.upper() in environ}


def _from_file(path: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return {key.replace("-", "_"): value for key, value in data.items()}


def load_config(argv: list[str], environ: dict[str, str] | None = None) -> ServeConfig:
    environ = dict(os.environ) if environ is None else environ
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    model = flags.pop("model", None)
    if model is not None:
        if flags.get("model_path", model) != model:
            raise ConfigError(f"the model is given twice: {model!r} and --model-path {flags['model_path']!r}")
        flags["model_path"] = model
    config_file = flags.pop("config", None) or environ.get(ENV_PREFIX + "CONFIG")
    merged: dict[str, Any] = _from_file(config_file) if config_file else {}
    merged.update(_from_env(environ))
    merged.update(flags)
    try:
        return ServeConfig.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_flag(str(e['loc'][0])) if e['loc'] else 'config'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(problems) from None
