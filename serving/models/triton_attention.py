"""Paged attention for CUDA in Triton: every query reads its sequence's K/V where the paged cache keeps
them (through the sequence's block table), with no gather-copy of the cache in any step.

- `paged_decode_attention`: one query per decoding sequence. One program per (sequence, KV head)
  computes all the query heads that share that KV head (GQA) with an online softmax over tiles of
  the sequence's keys (each tile several cache blocks), so each K/V block is read once for the whole
  group. Where those programs are too few to keep the GPU busy (a few sequences: a single stream has
  8 on Llama-3.1-8B for 132 multiprocessors), each sequence's keys are split into parts read by
  programs of their own, whose partial softmaxes a second kernel merges (split-K, "flash decoding"):
  the step then waits for one part's tiles rather than for every tile of the longest sequence.
- `paged_prefill_attention`: the prefill chunks of a step, packed back to back as variable-length
  runs of query rows, each after however many tokens of its sequence are already cached (a prefix
  cache hit, or an earlier chunk of a chunked prefill). One program per (chunk, tile of queries,
  query head); the chunk's own new K/V are written to the cache before the kernel runs, so cached
  prefix and new tokens are read the same way, causally masked by position.

Both take sliding windows (a query at position p sees keys p - window + 1 .. p) and head sizes that
are not powers of two (padded in registers, masked on load and store). Checked on CPU under
TRITON_INTERPRET=1 against the plain-torch path (tests/test_triton_attention.py).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# The interpreter runs tl.dot in numpy: small tiles keep CI fast there. On a GPU, larger query and key
# tiles use the tensor cores well (64 x 64 x head_dim per dot).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_PREFILL_TILE = 16 if _INTERPRETED else 64  # query rows and keys per prefill tile (see prefill_tile)
# Keys per decode tile: several cache blocks at once (each token's block looked up in the table), so a
# program has that many loads in flight per step of its loop rather than one 16-token block. 32 under
# the interpreter still spans two blocks of 16, the path a GPU takes.
_DECODE_N = 32 if _INTERPRETED else 64


def prefill_tile(element_size: int) -> int:
    """Query rows and keys per prefill tile. Float32 takes 32 x 32: at 64 x 64 with a head size of 128
    its tiles outgrow the registers (ptxas spills some 10 KB a thread to local memory on sm_90)."""
    return _PREFILL_TILE if element_size < 4 else min(_PREFILL_TILE, 32)

_NO_WINDOW = 1 << 30
# Split-K: at most this many parts per sequence, enough for one stream of an 8-KV-head model to put
# some 128 programs on the GPU's multiprocessors (more parts would mostly add empty ones and merge work).
_MAX_SPLITS = 16


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """How many parts each sequence's keys are split into: 1 where batch x kv_heads programs already
    cover the multiprocessors, else a power of two (few kernel variants to compile) up to about two
    programs per multiprocessor. It depends on the batch size alone, never on the lengths (a host value
    a CUDA graph could not follow), so a replay's split is the captured one; a part with no keys of a
    short sequence returns at once."""
    if device.type != "cuda":
        return 1
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    programs = batch * kv_heads
    if programs >= sms:
        return 1
    return min(_MAX_SPLITS, 1 << ((-(-2 * sms // programs)).bit_length() - 1))


def _pad(n: int) -> int:
    """A block's width for n heads or head dims: a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(n))


def _precision(q: torch.Tensor) -> str:
    """float32 models multiply in full float32 (a GPU's default for float32 dots is TF32, 10 bits of
    mantissa: enough to flip a greedy choice); half-precision inputs use the tensor cores as they are.
    The interpreter computes bfloat16 dots wrongly (numpy has no bfloat16): there, "upcast" makes
    float32 copies of the tiles first."""
    if _INTERPRETED and q.dtype != torch.float32:
        return "upcast"
    return "ieee" if q.dtype == torch.float32 else "tf32"


# Ints that change from step to step (the block tables' width, a window that is the whole context):
# Triton would otherwise compile a kernel variant for each of "equals 1", "divisible by 16" and neither,
# mid-traffic. The kernels gain nothing from knowing either.
_PER_STEP_INTS = ["window", "stride_tb"]


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _softmax_step(scores, v, m, total, acc, PRECISION: tl.constexpr):
    """One tile of keys into the online softmax of each query row: (running max, sum of exponentials,
    weighted sum of values) updated with `scores` [rows, keys] (-inf where masked) and their values.
    A row whose keys were all masked so far keeps max -inf and adds nothing."""
    m_new = tl.maximum(m, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    total = total * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return m_new, total, acc


@triton.jit(do_not_specialize=_PER_STEP_INTS)
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_lse_ptr, rows_ptr, tables_ptr, lens_ptr, scale, window,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh, stride_tb,
    HAS_ROWS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (b, kv_head, part): with SPLITS 1 the whole attention of that sequence's query heads,
    written to out; else its part of the keys (whole tiles, the parts covering the window's tiles in
    order), written as each head's normalised partial output and log-sum-exp to part_out/part_lse
    ([B, heads, SPLITS, HEAD_DIM] and [B, heads, SPLITS], float32) for _merge_splits_kernel."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_t = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    in_group = offs_g < GROUP
    in_dim = offs_d < HEAD_DIM
    first_key = tl.maximum(length - window, 0)  # the oldest key the window still sees
    begin = first_key // BLOCK_N * BLOCK_N
    end = length
    if SPLITS > 1:
        tiles_per_part = tl.cdiv(tl.cdiv(length - begin, BLOCK_N), SPLITS)
        begin = begin + part * tiles_per_part * BLOCK_N
        end = tl.minimum(begin + tiles_per_part * BLOCK_N, length)
    row = tl.load(rows_ptr + b) if HAS_ROWS else b
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=in_group[:, None] & in_dim[None, :], other=0.0)  # fmt: skip
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for start in range(begin, end, BLOCK_N):
        pos = start + offs_t
        valid = (pos < end) & (pos >= first_key)
        pages = tl.load(tables_ptr + b * stride_tb + pos // PAGE, mask=pos < end, other=0)
        slots = pages.to(tl.int64) * PAGE + pos % PAGE
        kv_mask = valid[:, None] & in_dim[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = _dot(q, tl.trans(k), PRECISION) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m, total, acc = _softmax_step(scores, v, m, total, acc, PRECISION)
    if SPLITS == 1:
        out = acc / total[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=in_group[:, None] & in_dim[None, :])  # fmt: skip
    else:  # a part past the sequence's keys has total 0: log-sum-exp -inf, weight 0 in the merge
        empty = total == 0.0
        partial = acc / tl.where(empty, 1.0, total)[:, None]
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, total)))
        entry = (b * tl.num_programs(1) * GROUP + heads) * SPLITS + part  # [b, head, part]
        tl.store(part_out_ptr + entry[:, None] * HEAD_DIM + offs_d[None, :], partial, mask=in_group[:, None] & in_dim[None, :])
        tl.store(part_lse_ptr + entry, lse, mask=in_group)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, rows_ptr, stride_ot, stride_oh,
    HAS_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    """Program (b, head): the parts' outputs weighted by exp(their log-sum-exp - the largest), which is
    the softmax over all the keys. Part 0 always holds a key (the oldest one the window sees)."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, D_PAD)
    in_split = offs_s < SPLITS
    in_dim = offs_d < HEAD_DIM
    entry = (b * tl.num_programs(1) + head) * SPLITS + offs_s
    lse = tl.load(part_lse_ptr + entry, mask=in_split, other=float("-inf"))
    weight = tl.exp(lse - tl.max(lse, 0))
    partial = tl.load(part_out_ptr + entry[:, None] * HEAD_DIM + offs_d[None, :], mask=in_split[:, None] & in_dim[None, :],
                      other=0.0)  # fmt: skip
    out = tl.sum(partial * weight[:, None], 0) / tl.sum(weight, 0)
    row = tl.load(rows_ptr + b) if HAS_ROWS else b
    tl.store(out_ptr + row * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=in_dim)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None = None,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Decode attention of B sequences' single queries.

    q [T, H, D]: query b is row `rows[b]` of q (rows None: row b); caches [slots, KVH, D] with slot =
    block * block_size + offset; block_tables [B, max_blocks] (int32/64); context_lens [B] (query
    included). The output goes to the same rows of `out` ([T, H, D]; a new tensor when None), which is
    returned. `splits`: parts per sequence's keys (None: decode_splits). Nothing here reads a tensor's
    value on the host: the call is CUDA-graph safe."""
    batch = block_tables.shape[0]
    _, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    splits = splits or decode_splits(batch, kv_heads, q.device)
    part_out = part_lse = out  # unused with one part (a pointer all the same)
    if splits > 1:
        part_out = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    row_ids = rows if rows is not None else context_lens  # a pointer all the same without HAS_ROWS
    _paged_decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, out, part_out, part_lse, row_ids, block_tables, context_lens, scale, window or _NO_WINDOW,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0),
        HAS_ROWS=rows is not None, GROUP=group, GROUP_PAD=_pad(group), HEAD_DIM=head_dim,
        D_PAD=_pad(head_dim), PAGE=block_size, BLOCK_N=_DECODE_N, SPLITS=splits, PRECISION=_precision(q),
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(batch, heads)](
            part_out, part_lse, out, row_ids, out.stride(0), out.stride(1),
            HAS_ROWS=rows is not None, HEAD_DIM=head_dim, D_PAD=_pad(head_dim), SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits), num_warps=1,
        )  # fmt: skip
    return out


@triton.jit(do_not_specialize=_PER_STEP_INTS)
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, starts_ptr, lens_ptr, cached_ptr, tables_ptr, scale, window,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh, stride_tb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    length = tl.load(lens_ptr + chunk)
    if tile * BLOCK_M >= length:
        return
    first_row = tl.load(starts_ptr + chunk)
    cached = tl.load(cached_ptr + chunk)  # tokens of the sequence cached before this chunk
    kv_head = head // GROUP
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    in_chunk = offs_m < length
    in_dim = offs_d < HEAD_DIM
    q_pos = cached + offs_m
    q = tl.load(q_ptr + (first_row + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=in_chunk[:, None] & in_dim[None, :], other=0.0)  # fmt: skip
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    last_pos = cached + tl.minimum(tile * BLOCK_M + BLOCK_M, length)  # one past this tile's last query
    lo = tl.maximum(cached + tile * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, last_pos, BLOCK_N):
        k_pos = start + offs_n
        in_context = k_pos < last_pos
        pages = tl.load(tables_ptr + chunk * stride_tb + k_pos // PAGE, mask=in_context, other=0)
        slots = pages.to(tl.int64) * PAGE + k_pos % PAGE
        kv_mask = in_context[:, None] & in_dim[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = _dot(q, tl.trans(k), PRECISION) * scale
        seen = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window) & in_context[None, :]
        scores = tl.where(seen, scores, float("-inf"))
        m, total, acc = _softmax_step(scores, v, m, total, acc, PRECISION)
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out_ptr + (first_row + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=in_chunk[:, None] & in_dim[None, :])  # fmt: skip


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    chunk_starts: torch.Tensor,
    chunk_lens: torch.Tensor,
    chunk_cached: torch.Tensor,
    block_tables: torch.Tensor,
    max_len: int,
    block_size: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of C prefill chunks packed in q [T, H, D].

    Chunk c is rows chunk_starts[c] .. + chunk_lens[c] of q, at positions chunk_cached[c] onwards; its
    keys are its sequence's cache positions 0 .. chunk_cached[c] + chunk_lens[c] - 1, read through
    block_tables[c] (the chunk's own K/V already written there). max_len >= every chunk_lens[c] (a
    host value: it sizes the grid). Writes those rows of `out` [T, H, D] and returns it."""
    chunks = block_tables.shape[0]
    if chunks == 0 or max_len == 0:
        return out
    heads, head_dim = q.shape[1], q.shape[2]
    group = heads // k_cache.shape[1]
    tile = prefill_tile(q.element_size())
    grid = (chunks, triton.cdiv(max_len, tile), heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, chunk_starts, chunk_lens, chunk_cached, block_tables, scale, window or _NO_WINDOW,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, D_PAD=_pad(head_dim), PAGE=block_size,
        BLOCK_M=tile, BLOCK_N=tile, PRECISION=_precision(q),
    )  # fmt: skip
    return out
