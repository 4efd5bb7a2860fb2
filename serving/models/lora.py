"""LoRA adapters in PEFT's format, served beside the base model (vLLM's --lora-modules).

An adapter adds (alpha / r) * B @ A @ x to some of a layer's projections. Its matrices are kept apart
from the base weights, never merged into them: one step mixes sequences of several adapters and of
the base model, and a quantized or GGUF base keeps its blocks. Each projection keeps, per adapter id,
one (A, B) pair; where we fuse projections (q, k and v into qkv_proj; gate and up into gate_up_proj)
an adapter's parts are stacked: A's rows one after another, B block-diagonal over the fused rows, so
a fused projection still takes two small matmuls per adapter in a step. The scale is folded into B.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from serving.models.weights import iter_safetensors, load_pytorch

CONFIG_FILE = "adapter_config.json"
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# PEFT's tensor names, whatever wraps the model: ...layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>[.<adapter>].weight
_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# Options that change what an adapter computes beyond x + scale * B @ A @ x: refused, never ignored.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2's Conv1D layers)",
    "modules_to_save": "adapters that also train whole modules (modules_to_save)",
    "alpha_pattern": "per-module alpha (alpha_pattern)",
    "lora_bias": "adapters with a bias on B (lora_bias)",
}


class AdapterError(ValueError):
    """An adapter that cannot be served on this model, and why."""


@dataclass(slots=True, frozen=True)
class Adapter:
    """An adapter read from disk: its matrices per (layer, projection), scale folded into B."""

    rank: int  # the largest r of its projections
    pairs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, checkpoint projection) -> (A, B)


def read_adapter(directory: Path) -> Adapter:
    """A PEFT adapter directory (adapter_config.json and adapter_model.safetensors or .bin)."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{directory} holds no {CONFIG_FILE}: not a PEFT LoRA adapter")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{config_path} is not readable JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type') if isinstance(config, dict) else None!r} is not LORA")
    for key, what in _UNSUPPORTED.items():
        if config.get(key) not in (None, False, [], {}, "none"):
            raise AdapterError(f"{directory}: {what} are not supported")
    alpha = config.get("lora_alpha", config.get("r", 8))
    rslora = bool(config.get("use_rslora", False))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in _tensors(directory):
        match = _TENSOR.search(name)
        if match is None:
            raise AdapterError(
                f"{directory}: tensor {name} is not a LoRA matrix of a layer's projection (adapters of the "
                "embeddings or the output head are not supported)"
            )
        layer, projection, side = int(match[1]), match[2], match[3]
        pairs.setdefault((layer, projection), {})[side] = tensor
    if not pairs:
        raise AdapterError(f"{directory}: the adapter holds no LoRA matrices")
    scaled: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for key, sides in pairs.items():
        if set(sides) != {"A", "B"}:
            raise AdapterError(f"{directory}: layer {key[0]} {key[1]} has lora_{''.join(sides)} without its other half")
        a, b = sides["A"].float(), sides["B"].float()
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise AdapterError(f"{directory}: layer {key[0]} {key[1]}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not chain")
        r = a.shape[0]
        scale = alpha / (r**0.5 if rslora else r)
        scaled[key] = (a, b * scale)
    rank = max(a.shape[0] for a, _ in scaled.values())
    return Adapter(rank, scaled)


def _tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    safetensors, pytorch = (directory / name for name in _WEIGHT_FILES)
    if safetensors.is_file():
        return iter_safetensors([safetensors])
    if pytorch.is_file():
        return iter(load_pytorch(pytorch).items())
    raise AdapterError(f"{directory} holds neither {' nor '.join(_WEIGHT_FILES)}")


class LoraWeights:
    """One projection's adapters: adapter id -> (A transposed [in, r], B transposed [r, out]), on the
    projection's device, laid out for x @ A^T and then (x @ A^T) @ B^T."""

    __slots__ = ("pairs",)

    def __init__(self) -> None:
        self.pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass(slots=True)
class LoraStep:
    """Which packed rows of a step use which adapter (the base model's rows are in no group)."""

    # (adapter id, its rows): a slice where they are consecutive (one adapter's decodes, a prefill chunk:
    # two matmuls on views of x and out), else their indices [n] on the device (gathered, then added back).
    groups: list[tuple[int, slice | torch.Tensor]]

    def add_(self, out: torch.Tensor, x: torch.Tensor, weights: LoraWeights) -> None:
        """out += B @ A @ x for the rows of each adapter that adapts this projection. On CPU in one thread:
        these matmuls are too small to share, and torch's worker threads, left spinning after each, would take
        the cores from the C kernels of the next projection (measured: a third of the step on 2 cores)."""
        threads = torch.get_num_threads() if x.is_cpu else 1
        if threads > 1:
            torch.set_num_threads(1)
        try:
            for adapter, rows in self.groups:
                pair = weights.pairs.get(adapter)
                if pair is None:
                    continue
                a_t, b_t = pair
                if isinstance(rows, slice):
                    out[rows].addmm_(x[rows].mm(a_t), b_t)
                else:
                    out.index_add_(0, rows, x.index_select(0, rows).mm(a_t).mm(b_t))
        finally:
            if threads > 1:
                torch.set_num_threads(threads)


def install(model: nn.Module, adapter_id: int, adapter: Adapter, device: torch.device, dtype: torch.dtype) -> None:
    """Give each adapted projection of `model` (a LlamaForCausalLM) the adapter's pair under adapter_id,
    in the model's activation dtype. Checks every shape against the model first: a mismatched adapter
    changes nothing."""
    layers = model.model.layers
    fused = model.stacked_params()  # checkpoint projection -> (our projection, first row, rows)
    staged: dict[tuple[int, str], list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
    for (layer, projection), (a, b) in adapter.pairs.items():
        if layer >= len(layers):
            raise AdapterError(f"the adapter has layer {layer}; the model has {len(layers)} layers")
        ours, first, rows = fused.get(projection, (projection, 0, None))
        owner = _owner(layers[layer], ours)
        if owner is None:
            raise AdapterError(f"the adapter adapts {projection}, which this model's layers do not have")
        linear = getattr(owner, ours)
        rows = linear.out_features if rows is None else rows
        if a.shape[1] != linear.in_features or b.shape[0] != rows:
            raise AdapterError(
                f"layer {layer} {projection}: the adapter maps {a.shape[1]} -> {b.shape[0]} features, the model "
                f"{linear.in_features} -> {rows}: an adapter of another base model"
            )
        staged.setdefault((layer, ours), []).append((first, rows, a, b))
    for (layer, ours), parts in staged.items():
        owner = _owner(layers[layer], ours)
        linear = getattr(owner, ours)
        a = torch.cat([p[2] for p in parts])
        b = torch.zeros(linear.out_features, a.shape[0])
        col = 0
        for first, rows, part_a, part_b in parts:
            b[first : first + rows, col : col + part_a.shape[0]] = part_b
            col += part_a.shape[0]
        owner.lora[ours].pairs[adapter_id] = (a.t().to(device, dtype).contiguous(), b.t().to(device, dtype).contiguous())


def uninstall(model: nn.Module, adapter_id: int) -> None:
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for weights in owner.lora.values():
                weights.pairs.pop(adapter_id, None)


def _owner(layer: nn.Module, projection: str) -> nn.Module | None:
    for owner in (layer.self_attn, layer.mlp):
        if projection in owner.lora:
            return owner
    return None

