"""Linear layers whose weights stay in GGUF's block formats: GGUF files' Q4_0 / Q4_1 / Q8_0 tensors
as they are, and `--quantization q8_0|q4_0` of float checkpoints.

Blocks of 32 consecutive input weights share a float16 scale `d`: Q8_0 keeps each weight as int8
`q` (w = d*q, 34 bytes a block), Q4_0 as 4 bits (w = d*(q-8), 18 bytes), Q4_1 as 4 bits and a
float16 minimum m (w = d*q + m, 20 bytes); the 4-bit formats pack two weights per byte, byte j of a
block holding weights j (low nibble) and j+16 (high). Our quantizer rounds exactly as ggml does, so
its blocks are byte for byte what llama.cpp writes for the same weights.

`BlockQuantLinear` computes with the weights still in blocks, by one of four paths chosen when it
is built: on CUDA a Triton kernel that dequantizes tiles in registers (triton_quant.py; the blocks
split into aligned arrays, the same bytes); on CPU our C kernels (cpu_qmm.py; activations rounded
to int8 per block as llama.cpp does), else torch's int4 kernel for the 4-bit formats; else (any
device) the exact weights dequantized a cache-sized chunk at a time.

FLEETLM_QUANT_PATH=triton|dequantize, read when a layer is built, forces one of the two paths any
device can take: tests run the Triton path on CPU under Triton's interpreter (TRITON_INTERPRET=1,
set before triton is imported) and compare it with the dequantizing one.
"""

import functools
import os
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from serving.models import cpu_qmm

BLOCK = 32
SCHEMES = ("none", "q8_0", "q4_0")
FORMATS = ("q4_0", "q4_1", "q8_0")  # block formats BlockQuantLinear computes with
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}

# The dequantizing path works this many weights at a time (4 MiB as float32), so each chunk stays
# in cache between being written and read by the matmul. On a 4096x4096 layer at batch 1 that takes
# 1.0-1.3x a dense layer's time; dequantizing the whole weight at once took 13x (it goes through RAM
# three times). Accelerators have the bandwidth to dequantize a whole weight at once.
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


def to_blocks(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_q8_0 / quantize_q4_0 output (..., n, 32 or 16) and (..., n) -> GGUF bytes (..., n * block)."""
    return torch.cat((scales.unsqueeze(-1).view(torch.uint8), q.view(torch.uint8)), dim=-1).flatten(-2)


def quantize_blocks(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """A float weight (N, K) as GGUF bytes of `scheme` blocks (N, K/32 * block bytes)."""
    if scheme == "q8_0":
        return to_blocks(*quantize_q8_0(weight))
    if scheme == "q4_0":
        return to_blocks(*quantize_q4_0(weight))
    raise ValueError(f"cannot quantize to {scheme!r}; valid: q8_0, q4_0")


def dequantize_blocks(rows: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGUF bytes of whole rows (n, row bytes) -> (n, row length) weights, exactly as ggml computes
    them in float32 (every product d*q is exact there), then cast to dtype."""
    blocks = rows.view(rows.shape[0], -1, BLOCK_BYTES[fmt])
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    if fmt == "q8_0":
        values = blocks[..., 2:].contiguous().view(torch.int8).float() * d
    elif fmt == "q4_0":
        values = (unpack_q4_0(blocks[..., 2:]).to(torch.int8) - 8).float() * d
    else:
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()
        values = unpack_q4_0(blocks[..., 4:]).float() * d + m
    return values.flatten(-2).to(dtype)


def _has_int4_cpu_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def _int4pack(rows: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit blocks -> torch's CPU int4 layout and its bfloat16 (scale, zero) pairs. The kernel
    computes (q - 8) * scale + zero: zero is 0 for Q4_0, m + 8d for Q4_1 (w = d*q + m)."""
    blocks = rows.view(rows.shape[0], -1, BLOCK_BYTES[fmt])
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    if fmt == "q4_0":
        zero, nibbles = torch.zeros_like(d), blocks[..., 2:]
    else:
        zero, nibbles = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) + 8 * d, blocks[..., 4:]
    values = unpack_q4_0(nibbles).flatten(-2).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    return packed, torch.stack((d.t(), zero.t()), dim=-1).bfloat16().contiguous()


@functools.cache
def _triton_quant() -> ModuleType | None:
    try:  # triton comes with CUDA builds of torch; an import failure just means no Triton path
        from serving.models import triton_quant
    except ImportError:
        return None
    return triton_quant


def _choose_path(device: torch.device, formats: list[str], part_rows: list[int]) -> str:
    forced = os.environ.get("FLEETLM_QUANT_PATH")
    if forced:
        if forced not in ("triton", "dequantize"):
            raise ValueError(f"FLEETLM_QUANT_PATH={forced!r}: valid values are triton, dequantize")
        if forced == "triton" and (_triton_quant() is None or (device.type == "cpu" and not _triton_quant().INTERPRETED)):
            raise ValueError("FLEETLM_QUANT_PATH=triton needs triton, and on CPU its interpreter (TRITON_INTERPRET=1)")
        return forced
    if device.type == "cuda" and _triton_quant() is not None:
        return "triton"
    if device.type == "cpu" and cpu_qmm.available():
        return "kernel"
    if device.type == "cpu" and _has_int4_cpu_kernel() and "q8_0" not in formats and all(n % 16 == 0 for n in part_rows):
        return "int4"
    return "dequantize"


class BlockQuantLinear(nn.Module):
    """y = x W^T (+ b) with W kept in GGUF block formats.

    W is one or more row groups ("parts"), each its own format: a fused projection whose GGUF
    tensors differ in format (a Q8_0 attn_v beside Q4_0 attn_q, say) keeps each as it is.
    """

    def __init__(self, in_features: int, parts: list[tuple[str, torch.Tensor]], bias: torch.Tensor | None = None):
        super().__init__()
        if in_features % BLOCK:
            raise ValueError(f"a block-quantized layer needs whole blocks of {BLOCK} inputs, not {in_features}")
        self.in_features = in_features
        self.formats = [fmt for fmt, _ in parts]
        self.part_rows = [rows.shape[0] for _, rows in parts]
        self.out_features = sum(self.part_rows)
        self.path = _choose_path(parts[0][1].device, self.formats, self.part_rows)
        for i, (fmt, rows) in enumerate(parts):
            expected = in_features // BLOCK * BLOCK_BYTES[fmt]
            if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != expected:
                raise ValueError(f"part {i}: {fmt} rows of {in_features} weights are {expected} bytes, got {tuple(rows.shape)}")
            if self.path == "int4":
                packed, scales_and_zeros = _int4pack(rows, fmt)
                self.register_buffer(f"packed{i}", packed)
                self.register_buffer(f"scales_and_zeros{i}", scales_and_zeros)
            elif self.path == "triton":
                values, scales, mins = _triton_quant().pack(rows, fmt)
                self.register_buffer(f"values{i}", values)
                self.register_buffer(f"scales{i}", scales)
                self.register_buffer(f"mins{i}", mins)  # None (no buffer) but for Q4_1
            else:
                self.register_buffer(f"weight{i}", rows.contiguous())
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str) -> "BlockQuantLinear":
        rows = quantize_blocks(linear.weight.detach(), scheme)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        return cls(linear.in_features, [(scheme, rows)], bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"formats={'+'.join(self.formats)}, path={self.path}"
        )

    def gguf_rows(self, i: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """Part i's GGUF bytes (its rows `index`, or all)."""
        assert self.path != "int4", "the int4 layout keeps no GGUF bytes"
        if self.path != "triton":
            weight = getattr(self, f"weight{i}")
            return weight if index is None else weight.index_select(0, index)
        arrays = [getattr(self, f"{name}{i}") for name in ("values", "scales", "mins")]
        if index is not None:
            arrays = [None if a is None else a.index_select(0, index) for a in arrays]
        return _triton_quant().gguf_rows(*arrays, self.formats[i])

    def dequantize(self) -> torch.Tensor:
        """The exact float32 weight (out_features, in_features); for tests and the fallback path."""
        return torch.cat([dequantize_blocks(self.gguf_rows(i), f) for i, f in enumerate(self.formats)])

    def _part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        fmt, rows = self.formats[i], self.part_rows[i]
        if self.path == "triton":
            arrays = (getattr(self, f"{name}{i}") for name in ("values", "scales", "mins"))
            return _triton_quant().matmul(x, fmt, *arrays)
        if self.path == "kernel":
            return cpu_qmm.matmul(x, getattr(self, f"weight{i}"), fmt, rows)
        if self.path == "int4":
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2, getattr(self, f"packed{i}"), BLOCK, getattr(self, f"scales_and_zeros{i}")
            )
            return out.to(x.dtype).view(*x.shape[:-1], rows)
        weight = getattr(self, f"weight{i}")
        step = max(1, _CPU_CHUNK_ELEMENTS // self.in_features) if x.device.type == "cpu" else rows
        chunks = [F.linear(x, dequantize_blocks(weight[s : s + step], fmt, x.dtype)) for s in range(0, rows, step)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self._part(x, i) for i in range(len(self.formats))]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class BlockQuantEmbedding(nn.Module):
    """An embedding table kept in a GGUF block format: looked-up rows are dequantized, and a tied
    output projection (logits = hidden @ table^T) multiplies the blocks directly.

    The table is held once, by the projection, whose rows the lookups read; only torch's int4 layout
    keeps no GGUF bytes to look rows up in, so on that path the table keeps its own copy.
    """

    def __init__(self, fmt: str, rows: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fmt, self.embedding_dim, self.dtype = fmt, embedding_dim, dtype  # dtype: the model's activations
        self.num_embeddings = rows.shape[0]
        self.projection = BlockQuantLinear(embedding_dim, [(fmt, rows.contiguous())])
        self.register_buffer("weight_blocks", rows.contiguous() if self.projection.path == "int4" else None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.projection.gguf_rows(0, flat) if self.weight_blocks is None else self.weight_blocks.index_select(0, flat)
        return dequantize_blocks(rows, self.fmt, self.dtype).view(*ids.shape, self.embedding_dim)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.projection(hidden)


def quantize_linears(module: nn.Module, scheme: str, skip: Callable[[str], bool] | None = None) -> int:
    """Replace each nn.Linear in `module` (but those whose qualified name `skip` accepts) with a
    BlockQuantLinear, in place; returns how many were replaced.

    Layers whose input size is not a multiple of 32 stay dense: no block format fits them. Quantize
    after moving the model to its device: the compute path is chosen for the weight's device.
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
        setattr(module.get_submodule(parent_name), attribute, BlockQuantLinear.from_linear(linear, scheme))
    return len(targets)


# The token table and the output projection stay 8-bit under every scheme (as llama.cpp's q4_0 files keep
# their output layer at higher precision): with them in bf16 an 8B model's q8_0 weights would be 0.59 of
# bf16, not half, and 4 bits there costs the most agreement per byte saved.
OUTPUT_SCHEME = "q8_0"


def quantize_embedding(embed: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A token table in OUTPUT_SCHEME blocks: a BlockQuantEmbedding, whose projection also gives a tied
    model's logits. A table already in blocks (a GGUF file's) or whose width is not whole blocks is
    returned as it is. Quantize on the weights' device, as for quantize_linears."""
    if not isinstance(embed, nn.Embedding) or embed.embedding_dim % BLOCK:
        return embed
    return BlockQuantEmbedding(OUTPUT_SCHEME, quantize_blocks(embed.weight.detach(), OUTPUT_SCHEME), embed.embedding_dim, dtype)


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.nbytes
    return total
