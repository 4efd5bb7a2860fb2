"""Reading checkpoint tensors: safetensors files (memory-mapped), one file or a sharded set; or, where
a repo has none, PyTorch's pytorch_model*.bin files, read with weights_only (no pickled code runs)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
PYTORCH_INDEX_FILE = "pytorch_model.bin.index.json"
PROGRESS_INTERVAL_S = 5.0
T = TypeVar("T")
log = logging.getLogger("fleetlm.loader")


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    # Mistral's repos hold the weights twice (Hugging Face's files and its own consolidated one).
    return [f for f in files if not f.name.startswith("consolidated")] or files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def pytorch_files(model_dir: Path) -> list[Path]:
    index = model_dir / PYTORCH_INDEX_FILE
    if index.is_file():
        return [model_dir / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(model_dir.glob("pytorch_model*.bin"))


def load_pytorch(path: Path) -> dict[str, torch.Tensor]:
    try:  # memory-mapped: tensors are read as they are copied into the model
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # the legacy (pre-zip) format cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_tensors(model_dir: Path) -> tuple[Iterator[tuple[str, torch.Tensor]], int]:
    """The directory's checkpoint tensors and how many there are: its safetensors, else its
    pytorch_model*.bin files. Meta's own consolidated.*.pth layout is not one we read."""
    if files := safetensors_files(model_dir):
        return iter_safetensors(files), count_safetensors(files)
    if bins := pytorch_files(model_dir):
        states = [load_pytorch(path) for path in bins]
        return (item for state in states for item in state.items()), sum(len(state) for state in states)
    if any(model_dir.glob("*.pth")):
        raise ValueError(f"{model_dir} holds Meta's .pth checkpoint layout, which is not read here: use the Hugging Face format")
    # Else every parameter would be reported missing, as if the checkpoint were of another architecture.
    raise ValueError(f"{model_dir} holds no weights: no *.safetensors, pytorch_model*.bin or *.gguf file")


def count_safetensors(files: list[Path]) -> int:
    """How many tensors the files hold (their headers only)."""
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            total += len(f.keys())
    return total


def with_progress(
    items: Iterator[tuple[str, T]], total: int, interval_s: float | None = None
) -> Iterator[tuple[str, T]]:
    """Pass checkpoint tensors through, logging "loading weights" (done, of, percent, elapsed)
    every interval_s seconds (PROGRESS_INTERVAL_S): a large model's minutes of loading are not silent."""
    interval_s = PROGRESS_INTERVAL_S if interval_s is None else interval_s
    started = last = time.monotonic()
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= interval_s:
            last = now
            log.info(
                "loading weights",
                extra={
                    "tensors": done,
                    "of": total,
                    "percent": round(100 * done / max(total, 1)),
                    "elapsed_s": round(now - started, 1),
                },
            )


def load_into(
    module: torch.nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    optional: tuple[str, ...] = (),
    stacked: dict[str, tuple[str, int, int]] | None = None,
    absent_ok: tuple[str, ...] = (),
) -> set[str]:
    """Copy checkpoint tensors into module's parameters by name; refuse missing or foreign ones. Returns
    those of `absent_ok`, parameters the checkpoint may lack, that it did lack (left as they were).

    `optional` names may be absent from the module (e.g. lm_head.weight when embeddings are tied).
    `stacked` maps a checkpoint name fragment (".q_proj.") to rows of a fused parameter
    (".qkv_proj.", first row, rows), for models that fuse projections into one matmul."""
    params = dict(module.named_parameters())
    rows_loaded: dict[str, int] = {}
    unexpected: list[str] = []
    for name, tensor in tensors:
        target, rows = name, slice(None)
        if name not in params:
            for fragment, (fused, start, count) in (stacked or {}).items():
                if f".{fragment}." in name:
                    target, rows = name.replace(f".{fragment}.", f".{fused}."), slice(start, start + count)
                    break
        param = params.get(target)
        if param is None:
            if name not in optional and not name.endswith("rotary_emb.inv_freq"):
                unexpected.append(name)
            continue
        destination = param[rows]
        if destination.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(destination.shape)}"
            )
        with torch.no_grad():
            destination.copy_(tensor)
        rows_loaded[target] = rows_loaded.get(target, 0) + destination.shape[0]
    missing = sorted(n for n, p in params.items() if rows_loaded.get(n, 0) != p.shape[0])
    lacked = {n for n in missing if n in absent_ok and n not in rows_loaded}
    missing = [n for n in missing if n not in lacked]
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return lacked
