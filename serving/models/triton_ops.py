"""What surrounds the matmuls of a step, for CUDA in Triton: one kernel each for RMS norm (with the
residual add before it), the rotary embedding of q and k with the step's K/V written into the paged
cache, and silu(gate) * up.

In plain torch each of these is several elementwise kernels (a bf16 RMS norm alone is seven: upcast,
square, mean, rsqrt, scale, downcast, weight), some thirty kernels a layer. At batch 1 a kernel of a
few thousand elements is all launch and no work, a couple of microseconds each even replayed from a
CUDA graph: some thousand of them would add milliseconds to the ~4 ms an 8B model's weights take to
read (an estimate, to be measured on a GPU). Fused, a layer is eight or nine kernels.

Each kernel computes in float32 and rounds where the torch path rounds (cpu_ops' `*_reference`
functions, Hugging Face's modules): every bf16 torch op computes in float32 and rounds its result,
so the fused kernels round each intermediate the unfused path stores. Checked on CPU under
TRITON_INTERPRET=1 against those references (tests/test_triton_ops.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, dim, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        summed = (tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32) + x.to(tl.float32))
        summed = summed.to(res_ptr.dtype.element_ty)  # the residual stream keeps its dtype's rounding
        tl.store(res_ptr + row * stride_r + offs, summed, mask=mask)
        xf = summed.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / dim + eps)
    normed = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, dim] -> rms_norm(x) * weight, a new tensor. With `residual` [T, dim]: residual += x first
    (in place), and the norm is of that sum (cpu_ops.add_rms_norm)."""
    dim = weight.numel()
    if (
        x.dim() != 2 or x.shape[1] != dim or x.stride(1) != 1
        or (residual is not None and (residual.shape != x.shape or residual.stride(1) != 1))
    ):  # fmt: skip
        raise ValueError(f"x {tuple(x.shape)} (last dim contiguous) does not match weight {tuple(weight.shape)} or the residual")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0]:
        res = residual if residual is not None else x
        block = _block(dim)
        _rms_norm_kernel[(x.shape[0],)](
            x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), dim, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block),
        )  # fmt: skip
    return out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_g, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(gu_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_g + inter + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * inter], rows [gate | up] -> silu(gate) * up [T, inter]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} must be [T, 2 * inter], last dim contiguous")
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows and inter:
        block = min(1024, _block(inter))
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block)
    return out


@triton.jit
def _rotary_cache_kernel(
    qk_ptr, v_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr, slots_ptr,
    stride_qt, stride_qh, stride_vt, stride_vh, stride_cs, stride_ch, stride_c, q_heads, kv_heads, head_dim, rot_half,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Program (token, head): a q head rotates in place; a k head rotates into the key cache; a v head
    (past q_heads + kv_heads) is copied into the value cache."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    slot = tl.load(slots_ptr + t)
    if head >= q_heads + kv_heads:
        kv = head - q_heads - kv_heads
        mask = offs < head_dim
        v = tl.load(v_ptr + t * stride_vt + kv * stride_vh + offs, mask=mask)
        tl.store(v_cache_ptr + slot * stride_cs + kv * stride_ch + offs, v, mask=mask)
    else:
        src = qk_ptr + t * stride_qt + head * stride_qh
        if head < q_heads:  # noqa: SIM108 (a runtime branch in Triton, not a Python expression)
            dst = src
        else:
            dst = k_cache_ptr + slot * stride_cs + (head - q_heads) * stride_ch
        pos = tl.load(pos_ptr + t)
        mask = offs < rot_half
        x1 = tl.load(src + offs, mask=mask, other=0.0)
        x2 = tl.load(src + rot_half + offs, mask=mask, other=0.0)
        dtype = x1.dtype
        # The tables' rows in x's dtype, as the torch path and Hugging Face use them.
        c1 = tl.load(cos_ptr + pos * stride_c + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * stride_c + rot_half + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * stride_c + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * stride_c + rot_half + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]: each product rounded, then the sum.
        out1 = (a * c1).to(dtype).to(tl.float32) + (-b * s1).to(dtype).to(tl.float32)
        out2 = (b * c2).to(dtype).to(tl.float32) + (a * s2).to(dtype).to(tl.float32)
        tl.store(dst + offs, out1.to(dtype), mask=mask)
        tl.store(dst + rot_half + offs, out2.to(dtype), mask=mask)
        if head >= q_heads:  # partial rotary: a key's unrotated dims go to the cache as they are
            rest = 2 * rot_half + tl.arange(0, BLOCK)
            keep = rest < head_dim
            tl.store(dst + rest, tl.load(src + rest, mask=keep), mask=keep)


def rotary_into_cache_(
    qk: torch.Tensor,
    v: torch.Tensor,
    q_heads: int,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """One kernel for what precedes a step's attention: the q heads of qk [T, >= q_heads + KVH, D] rotate
    in place, its KVH k heads rotate into k_cache [slots, KVH, D] at rows `slots` [T], and v [T, KVH, D]
    goes into v_cache there (rows of qk and v may be strided, as inside the fused qkv). Rotation by rows
    `positions` [T] of cos/sin tables [max_positions, rot_dim] (Rotary.cos / Rotary.sin), rotate_half
    layout over the first rot_dim dims (partial rotary: the rest untouched), as cpu_ops.rotary_ does;
    the cache writes are PagedAttention's index_copy_."""
    tokens, kv_heads, head_dim = v.shape
    rot = cos_table.shape[-1]
    if (
        qk.dim() != 3 or qk.shape[0] != tokens or qk.shape[1] < q_heads + kv_heads or qk.shape[2] != head_dim
        or qk.stride(2) != 1 or v.stride(2) != 1 or rot % 2 or rot > head_dim or cos_table.stride(1) != 1
        or sin_table.stride() != cos_table.stride() or k_cache.stride() != v_cache.stride() or k_cache.stride(2) != 1
        or k_cache.shape[1:] != v.shape[1:] or positions.numel() != tokens or slots.numel() != tokens
    ):  # fmt: skip
        raise ValueError(f"qk {tuple(qk.shape)}, v {tuple(v.shape)} and tables {tuple(cos_table.shape)} do not match")
    if tokens:
        _rotary_cache_kernel[(tokens, q_heads + 2 * kv_heads)](
            qk, v, k_cache, v_cache, cos_table, sin_table, positions, slots,
            qk.stride(0), qk.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), cos_table.stride(0),
            q_heads, kv_heads, head_dim, rot // 2, BLOCK=_block(head_dim),
        )  # fmt: skip
