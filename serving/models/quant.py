"""Weight-only quantization of linear layers (`--quantization none|q8_0|q4_0`).

Weights are stored in GGUF's Q8_0 / Q4_0 block formats: blocks of 32 consecutive input weights
share one float16 scale `d`; Q8_0 keeps each weight as int8 `q` (w = d*q), Q4_0 as 4 bits
(w = d*(q-8)), two per byte, byte j of a block holding weights j (low nibble) and j+16 (high).
Rounding exactly as ggml does makes our blocks byte for byte what llama.cpp writes for the same weights.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 32
SCHEMES = ("none", "q8_0", "q4_0")

# On CPU a forward dequantizes this many weights at a time (4 MiB as float32), so each chunk stays
# in cache between being written and read by the matmul. On a 4096x4096 layer at batch 1 that takes
# 1.0-1.3x a dense layer's time; dequantizing the whole weight at once took 13x (it goes through RAM
# three times).
_CPU_CHUNK_ELEMENTS = 1 << 20


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # C's roundf, as ggml uses; torch.round rounds half to even. `a - floor(a)` is exact.
    a = x.abs()
    floor = a.floor()
    return torch.copysign(floor + (a - floor >= 0.5).to(a.dtype), x)


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"the last dimension ({weight.shape[-1]}) is not a multiple of {BLOCK}")
    return weight.float().reshape(*weight.shape[:-1], -1, BLOCK)


def quantize_q8_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) floats -> int8 values (..., K/32, 32) and float16 scales (..., K/32)."""
    blocks = _blocks(weight)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(d == 0, 0.0, 1.0 / d)
    q = _round_half_away(blocks * inverse).to(torch.int8)
    return q, d.squeeze(-1).half()


def quantize_q4_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) floats -> packed nibbles (..., K/32, 16) uint8 and float16 scales (..., K/32)."""
    blocks = _blocks(weight)
    # The scale maps the block's largest-magnitude weight, sign included, to -8.
    peak = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))
    d = peak / -8
    inverse = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.trunc(blocks * inverse + 8.5).clamp(0, 15).to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4), d.squeeze(-1).half()


def dequantize_q8_0(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 (..., n, 32) and scales (..., n) -> float32 (..., n*32)."""
    return (q.float() * scales.float().unsqueeze(-1)).flatten(-2)


def unpack_q4_0(packed: torch.Tensor) -> torch.Tensor:
    """Packed nibbles (..., n, 16) -> 4-bit values 0..15 (..., n, 32) as uint8."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)


def dequantize_q4_0(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Packed nibbles (..., n, 16) and scales (..., n) -> float32 (..., n*32)."""
    q = unpack_q4_0(packed).to(torch.int8) - 8
    return (q.float() * scales.float().unsqueeze(-1)).flatten(-2)


class QuantizedLinear(nn.Module):
    """A Linear whose weight is kept block-quantized and dequantized on the fly, on any device."""

    def __init__(self, linear: nn.Linear, scheme: str) -> None:
        if scheme not in ("q8_0", "q4_0"):
            raise ValueError(f"QuantizedLinear stores q8_0 or q4_0, not {scheme!r}")
        super().__init__()
        self.in_features, self.out_features, self.scheme = linear.in_features, linear.out_features, scheme
        weight = linear.weight.detach()
        q, scales = quantize_q8_0(weight) if scheme == "q8_0" else quantize_q4_0(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.bias = linear.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        q, scales = self.qweight[rows], self.scales[rows]
        return dequantize_q8_0(q, scales) if self.scheme == "q8_0" else dequantize_q4_0(q, scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Accelerators have the bandwidth to dequantize the whole weight at once.
        on_cpu = x.device.type == "cpu"
        rows = max(1, _CPU_CHUNK_ELEMENTS // self.in_features) if on_cpu else self.out_features
        parts = []
        for start in range(0, self.out_features, rows):
            chunk = slice(start, start + rows)
            bias = None if self.bias is None else self.bias[chunk]
            parts.append(F.linear(x, self.dequantize(chunk).to(x.dtype), bias))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _has_int4_cpu_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int4CpuLinear(nn.Module):
    """Q4_0 weights in torch's CPU int4 layout, multiplied by its fused kernel (bf16 activations).

    The kernel dequantizes in registers and reads an eighth of a float32 weight's bytes: on a
    4096x4096 layer at batch 1 it is 6x (1 thread) to 11x (2 threads) faster than nn.Linear, and
    more than that against dequantizing. Rounding activations and scales to bf16 adds about 4% to
    Q4_0's own error. The layout keeps a zero next to each block's scale: 0.625 bytes per weight,
    against 0.5625 for QuantizedLinear.
    """

    scheme = "q4_0"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed, scales = quantize_q4_0(linear.weight.detach())
        values = unpack_q4_0(packed).flatten(-2).to(torch.int32)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1))
        scales = scales.t().float()
        # The kernel computes (q - 8) * scale + zero; Q4_0 has no zero point.
        self.register_buffer(
            "scales_and_zeros", torch.stack((scales, torch.zeros_like(scales)), dim=-1).bfloat16()
        )
        self.bias = linear.bias

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        return (
            _has_int4_cpu_kernel()
            and linear.weight.device.type == "cpu"
            and linear.out_features % 16 == 0
            and linear.in_features % BLOCK == 0
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme=q4_0 (int4 cpu)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(
                "Int4CpuLinear runs on CPU only: quantize after moving the model to its device"
            )
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, BLOCK, self.scales_and_zeros)
        out = out.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def quantize_linears(module: nn.Module, scheme: str, skip: Callable[[str], bool] | None = None) -> int:
    """Replace each nn.Linear in `module` (but those whose qualified name `skip` accepts) with a
    quantized one, in place; returns how many were replaced.

    Layers whose input size is not a multiple of 32 stay dense: no block format fits them. Quantize
    after moving the model to its device: on CPU, q4_0 picks a CPU-only layout.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    if scheme == "none":
        return 0
    targets = [
        (name, child)
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear)
        and child.in_features % BLOCK == 0
        and not (skip is not None and skip(name))
    ]
    for name, linear in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        if scheme == "q4_0" and Int4CpuLinear.supports(linear):
            replacement: nn.Module = Int4CpuLinear(linear)
        else:
            replacement = QuantizedLinear(linear, scheme)
        setattr(parent, attribute, replacement)
    return len(targets)


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.nbytes
    return total
