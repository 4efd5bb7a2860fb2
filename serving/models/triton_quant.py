"""Block-quantized matmul for CUDA in Triton: y = x W^T with W in Q8_0 / Q4_0 / Q4_1 blocks, each tile
of weights dequantized in registers just before its dot, so no float copy of W exists at any time.

`pack` splits GGUF rows, once per layer, into the arrays the kernel loads aligned and wide, the same
bytes as GGUF (34, 18, 20 a block): `values`, int8 (N, K) for Q8_0 or for the 4-bit formats the
blocks' nibble bytes (N, K/2) uint8 as GGUF orders them (byte j of a block: weight j in the low
nibble, weight j+16 in the high); `scales` float16 (N, K/32); `mins` float16 (N, K/32) for Q4_1.
A 4-bit tile multiplies its low nibbles by the activations' columns j and its high nibbles by
columns j+16 of each block, two dots, so the nibbles are never reordered.

Weights are dequantized in float32 (d*q is exact there, as in `quant.dequantize_blocks`), cast to
the activations' dtype and multiplied with float32 accumulation: the result is the dequantizing
path's to float32 rounding. Checked on CPU under TRITON_INTERPRET=1 (tests/test_triton_quant.py).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from serving.models.quant import BLOCK, BLOCK_BYTES

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)


@triton.jit
def _dot(acc, x, w, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        # The interpreter's bfloat16 dot and float32 -> bfloat16 cast are wrong (numpy has no bfloat16):
        # round the weight to bfloat16 (to nearest, ties to even) by its bits and multiply in float32,
        # where products of two bfloat16 values are exact.
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        acc = tl.dot(x.to(tl.float32), bits.to(tl.float32, bitcast=True), acc=acc, input_precision="ieee")
    else:  # the weight rounded to the activations' dtype, as the dequantizing path rounds it
        acc = tl.dot(x, w.to(x.dtype), acc=acc, input_precision=PRECISION)
    return acc


# M, the step's token count, changes every step: Triton would otherwise compile a variant for each of
# "equals 1", "divisible by 16" and neither, the first mixed step of an odd size stalling on compiles.
@triton.jit(do_not_specialize=["M"])
def _block_quant_matmul_kernel(
    x_ptr, values_ptr, scales_ptr, mins_ptr, out_ptr, M, N, K, stride_xm, stride_om, M_BUCKET,
    FMT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # M_BUCKET only keys the autotuner's choice (a few sizes of M, not every batch size).
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles sweep the column tiles together, so a prefill reads each weight
    # tile from DRAM once a group rather than once a row tile. A decode step has one row tile.
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = cols.to(tl.int64)[None, :]  # a vocabulary-sized layer's N*K passes 2^31
    blocks_per_row = K // 32
    d_cols = scales_ptr + cols.to(tl.int64) * blocks_per_row
    m_cols = mins_ptr + cols.to(tl.int64) * blocks_per_row
    j = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # One 32-weight block a dot: its scale is one per column, loaded once, not once a weight.
        for i in tl.static_range(BLOCK_K // 32):
            block = k0 // 32 + i
            # Past the last block (K need not be a multiple of BLOCK_K) the activations load as zeros and
            # the scales from the last block: finite, times zero.
            last = tl.minimum(block, blocks_per_row - 1)
            d = tl.load(d_cols + last, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if FMT == "q8_0":
                k = block * 32 + tl.arange(0, 32)
                k_ok = k < K
                x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                q = tl.load(values_ptr + w_cols * K + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0)
                acc = _dot(acc, x, q.to(tl.float32) * d, PRECISION, UPCAST)
            else:
                # Byte j of the block holds weight j (low nibble) and j + 16 (high): two dots of 16, over
                # the activations' columns j and j + 16, so the nibbles need no reordering.
                k = block * 32 + j
                k_ok = k < K
                x_ok = row_ok[:, None] & k_ok[None, :]
                x_lo = tl.load(x_rows + k[None, :], mask=x_ok, other=0.0)
                x_hi = tl.load(x_rows + (k + 16)[None, :], mask=x_ok, other=0.0)
                w_ok = k_ok[:, None] & col_ok[None, :]
                packed = tl.load(values_ptr + w_cols * (K // 2) + (block * 16 + j)[:, None], mask=w_ok, other=0)
                lo = (packed & 15).to(tl.float32)
                hi = (packed >> 4).to(tl.float32)
                if FMT == "q4_0":
                    w_lo = (lo - 8.0) * d
                    w_hi = (hi - 8.0) * d
                else:
                    m = tl.load(m_cols + last, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                    w_lo = lo * d + m
                    w_hi = hi * d + m
                acc = _dot(acc, x_lo, w_lo, PRECISION, UPCAST)
                acc = _dot(acc, x_hi, w_hi, PRECISION, UPCAST)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _config(m: int, n: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=warps, num_stages=stages)


# Candidates by M bucket. Decode (M <= 16) is memory bound: narrow column tiles give a GPU's ~130 SMs
# enough programs on 4096-wide layers, long K tiles keep loads in flight. Prefill is compute bound:
# square 64-128 tiles on the tensor cores.
_CONFIGS = {
    16: [_config(16, 32, 128, 4, 4), _config(16, 64, 128, 4, 4), _config(16, 32, 256, 4, 3), _config(16, 128, 64, 4, 4)],
    64: [_config(16, 64, 128, 4, 4), _config(32, 64, 128, 4, 4), _config(64, 64, 64, 4, 4)],
    256: [_config(64, 64, 64, 4, 4), _config(64, 128, 64, 4, 4), _config(128, 64, 64, 4, 4), _config(128, 128, 64, 8, 3)],
}


def _bucket(m: int) -> int:
    return 16 if m <= 16 else 64 if m <= 64 else 256


def _configs_for(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    return _CONFIGS[{**nargs, **kwargs}["M_BUCKET"]]


if INTERPRETED:  # numpy runs every program: one small tile, no tuning
    _kernel = _block_quant_matmul_kernel
    _FIXED = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 2}
else:  # tuned once per (M bucket, N, K, format, dtypes): a few shapes a model
    _kernel = triton.autotune(
        configs=[c for cs in _CONFIGS.values() for c in cs],
        key=["M_BUCKET", "N", "K", "FMT"],
        prune_configs_by={"early_config_prune": _configs_for},
        do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=20),
    )(_block_quant_matmul_kernel)
    _FIXED = {}


def pack(rows: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GGUF rows (N, K/32 * block bytes) -> (values, scales, mins or None), the kernel's layout."""
    header = 4 if fmt == "q4_1" else 2
    blocks = rows.view(rows.shape[0], -1, BLOCK_BYTES[fmt])
    scales = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    mins = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1) if fmt == "q4_1" else None
    values = blocks[..., header:].reshape(rows.shape[0], -1)
    return (values.view(torch.int8) if fmt == "q8_0" else values), scales, mins


def gguf_rows(values: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, fmt: str) -> torch.Tensor:
    """The inverse of `pack`: GGUF rows again (for row lookups and tests; the kernel never needs them)."""
    n, blocks = scales.shape
    head = [scales.unsqueeze(-1).view(torch.uint8)] + ([] if mins is None else [mins.unsqueeze(-1).view(torch.uint8)])
    body = values.view(torch.uint8).view(n, blocks, -1)
    return torch.cat([*head, body], dim=-1).view(n, -1)


def matmul(x: torch.Tensor, fmt: str, values: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ W^T -> (..., N) in x's dtype, W given in `pack`'s layout."""
    n, k = scales.shape[0], scales.shape[1] * BLOCK
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        # float32 activations multiply in full float32: a GPU's default for float32 dots is TF32.
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _kernel[grid](
            x2, values, scales, scales if mins is None else mins, out, m, n, k, x2.stride(0), out.stride(0),
            M_BUCKET=_bucket(m), FMT=fmt, PRECISION=precision, UPCAST=INTERPRETED and x.dtype == torch.bfloat16, **_FIXED,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)
