"""Reading checkpoint tensors: safetensors files (memory-mapped), one file or a sharded set."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    return sorted(model_dir.glob("*.safetensors"))


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def load_into(
    module: torch.nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    optional: tuple[str, ...] = (),
    stacked: dict[str, tuple[str, int, int]] | None = None,
) -> None:
    """Copy checkpoint tensors into module's parameters by name; refuse missing or foreign ones.

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
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
