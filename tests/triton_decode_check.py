"""Run under TRITON_INTERPRET=1 by tests/test_triton_attention.py: the Triton paged decode kernel
against plain torch (gather the blocks, SDPA), on tiny shapes, GQA and MHA, ragged lengths."""

import os

import torch
import torch.nn.functional as F

from serving.models.triton_attention import paged_decode_attention


def reference(q, k_cache, v_cache, tables, lens, block_size, scale):
    out = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        slots = torch.cat([torch.arange(int(blk) * block_size, int(blk) * block_size + block_size) for blk in tables[b]])[:n]
        k, v = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)  # [KVH, n, D]
        group = q.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        out.append(F.scaled_dot_product_attention(q[b].unsqueeze(1), k, v, scale=scale).squeeze(1))
    return torch.stack(out)


DEVICE = os.environ.get("FLEETLM_CHECK_DEVICE", "cpu")  # bench/device_check.sh runs it on cuda, compiled
torch.manual_seed(0)
for heads, kv_heads, head_dim in ((4, 2, 16), (8, 8, 32), (6, 1, 16)):
    block_size, blocks = 16, 12
    lens = torch.tensor([1, 17, 40, 5])
    tables = torch.stack([torch.randperm(blocks)[:3] for _ in lens]).to(torch.int32)
    k_cache = torch.randn(blocks * block_size, kv_heads, head_dim)
    v_cache = torch.randn(blocks * block_size, kv_heads, head_dim)
    q = torch.randn(len(lens), heads, head_dim)
    scale = head_dim**-0.5
    on = [t.to(DEVICE) for t in (q, k_cache, v_cache, tables, lens.to(torch.int32))]
    got = paged_decode_attention(*on[:4], on[4], block_size, scale).cpu()
    want = reference(q, k_cache, v_cache, tables, lens, block_size, scale)
    error = (got - want).abs().max().item()
    assert error < 1e-4, (heads, kv_heads, head_dim, error)
print("ok")
