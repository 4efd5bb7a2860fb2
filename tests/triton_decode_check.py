"""Run under TRITON_INTERPRET=1 by tests/test_triton_attention.py: the Triton paged decode kernel
against the plain-torch path (cpu_ops.paged_decode_attention_reference: gather the blocks, SDPA), on
tiny shapes, GQA, MHA and MQA, ragged lengths."""

import os

import torch

from serving.models.cpu_ops import paged_decode_attention_reference
from serving.models.triton_attention import paged_decode_attention

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
    got = paged_decode_attention(*on, block_size, scale).cpu()
    want = paged_decode_attention_reference(q, k_cache, v_cache, tables.long(), lens, block_size, scale)
    error = (got - want).abs().max().item()
    assert error < 1e-4, (heads, kv_heads, head_dim, error)
print("ok")
