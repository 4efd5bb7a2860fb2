"""Fused float32 CPU kernels for what surrounds the matmuls of a decode step (`_cpu_ops.c`, compiled
into the `_qmm` extension, whose thread pool it shares).

    rms_norm(x, weight, eps)                      out = x * rsqrt(mean(x^2) + eps) * weight
    add_rms_norm(x, residual, weight, eps)        residual += x; out = rms_norm(residual)
    rotary_(x, heads, cos_table, sin_table, positions)   in place, HF rotate_half layout
    silu_mul(gate_up)                             silu(gate) * up, rows of [gate | up]
    paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window)

Each takes torch tensors, checks dtype / device / layout, and runs the kernel for float32 CPU tensors
when the extension is built with its SIMD path (`available()`); otherwise (another dtype or
device, a layout the kernel does not take, no extension) it computes the same thing with plain
torch: the `*_reference` functions, which the tests compare the kernels against. The checks are
kept to a few attribute reads: a decode step makes ~300 of these calls.

The decode attention (and large elementwise calls, e.g. prefill) use the pool of `cpu_qmm`, with as
many threads as `cpu_qmm.set_num_threads` says (by default torch.get_num_threads()).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.models import cpu_qmm

try:
    from serving.models import _qmm as _ext
except ImportError:  # built without a C compiler, or an unsupported platform
    _ext = None
if _ext is not None and not hasattr(_ext, "paged_decode_attention"):
    _ext = None  # an extension built before these kernels

_F32 = torch.float32
_I64 = torch.int64
# The kernels run when the extension picked its SIMD path at import; set_simd("scalar") (tests)
# then still runs them, on the portable code.
_FAST = _ext is not None and _ext.simd() != "scalar"
_POOL_MIN_ELEMS = 1 << 18  # from here the elementwise kernels share rows with the pool (_cpu_ops.c)


def available() -> bool:
    """The kernels are built and have a SIMD code path on this CPU (else the wrappers use torch)."""
    return _FAST


def simd() -> str:
    """The extension's code path in use: 'avx2', 'scalar', or 'none' when it is not built."""
    return _ext.simd() if _ext is not None else "none"


set_num_threads = cpu_qmm.set_num_threads
get_num_threads = cpu_qmm.get_num_threads


def _sync_threads() -> None:
    if cpu_qmm._pinned_threads is None:
        cpu_qmm._sync_threads()


def _check_out(out: torch.Tensor, numel: int) -> None:
    if out.dtype is not _F32 or not out.is_cpu or out.numel() != numel or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 CPU tensor of {numel} elements")


# ---------------------------------------------------------------------------------------------------
# RMS norm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., dim) * rsqrt(mean(x^2, -1) + eps) * weight (dim). `out` (contiguous float32, x's
    size; may be x itself) receives the result instead of a new tensor."""
    if (
        _FAST
        and x.dtype is _F32
        and weight.dtype is _F32
        and x.is_cpu
        and weight.is_cpu
        and x.is_contiguous()
        and weight.is_contiguous()
    ):
        dim = weight.numel()
        if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != dim or dim == 0:
            raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match")
        if out is None:
            out = torch.empty_like(x)
        else:
            _check_out(out, x.numel())
        n = x.numel()
        if n >= _POOL_MIN_ELEMS:
            _sync_threads()
        _ext.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), n // dim, dim, eps)
        return out
    return rms_norm_reference(x, weight, eps, out)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """residual += x (in place), then returns rms_norm(residual, weight, eps). `out` as for rms_norm
    (it may be x, not residual)."""
    if (
        _FAST
        and x.dtype is _F32
        and residual.dtype is _F32
        and weight.dtype is _F32
        and x.is_cpu
        and residual.is_cpu
        and weight.is_cpu
        and x.is_contiguous()
        and residual.is_contiguous()
        and weight.is_contiguous()
    ):
        dim = weight.numel()
        if weight.dim() != 1 or x.shape != residual.shape or x.dim() == 0 or x.shape[-1] != dim or dim == 0:
            raise ValueError(
                f"x {tuple(x.shape)}, residual {tuple(residual.shape)} and weight {tuple(weight.shape)} "
                "do not match"
            )
        if out is None:
            out = torch.empty_like(x)
        else:
            _check_out(out, x.numel())
        n = x.numel()
        if n >= _POOL_MIN_ELEMS:
            _sync_threads()
        _ext.add_rms_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), n // dim, dim, eps)
        return out
    residual.add_(x)
    return rms_norm_reference(residual, weight, eps, out)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm (as llama.RMSNorm computes it)."""
    if x.dtype == torch.float32:
        y = F.rms_norm(x, weight.shape, weight, eps)
    else:
        dtype = x.dtype
        xf = x.float()
        y = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    if out is None:
        return y
    return out.view(y.shape).copy_(y)


# ---------------------------------------------------------------------------------------------------
# Rotary embedding


def rotary_(
    x: torch.Tensor, heads: int, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Rotates, in place, the first `heads` heads of x [T, >= heads, head_dim] (rows may be strided,
    e.g. the q and k heads of a fused qkv tensor; each row's heads must be consecutive) by the rows
    `positions` [T] (int64) of cos/sin tables [max_positions, rot_dim] (Rotary.cos / Rotary.sin:
    the two halves of a row equal, scaling included), in Hugging Face's rotate_half layout over
    the first rot_dim dims (partial rotary: the rest untouched). Returns x."""
    if (
        _FAST
        and x.dtype is _F32
        and cos_table.dtype is _F32
        and sin_table.dtype is _F32
        and positions.dtype is _I64
        and x.is_cpu
        and cos_table.is_cpu
        and sin_table.is_cpu
        and positions.is_cpu
        and x.dim() == 3
        and cos_table.is_contiguous()
        and sin_table.is_contiguous()
        and positions.is_contiguous()
    ):
        T, H, D = x.shape
        st = x.stride()
        if st[2] == 1 and (st[1] == D or H == 1):
            rot = cos_table.shape[-1]
            if (
                cos_table.dim() != 2
                or sin_table.shape != cos_table.shape
                or positions.numel() != T
                or not 0 <= heads <= H
                or rot > D
                or rot % 2
            ):
                raise ValueError(
                    f"x {tuple(x.shape)}, heads {heads}, tables {tuple(cos_table.shape)} / "
                    f"{tuple(sin_table.shape)}, positions {tuple(positions.shape)} do not match"
                )
            if T * heads * rot >= _POOL_MIN_ELEMS:
                _sync_threads()
            _ext.rotary(
                x.data_ptr(),
                T,
                heads,
                D,
                st[0],
                cos_table.data_ptr(),
                sin_table.data_ptr(),
                rot,
                positions.data_ptr(),
                cos_table.shape[0],
            )
            return x
    return rotary_reference_(x, heads, cos_table, sin_table, positions)


def rotary_reference_(
    x: torch.Tensor, heads: int, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """What llama.Rotary.lookup + Rotary.apply compute, written back into x[:, :heads]."""
    cos = cos_table.index_select(0, positions).unsqueeze(1).to(x.dtype)
    sin = sin_table.index_select(0, positions).unsqueeze(1).to(x.dtype)
    rot = cos.shape[-1]
    half = rot // 2
    xr = x[:, :heads, :rot]
    rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    xr.copy_(xr * cos + rotated * sin)
    return x


# ---------------------------------------------------------------------------------------------------
# SiLU and multiply


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up (..., 2 * inter), each row [gate | up] -> silu(gate) * up (..., inter)."""
    if _FAST and gate_up.dtype is _F32 and gate_up.is_cpu and gate_up.is_contiguous() and gate_up.dim() > 0:
        two = gate_up.shape[-1]
        if two % 2:
            raise ValueError(f"the last dim of gate_up ({two}) is odd")
        inter = two // 2
        n = gate_up.numel()
        if out is None:
            if gate_up.dim() == 2:
                out = torch.empty(gate_up.shape[0], inter, dtype=_F32)
            else:
                out = torch.empty(*gate_up.shape[:-1], inter, dtype=_F32)
        else:
            _check_out(out, n // 2)
        if inter:
            if n >= _POOL_MIN_ELEMS:
                _sync_threads()
            _ext.silu_mul(gate_up.data_ptr(), out.data_ptr(), n // two, inter)
        return out
    return silu_mul_reference(gate_up, out)


def silu_mul_reference(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    y = F.silu(gate) * up
    if out is None:
        return y
    return out.view(y.shape).copy_(y)


# ---------------------------------------------------------------------------------------------------
# Paged decode attention


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged KV cache, read in place.

    q [B, H, D] (rows may be strided, e.g. a slice of the fused qkv tensor; heads consecutive),
    k_cache / v_cache [slots, KVH, D] (contiguous), block_tables [B, max_blocks] int64 (a sequence's
    position p is in slot block_tables[b, p // block_size] * block_size + p % block_size; entries
    past its length are not read), context_lens [B] int64 (>= 1, the query is the last position),
    window: Mistral's sliding window (None or 0: none). Returns [B, H, D] (or fills `out`, contiguous
    float32 of that size): what PagedAttention._decode computes.
    """
    if (
        _FAST
        and q.dtype is _F32
        and k_cache.dtype is _F32
        and v_cache.dtype is _F32
        and block_tables.dtype is _I64
        and context_lens.dtype is _I64
        and q.is_cpu
        and k_cache.is_cpu
        and v_cache.is_cpu
        and block_tables.is_cpu
        and context_lens.is_cpu
        and q.dim() == 3
        and block_tables.dim() == 2
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and context_lens.is_contiguous()
    ):
        B, H, D = q.shape
        sq = q.stride()
        st = block_tables.stride()
        if sq[2] == 1 and (sq[1] == D or H == 1) and (st[1] == 1 or block_tables.shape[1] == 1):
            kv_shape = k_cache.shape
            if (
                k_cache.dim() != 3
                or v_cache.shape != kv_shape
                or kv_shape[2] != D
                or block_tables.shape[0] != B
                or context_lens.numel() != B
            ):
                raise ValueError(
                    f"q {tuple(q.shape)}, caches {tuple(kv_shape)} / {tuple(v_cache.shape)}, block tables "
                    f"{tuple(block_tables.shape)} and context lengths {tuple(context_lens.shape)} do not match"
                )
            if out is None:
                out = torch.empty(B, H, D, dtype=_F32)
            else:
                _check_out(out, B * H * D)
            _sync_threads()
            _ext.paged_decode_attention(
                q.data_ptr(),
                sq[0],
                k_cache.data_ptr(),
                v_cache.data_ptr(),
                block_tables.data_ptr(),
                st[0],
                context_lens.data_ptr(),
                out.data_ptr(),
                B,
                H,
                kv_shape[1],
                D,
                block_size,
                scale,
                window or 0,
                kv_shape[0],
                block_tables.shape[1],
            )
            return out
    return paged_decode_attention_reference(
        q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window, out
    )


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """PagedAttention._decode's computation: gather the whole blocks, one SDPA call with an additive
    mask, the query heads of a KV head riding as its query rows."""
    n, H, D = q.shape
    kvh = k_cache.shape[1]
    width = block_tables.shape[1] * block_size
    idx = block_tables.reshape(-1)

    def gather(cache: torch.Tensor) -> torch.Tensor:
        per_block = cache.reshape(-1, block_size * kvh * D).index_select(0, idx)
        return per_block.view(n, width, kvh, D).transpose(1, 2)  # [B, KVH, ctx, D]

    key_pos = torch.arange(width, device=q.device).unsqueeze(0)
    query_pos = (context_lens - 1).unsqueeze(1)
    mask = key_pos <= query_pos
    if window:
        mask &= key_pos > query_pos - window
    additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    y = F.scaled_dot_product_attention(
        q.reshape(n, kvh, H // kvh, D), gather(k_cache), gather(v_cache), attn_mask=additive[:, None, None, :], scale=scale
    ).reshape(n, H, D)
    if out is None:
        return y
    return out.view(y.shape).copy_(y)
