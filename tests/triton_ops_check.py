"""Run under TRITON_INTERPRET=1 by tests/test_triton_ops.py (and compiled on a GPU by
bench/device_check.sh, FLEETLM_CHECK_DEVICE=cuda): the fused Triton RMS norm (with and without the
residual add), rotary embedding with the K/V cache write, and silu * up against the torch path they
replace (cpu_ops' references, PagedAttention's index_copy_), in float32 and bfloat16, on sizes that
are no power of two, strided rows (the q, k and v heads inside the fused qkv), partial rotary and
zero rows."""

import os

import torch

from serving.models import cpu_ops, triton_ops

DEVICE = torch.device(os.environ.get("FLEETLM_CHECK_DEVICE", "cpu"))
torch.manual_seed(0)


# float32: reductions in another order. bfloat16: the same roundings, so an ulp apart at most (2^-8 of
# the value) on a GPU; the interpreter truncates where a GPU rounds to nearest, a few ulps over a kernel.
BF16_TOL = 4e-2 if os.environ.get("TRITON_INTERPRET") == "1" else 1e-2


def close(got: torch.Tensor, want: torch.Tensor, what) -> None:
    tol = dict(atol=1e-5, rtol=1e-5) if got.dtype == torch.float32 else dict(atol=BF16_TOL, rtol=BF16_TOL)
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype, got.shape, want.shape)
    assert torch.allclose(got.float(), want.float(), **tol), (what, (got.float() - want.float()).abs().max().item())


for dtype in (torch.float32, torch.bfloat16):
    for rows, dim in ((1, 64), (5, 96), (3, 576), (0, 64), (2, 4096)):
        x = torch.randn(rows, dim, device=DEVICE).to(dtype)
        w = (1 + 0.1 * torch.randn(dim, device=DEVICE)).to(dtype)
        close(triton_ops.rms_norm(x, w, 1e-5), cpu_ops.rms_norm_reference(x, w, 1e-5), ("rms_norm", dtype, rows, dim))
        residual = torch.randn(rows, dim, device=DEVICE).to(dtype)
        want_res = residual.clone().add_(x)  # what cpu_ops.add_rms_norm does off its C kernel
        want = cpu_ops.rms_norm_reference(want_res, w, 1e-5)
        got = triton_ops.rms_norm(x, w, 1e-5, residual=residual)
        close(got, want, ("add_rms_norm", dtype, rows, dim))
        close(residual, want_res, ("add_rms_norm residual", dtype, rows, dim))

    for rows, inter in ((1, 96), (4, 1536), (0, 32), (3, 1000)):
        gate_up = torch.randn(rows, 2 * inter, device=DEVICE).to(dtype)
        close(triton_ops.silu_mul(gate_up), cpu_ops.silu_mul_reference(gate_up), ("silu_mul", dtype, rows, inter))

    for heads, kv_heads, head_dim, rot in ((4, 2, 16, 16), (8, 8, 64, 64), (3, 1, 80, 40), (2, 1, 96, 96)):
        tokens, max_pos, num_slots = 7, 64, 40
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        freqs = torch.arange(max_pos, dtype=torch.float32).unsqueeze(1) * inv_freq
        emb = torch.cat((freqs, freqs), -1).to(DEVICE)
        cos, sin = emb.cos() * 1.1, emb.sin() * 1.1  # a scale, as YaRN-style tables carry
        qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, device=DEVICE).to(dtype)  # q, k, v heads: strided rows
        positions = torch.randint(0, max_pos, (tokens,), device=DEVICE)
        slots = torch.randperm(num_slots, device=DEVICE)[:tokens]
        caches = [torch.randn(num_slots, kv_heads, head_dim, device=DEVICE).to(dtype) for _ in range(4)]
        # The torch path: q and k rotated in place, then k and v copied into the caches (PagedAttention).
        want = cpu_ops.rotary_reference_(qkv.clone(), heads + kv_heads, cos, sin, positions)
        want_k, want_v = caches[0].index_copy_(0, slots, want[:, heads : heads + kv_heads]), caches[1].index_copy_(0, slots, want[:, heads + kv_heads :])
        got = qkv.clone()
        got_k, got_v = caches[2].copy_(caches[0]), caches[3].copy_(caches[1])
        got_k.index_fill_(0, slots, 0.0), got_v.index_fill_(0, slots, 0.0)  # written, not left over
        triton_ops.rotary_into_cache_(got, got[:, heads + kv_heads :], heads, cos, sin, positions, got_k, got_v, slots)
        what = (dtype, heads, kv_heads, head_dim, rot)
        close(got[:, :heads], want[:, :heads], ("rotary q", *what))
        close(got_k, want_k, ("rotary k into the cache", *what))
        assert torch.equal(got_v, want_v), ("v into the cache", *what)
        assert torch.equal(got[:, heads:], qkv[:, heads:]), "k and v stay where they were in qkv"
print("ok")
