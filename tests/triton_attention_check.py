"""Run under TRITON_INTERPRET=1 by tests/test_triton_attention.py (and compiled on a GPU by
bench/device_check.sh, FLEETLM_CHECK_DEVICE=cuda): the Triton attention backend against the plain-torch
one, on the same mixed steps built by the runner (StepInputs): decodes and prefill chunks packed
together, fresh prompts and chunks after a cached prefix, ragged lengths over several cache blocks and
query tiles, decodes first and scattered; GQA, MHA and MQA, a head size that is no power of two, a
sliding window."""

import os
import random

import torch

from serving.models.attention import PagedAttention
from serving.models.native import StepInputs
from serving.models.runner import ForwardChunk

DEVICE = torch.device(os.environ.get("FLEETLM_CHECK_DEVICE", "cpu"))
BLOCK_SIZE = 16
rng = random.Random(0)
torch.manual_seed(0)


def chunks_for(plan: list[tuple[int, int]], num_blocks: int) -> list[ForwardChunk]:
    """plan: (tokens already cached, new tokens) per chunk; one new token after a cache is a decode."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    chunks = []
    for key, (cached, new) in enumerate(plan):
        blocks = -(-(cached + new) // BLOCK_SIZE)
        table, free = free[:blocks], free[blocks:]
        chunks.append(ForwardChunk(key, [0] * new, cached, table, decode=new == 1 and cached > 0))
    return chunks


def run(backend: str, chunks, q, k, v, k_cache, v_cache, attn: PagedAttention, dtype) -> tuple[torch.Tensor, ...]:
    step = StepInputs.build(chunks, [0], BLOCK_SIZE, backend, DEVICE)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = attn.forward(q, k, v, kc, vc, step.batch)
    return out.float().cpu(), kc.float().cpu(), vc.float().cpu()


def tolerance(dtype: torch.dtype) -> float:
    """Largest difference allowed between the two backends' outputs."""
    return 2e-2 if dtype is torch.bfloat16 else 1e-4


PLANS = {
    "decodes first, then prefills": [(40, 1), (1, 1), (17, 1), (0, 37), (20, 13), (16, 16), (5, 1)],
    "scattered decodes": [(0, 5), (33, 1), (7, 21), (64, 1), (2, 1)],
    "prefills only": [(0, 1), (0, 50), (31, 2)],
    "decodes only": [(1, 1), (15, 1), (16, 1), (47, 1)],
}
for heads, kv_heads, head_dim, window, dtype in (
    (4, 2, 16, None, torch.float32),
    (8, 8, 32, None, torch.float32),
    (6, 1, 16, None, torch.float32),
    (4, 2, 24, None, torch.float32),
    (4, 2, 16, 7, torch.float32),
    (4, 2, 16, None, torch.bfloat16),
):
    attn = PagedAttention(heads, kv_heads, head_dim, head_dim**-0.5, window)
    for name, plan in PLANS.items():
        num_blocks = 40
        chunks = chunks_for(plan, num_blocks)
        tokens = sum(len(c.token_ids) for c in chunks)
        k_cache = torch.randn(num_blocks * BLOCK_SIZE, kv_heads, head_dim, device=DEVICE).to(dtype)
        v_cache = torch.randn(num_blocks * BLOCK_SIZE, kv_heads, head_dim, device=DEVICE).to(dtype)
        qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device=DEVICE).to(dtype)
        q, k, v = qkv[:, :heads], qkv[:, heads : heads + kv_heads], qkv[:, heads + kv_heads :]  # strided, as the model's
        want = run("torch", chunks, q, k, v, k_cache, v_cache, attn, dtype)
        got = run("triton", chunks, q, k, v, k_cache, v_cache, attn, dtype)
        error = (got[0] - want[0]).abs().max().item()
        assert error < tolerance(dtype), (heads, kv_heads, head_dim, window, dtype, name, error)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), "the caches differ"

# Split-K decode: each sequence's keys read in parts (as a GPU does for a few sequences) and merged, against
# the torch path: parts of several tiles, parts past a short sequence's keys, windows that start mid-part.
from serving.models.triton_attention import paged_decode_attention  # noqa: E402

DECODE_PLAN = [(0, 1), (16, 1), (100, 1), (230, 1), (63, 1)]  # one token at position 0: a one-key sequence
for heads, kv_heads, head_dim, window, dtype in (
    (4, 2, 16, None, torch.float32),
    (6, 1, 24, None, torch.float32),
    (4, 2, 16, 45, torch.float32),
    (4, 2, 16, None, torch.bfloat16),
):
    attn = PagedAttention(heads, kv_heads, head_dim, head_dim**-0.5, window)
    chunks = [ForwardChunk(c.key, c.token_ids, c.start, c.block_table, True) for c in chunks_for(DECODE_PLAN, 80)]
    k_cache = torch.randn(80 * BLOCK_SIZE, kv_heads, head_dim, device=DEVICE).to(dtype)
    v_cache = torch.randn(80 * BLOCK_SIZE, kv_heads, head_dim, device=DEVICE).to(dtype)
    q = torch.randn(7, heads, head_dim, device=DEVICE).to(dtype)
    rows = torch.tensor([2, 0, 5, 3, 6], device=DEVICE)  # scattered rows of a mixed step
    step = StepInputs.build(chunks, [0], BLOCK_SIZE, "torch", DEVICE)
    want = attn._decode_torch(q[rows], k_cache, v_cache, step.batch).float().cpu()
    for splits in (3, 8):  # a part count no power of two (padded in the merge), and one leaving parts empty
        out = torch.zeros(7, heads, head_dim, device=DEVICE, dtype=dtype)
        paged_decode_attention(q, k_cache, v_cache, step.batch.decode_blocks,
                               step.batch.decode_lens, BLOCK_SIZE, attn.scale, window, rows, out, splits)  # fmt: skip
        got = out[rows].float().cpu()
        error = (got - want).abs().max().item()
        assert error < tolerance(dtype), ("split decode", heads, kv_heads, head_dim, window, dtype, splits, error)
        untouched = torch.ones(7, dtype=torch.bool)
        untouched[rows.cpu()] = False
        assert not out[untouched.to(DEVICE)].any(), "split decode wrote rows that are not its queries'"
print("ok")
