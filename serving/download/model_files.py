"""Which files of a model repository serving needs: its config, its tokenizer and one copy of its weights."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from serving.download.errors import DownloadError, ExitCode

SUPPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "adapter_config.json",  # a LoRA adapter's repo (its weights are adapter_model.safetensors)
    }
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
# Trainer checkpoints keep these next to pytorch weights; they are not weights.
_TRAINER_STATE = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"})

ReadIndex = Callable[[str], Any]


def select_files(
    files: Collection[str], read_index: ReadIndex, *, origin: str, gguf_file: str | None = None
) -> list[str]:
    """The files to fetch, out of everything `origin` (a repo or a directory, named in errors) holds.

    Weights, in order of preference: safetensors; else pytorch .bin/.pth; else the one GGUF file (or
    `gguf_file`, which also wins over the others). When a weight index exists, exactly the shards it names
    are taken, so repos that also ship a consolidated copy of the weights are not fetched twice.
    `read_index(name)` returns that index file's parsed JSON (fetching it first if needed).
    """
    root = {path for path in files if "/" not in path}
    support = sorted(root & SUPPORT_FILES)
    return support + _weights(files, root, read_index, origin, gguf_file)


def _weights(
    files: Collection[str], root: set[str], read_index: ReadIndex, origin: str, gguf_file: str | None
) -> list[str]:
    ggufs = sorted(path for path in files if path.endswith(".gguf"))
    if gguf_file is not None:
        if gguf_file not in files:
            choices = ", ".join(ggufs) or "none"
            raise DownloadError(
                f"{gguf_file} not found in {origin} (GGUF files: {choices})", ExitCode.NOT_FOUND
            )
        return [gguf_file]
    if SAFETENSORS_INDEX in root:
        return _indexed(SAFETENSORS_INDEX, files, read_index, origin)
    if safetensors := sorted(path for path in root if path.endswith(".safetensors")):
        # Mistral's repos hold the weights twice: Hugging Face's model*.safetensors, and Mistral's
        # own consolidated.safetensors, which nothing here reads.
        return [p for p in safetensors if not p.startswith("consolidated")] or safetensors
    if PYTORCH_INDEX in root:
        return _indexed(PYTORCH_INDEX, files, read_index, origin)
    if pytorch := sorted(p for p in root if p.endswith((".bin", ".pth")) and p not in _TRAINER_STATE):
        return pytorch
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        raise DownloadError(
            f"{origin} has {len(ggufs)} GGUF files: pick one with --gguf-file ({', '.join(ggufs)})",
            ExitCode.USAGE,
        )
    raise DownloadError(
        f"{origin} has no weights (*.safetensors, *.bin, *.pth or *.gguf)", ExitCode.NOT_FOUND
    )


def _indexed(index: str, files: Collection[str], read_index: ReadIndex, origin: str) -> list[str]:
    weight_map = read_index(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DownloadError(f"{index} in {origin} has no weight_map", ExitCode.UNEXPECTED)
    shards = sorted(set(weight_map.values()))
    if missing := [shard for shard in shards if shard not in files]:
        raise DownloadError(
            f"{index} in {origin} names missing shards: {', '.join(missing)}", ExitCode.NOT_FOUND
        )
    return [index, *shards]
