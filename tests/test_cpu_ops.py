"""The fused CPU kernels (serving/models/_cpu_ops.c through serving.models.cpu_ops) against torch.

Every kernel runs on both code paths (AVX2 and portable, switched with the extension's set_simd) and
is compared with its torch reference (the code the wrappers fall back to, and what llama.py /
attention.py compute), and where it helps with float64.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from serving.models import cpu_ops, cpu_qmm
from serving.models.attention import AttentionBatch, PagedAttention
from serving.models.llama import RMSNorm, Rotary

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="serving.models._qmm not built (or no SIMD)")

NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=["avx2", "scalar"])
def path(request):
    ext = cpu_ops._ext
    ext.set_simd(request.param)
    yield request.param
    ext.set_simd(cpu_qmm._SIMD)


@pytest.fixture
def threads():
    """Set the pool's threads inside a test; back to following torch afterwards."""
    yield cpu_qmm.set_num_threads
    cpu_qmm.set_num_threads(None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_rel(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float = 1e-30) -> None:
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=rtol, atol=atol, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# RMS norm


@pytest.mark.parametrize("dim", [576, 64, 16, 13, 1, 1000])
@pytest.mark.parametrize("rows", [1, 17])
def test_rms_norm(path, rows, dim):
    g = gen(dim * rows)
    x = torch.randn(rows, dim, generator=g) * torch.logspace(-3, 2, rows).unsqueeze(1)
    w = torch.randn(dim, generator=g)
    eps = 1e-5
    out = cpu_ops.rms_norm(x, w, eps)
    assert_rel(out, F.rms_norm(x, (dim,), w, eps), rtol=1e-6)
    x64 = x.double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    assert_rel(out, exact, rtol=4e-7)
    # In place (out is x) and a 3-D input.
    y = x.clone().view(rows, 1, dim)
    assert cpu_ops.rms_norm(y, w, eps, out=y) is y
    assert torch.equal(y.view(rows, dim), out)


@pytest.mark.parametrize("dim", [576, 16, 13])
def test_add_rms_norm(path, dim):
    g = gen(dim)
    x, res, w = torch.randn(17, dim, generator=g), torch.randn(17, dim, generator=g), torch.randn(dim, generator=g)
    res_ref = res + x
    r = res.clone()
    out = cpu_ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(r, res_ref)  # the float32 sum, bit for bit
    assert_rel(out, F.rms_norm(res_ref, (dim,), w, 1e-6), rtol=1e-6)
    # out may be x.
    r2, x2 = res.clone(), x.clone()
    cpu_ops.add_rms_norm(x2, r2, w, 1e-6, out=x2)
    assert torch.equal(x2, out) and torch.equal(r2, res_ref)


def test_rms_norm_special_values(path):
    dim = 40
    x = torch.randn(6, dim, generator=gen(0))
    x[0, 3] = INF  # inf: mean inf, scale 0: NaN at the inf, 0 elsewhere (as torch)
    x[1, 5] = NAN
    x[2] = 0.0  # eps keeps it finite: zeros
    x[3, 7] = -INF
    x[4] = 1e-30  # tiny: the scale is large but finite
    w = torch.randn(dim, generator=gen(1))
    out = cpu_ops.rms_norm(x, w, 1e-5)
    assert_rel(out, F.rms_norm(x, (dim,), w, 1e-5), rtol=1e-6)
    assert torch.isnan(out[1]).all() and (out[2] == 0).all()
    # Where x^2 overflows float32, torch's float32 mean is inf and its result 0; the kernel sums
    # the squares in float64 and gets the right answer.
    big = torch.full((1, dim), 1e25)
    assert_rel(cpu_ops.rms_norm(big, w, 1e-5), w.view(1, -1), rtol=1e-6)
    # add_rms_norm: the residual takes the specials, out follows.
    r = torch.zeros(6, dim)
    out2 = cpu_ops.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(r.nan_to_num(0.5), x.nan_to_num(0.5))
    assert_rel(out2, out, rtol=0)


def test_rms_norm_fallbacks():
    g = gen(3)
    x, w = torch.randn(5, 64, generator=g), torch.randn(64, generator=g)
    # Another dtype: HF's mixed-precision math, as llama.RMSNorm.
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
    xb = x.bfloat16()
    assert torch.equal(cpu_ops.rms_norm(xb, norm.weight.data.bfloat16(), 1e-5), norm.bfloat16()(xb))
    # A non-contiguous view: torch, same values.
    xt = torch.randn(64, 5, generator=g).t()
    assert_rel(cpu_ops.rms_norm(xt, w, 1e-5), F.rms_norm(xt, (64,), w, 1e-5), rtol=0)
    with pytest.raises(ValueError):
        cpu_ops.rms_norm(x, torch.randn(63), 1e-5)
    with pytest.raises(ValueError):
        cpu_ops.add_rms_norm(x, torch.zeros(5, 32), torch.randn(32), 1e-5)


# ---------------------------------------------------------------------------------------------------
# Rotary


def rotary_tables(head_dim: int, rot_dim: int, max_positions: int = 4096, scale: float = 1.0) -> Rotary:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
    return Rotary(inv_freq, scale, max_positions)


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,rot_dim",
    [(9, 3, 64, 64), (4, 4, 16, 16), (8, 1, 64, 32), (4, 2, 64, 24), (2, 2, 20, 12), (3, 1, 128, 128)],
)
@pytest.mark.parametrize("T", [1, 17])
def test_rotary_matches_llama(path, T, heads, kv_heads, head_dim, rot_dim):
    rope = rotary_tables(head_dim, rot_dim, scale=1.25)
    g = gen(T * head_dim + rot_dim)
    # The fused qkv rows of the model: q and k heads rotate (one strided view), v stays.
    qkv = torch.randn(T, heads + 2 * kv_heads, head_dim, generator=g)
    positions = torch.randint(0, rope.max_positions, (T,), generator=g)
    positions[0] = rope.max_positions - 1
    cos, sin = rope.lookup(positions, torch.float32)
    expected = qkv.clone()
    expected[:, : heads + kv_heads] = Rotary.apply(qkv[:, : heads + kv_heads], cos, sin)
    x = qkv.clone()
    view = x[:, : heads + kv_heads]
    assert cpu_ops.rotary_(view, heads + kv_heads, rope.cos, rope.sin, positions) is view
    assert torch.equal(x, expected)  # the same two products and one sum: bit for bit
    # Only the first `heads` heads (q alone) of a view.
    y = qkv.clone()
    cpu_ops.rotary_(y, heads, rope.cos, rope.sin, positions)
    assert torch.equal(y[:, :heads], expected[:, :heads]) and torch.equal(y[:, heads:], qkv[:, heads:])


def test_rotary_rows_strided(path):
    """Rows further apart than their heads (e.g. every other row of a bigger buffer)."""
    rope = rotary_tables(64, 64)
    buf = torch.randn(34, 6, 64, generator=gen(4))
    x = buf[::2]  # row stride 2 * 6 * 64
    assert x.stride(0) == 768
    positions = torch.arange(17) * 7
    ref = buf.clone()
    cpu_ops.rotary_reference_(ref[::2], 4, rope.cos, rope.sin, positions)
    cpu_ops.rotary_(x, 4, rope.cos, rope.sin, positions)
    assert torch.equal(buf, ref)


def test_rotary_special_values_and_errors(path):
    rope = rotary_tables(16, 16, max_positions=64)
    x = torch.randn(3, 2, 16, generator=gen(5))
    x[0, 0, 1], x[1, 1, 9], x[2, 0, 0] = INF, NAN, -INF
    positions = torch.tensor([0, 5, 63])
    ref = cpu_ops.rotary_reference_(x.clone(), 2, rope.cos, rope.sin, positions)
    out = cpu_ops.rotary_(x.clone(), 2, rope.cos, rope.sin, positions)
    assert_rel(out, ref, rtol=0, atol=0)
    before = x.clone()
    with pytest.raises(IndexError):
        cpu_ops.rotary_(x, 2, rope.cos, rope.sin, torch.tensor([0, 64, 1]))
    with pytest.raises(IndexError):
        cpu_ops.rotary_(x, 2, rope.cos, rope.sin, torch.tensor([0, -1, 1]))
    assert_rel(x, before, rtol=0, atol=0)  # checked before anything is written
    with pytest.raises(ValueError):
        cpu_ops.rotary_(x, 3, rope.cos, rope.sin, positions)  # more heads than x has


# ---------------------------------------------------------------------------------------------------
# SiLU * up and the vector exp


def wide_values(n: int, seed: int) -> torch.Tensor:
    """Random values over [-120, 120] plus the edges of exp's range and specials."""
    g = gen(seed)
    v = (torch.rand(n, generator=g) * 240 - 120) * torch.rand(n, generator=g) ** 3
    special = torch.tensor(
        [0.0, -0.0, INF, -INF, NAN, 1e-40, -1e-40, 88.72, -88.72, 88.8, -88.8, 89.0, -89.0, 87.3, -87.3,
         103.9, -103.9, 104.0, -104.0, 150.0, -150.0, 1e30, -1e30]
    )
    m = min(n, special.numel())
    v[:m] = special[:m]
    return v


@pytest.mark.parametrize("inter", [1536, 64, 16, 13, 1])
@pytest.mark.parametrize("rows", [1, 17])
def test_silu_mul(path, rows, inter):
    g = gen(inter)
    gate = wide_values(rows * inter, inter).view(rows, inter)
    up = torch.randn(rows, inter, generator=g)
    if up.numel() > 30:  # after the specials of gate
        up.view(-1)[25:30] = torch.tensor([INF, NAN, 0.0, -INF, 1e-38])
    gate_up = torch.cat((gate, up), dim=1)
    out = cpu_ops.silu_mul(gate_up)
    assert out.shape == (rows, inter)
    # atol: where exp(-g) is near float32's largest value, torch and we may round to either side
    # of inf (results ~1e-37 or -0).
    assert_rel(out, F.silu(gate) * up, rtol=1e-6, atol=1e-35)
    g64 = gate.double()
    exact = (g64 / (1 + torch.exp(-g64))) * up.double()
    finite = exact.abs() < 3e38
    assert_rel(out[finite], exact[finite], rtol=6e-7, atol=1e-35)
    # 3-D input, out=.
    o = torch.empty(rows, 1, inter)
    assert cpu_ops.silu_mul(gate_up.view(rows, 1, 2 * inter), out=o) is o
    assert torch.equal(o.view(rows, inter).nan_to_num(7.0), out.nan_to_num(7.0))


def test_exp(path):
    x = torch.cat((torch.linspace(-110, 95, 400_003), wide_values(1000, 9)))
    out = torch.empty_like(x)
    cpu_ops._ext._exp(x.data_ptr(), out.data_ptr(), x.numel())
    exact = x.double().exp()
    normal = (exact >= 2.0**-126) & (exact <= 3.4028234663852886e38)
    rel = ((out.double() - exact).abs() / exact)[normal]
    assert rel.max() < 2.5e-7  # 2 ulp
    sub = exact < 2.0**-126  # subnormal and zero results: within one subnormal step
    assert ((out.double() - exact).abs()[sub] <= 2.0**-149).all()
    assert (out[exact > 3.4028234663852886e38] == INF).all()
    assert torch.isnan(out[x.isnan()]).all() and not torch.isnan(out[~x.isnan()]).any()
    assert_rel(out, torch.exp(x), rtol=3e-7, atol=3e-45)


# ---------------------------------------------------------------------------------------------------
# Paged decode attention


def make_case(B, H, KVH, D, block_size, lens, seed, nan_garbage=False):
    """Caches with shuffled block tables; the blocks a sequence does not own hold NaN when asked."""
    g = gen(seed)
    width = max(-(-n // block_size) for n in lens) + 1  # one spare column, padded with 0
    need = sum(-(-n // block_size) for n in lens)
    num_blocks = need + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(B, width, dtype=torch.int64)
    k = torch.randn(num_blocks * block_size, KVH, D, generator=g)
    v = torch.randn(num_blocks * block_size, KVH, D, generator=g)
    at = 0
    for b, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[b, :nb] = perm[at : at + nb]
        at += nb
    q_rows = torch.randn(B, H + 2 * KVH, D, generator=g)  # q is a strided view of a fused qkv tensor
    return q_rows[:, :H], k, v, tables, torch.tensor(lens, dtype=torch.int64)


def exact_attention(q, k, v, tables, lens, block_size, scale, window):
    """Float64, one sequence and head at a time."""
    B, H, D = q.shape
    group = H // k.shape[1]
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        L = int(lens[b])
        first = max(0, L - window) if window else 0
        pos = torch.arange(first, L)
        slots = tables[b, pos // block_size] * block_size + pos % block_size
        for h in range(H):
            kk, vv = k[slots, h // group].double(), v[slots, h // group].double()
            p = torch.softmax(kk @ q[b, h].double() * scale, dim=0)
            out[b, h] = p @ vv
    return out


def decode_reference(q, k, v, tables, lens, block_size, scale, window):
    """PagedAttention's torch decode path itself (attention.py; _decode uses the kernel on CPU)."""
    B, H, D = q.shape
    attn = PagedAttention(H, k.shape[1], D, scale, window)
    batch = AttentionBatch(
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        block_size=block_size,
        decode_rows=torch.arange(B),
        decode_blocks=tables,
        decode_lens=lens,
        decodes_first=True,
    )
    return attn._decode_torch(q, k, v, batch)


SHAPES = [(9, 3, 64), (4, 4, 16), (8, 1, 64), (4, 2, 20), (2, 1, 128)]
CONTEXTS = {
    1: [[1], [16], [17], [300]],
    17: [[1, 2, 15, 16, 17, 31, 32, 33, 47, 64, 100, 127, 128, 129, 200, 255, 300]],
}


@pytest.mark.parametrize("H,KVH,D", SHAPES)
@pytest.mark.parametrize("B", [1, 17])
@pytest.mark.parametrize("window", [None, 7, 1000])
def test_paged_decode_attention(path, B, H, KVH, D, window):
    block_size = 16
    for i, lens in enumerate(CONTEXTS[B]):
        q, k, v, tables, ctx = make_case(B, H, KVH, D, block_size, lens, seed=B * 100 + D + i)
        scale = D**-0.5
        out = cpu_ops.paged_decode_attention(q, k, v, tables, ctx, block_size, scale, window)
        exact = exact_attention(q, k, v, tables, ctx, block_size, scale, window)
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=2e-6)
        ref = decode_reference(q, k, v, tables, ctx, block_size, scale, window)
        torch.testing.assert_close(out, ref, rtol=0, atol=3e-6)
        fallback = cpu_ops.paged_decode_attention_reference(q, k, v, tables, ctx, block_size, scale, window)
        torch.testing.assert_close(fallback, ref, rtol=0, atol=0)


@pytest.mark.parametrize("block_size", [1, 5, 32])
def test_paged_decode_attention_reads_only_visible_slots(path, block_size):
    """Slots the query does not see (other sequences', free, before the window, past the length)
    hold NaN: the kernel never reads them. (The gather-and-mask reference does read them: it is fed
    the cache with NaN replaced.)"""
    B, H, KVH, D = 5, 6, 2, 32
    lens = [1, block_size, block_size + 1, 77, 150]
    q, k, v, tables, ctx = make_case(B, H, KVH, D, block_size, lens, seed=block_size)
    window = 40
    k_nan, v_nan = torch.full_like(k, NAN), torch.full_like(v, NAN)
    for b, n in enumerate(lens):
        pos = torch.arange(max(0, n - window), n)
        slots = tables[b, pos // block_size] * block_size + pos % block_size
        k_nan[slots], v_nan[slots] = k[slots], v[slots]
    out = cpu_ops.paged_decode_attention(q, k_nan, v_nan, tables, ctx, block_size, 0.2, window)
    assert not out.isnan().any()
    ref = decode_reference(q, k_nan.nan_to_num(0), v_nan.nan_to_num(0), tables, ctx, block_size, 0.2, window)
    torch.testing.assert_close(out, ref, rtol=0, atol=3e-6)


def test_paged_decode_attention_special_scores(path):
    """A huge score dominates (the running max is subtracted); a NaN in a visible key gives NaN."""
    q, k, v, tables, ctx = make_case(2, 2, 1, 16, 4, [9, 9], seed=11)
    k[tables[0, 1] * 4 + 2, 0] = q[0, 0] * 1e3  # position 6 of sequence 0: score ~1e3 * |q|^2
    out = cpu_ops.paged_decode_attention(q, k, v, tables, ctx, 4, 1.0, None)
    torch.testing.assert_close(out[0, 0], v[tables[0, 1] * 4 + 2, 0], rtol=0, atol=1e-6)
    assert not out.isnan().any()
    k[tables[1, 0] * 4, 0, 3] = NAN
    out = cpu_ops.paged_decode_attention(q, k, v, tables, ctx, 4, 1.0, None)
    assert out[1].isnan().all() and not out[0].isnan().any()


def test_paged_decode_attention_threads_identical(path, threads):
    lens = [300, 5, 299, 17, 64, 128, 200, 1, 33, 250, 16, 100, 180, 2, 77, 290, 150]
    q, k, v, tables, ctx = make_case(17, 9, 3, 64, 16, lens, seed=21)
    results = []
    for n in (1, 2, 1, 2):
        threads(n)
        results.append(cpu_ops.paged_decode_attention(q, k, v, tables, ctx, 16, 0.125, None))
    assert all(torch.equal(results[0], r) for r in results[1:])
    threads(2)  # batch 1 (below the pool's threshold at this length, and above it)
    for n in (30, 300):
        q1, k1, v1, t1, c1 = make_case(1, 9, 3, 64, 16, [n], seed=n)
        a = cpu_ops.paged_decode_attention(q1, k1, v1, t1, c1, 16, 0.125, None)
        threads(1)
        assert torch.equal(a, cpu_ops.paged_decode_attention(q1, k1, v1, t1, c1, 16, 0.125, None))
        threads(2)


def test_paged_decode_attention_checks_and_fallback():
    q, k, v, tables, ctx = make_case(3, 4, 2, 16, 8, [5, 20, 9], seed=3)
    out = torch.empty(3, 4, 16)
    assert cpu_ops.paged_decode_attention(q, k, v, tables, ctx, 8, 0.25, 0, out=out) is out
    ref = decode_reference(q, k, v, tables, ctx, 8, 0.25, None)
    torch.testing.assert_close(out, ref, rtol=0, atol=3e-6)
    with pytest.raises(ValueError):  # empty context
        cpu_ops.paged_decode_attention(q, k, v, tables, torch.tensor([5, 0, 9]), 8, 0.25, None)
    with pytest.raises(ValueError):  # longer than its block table
        cpu_ops.paged_decode_attention(q, k, v, tables, torch.tensor([5, 20, 8 * tables.shape[1] + 1]), 8, 0.25, None)
    bad = tables.clone()
    bad[1, 2] = k.shape[0] // 8  # one block past the cache
    with pytest.raises(IndexError):
        cpu_ops.paged_decode_attention(q, k, v, bad, ctx, 8, 0.25, None)
    with pytest.raises(ValueError):  # KV heads do not divide the query heads
        cpu_ops.paged_decode_attention(q[:, :3], k, v, tables, ctx, 8, 0.25, None)
    # Float64: the torch reference path.
    out64 = cpu_ops.paged_decode_attention(q.double(), k.double(), v.double(), tables, ctx, 8, 0.25, None)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, exact_attention(q, k, v, tables, ctx, 8, 0.25, None), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Threads, for the elementwise kernels (rows shared with the pool from 2^18 elements)


def test_elementwise_threads_identical(path, threads):
    g = gen(31)
    x, res, w = torch.randn(600, 576, generator=g), torch.randn(600, 576, generator=g), torch.randn(576, generator=g)
    gate_up = torch.randn(600, 3072, generator=g) * 4
    rope = rotary_tables(64, 64)
    qkv = torch.randn(600, 15, 64, generator=g)
    positions = torch.randint(0, rope.max_positions, (600,), generator=g)
    results = []
    for n in (1, 2):
        threads(n)
        r = res.clone()
        rot = qkv.clone()
        cpu_ops.rotary_(rot[:, :12], 12, rope.cos, rope.sin, positions)
        results.append(
            (cpu_ops.rms_norm(x, w, 1e-5), cpu_ops.add_rms_norm(x, r, w, 1e-5), r, cpu_ops.silu_mul(gate_up), rot)
        )
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert_rel(results[0][0], F.rms_norm(x, (576,), w, 1e-5), rtol=1e-6)
    assert_rel(results[0][3], cpu_ops.silu_mul_reference(gate_up), rtol=1e-6, atol=1e-35)


def test_available_and_simd():
    assert cpu_ops.simd() in ("avx2", "scalar")
    assert cpu_ops.available() == (cpu_ops.simd() != "scalar")
    assert math.isclose(cpu_ops.rms_norm(torch.ones(1, 4), torch.full((4,), 2.0), 0.0)[0, 0].item(), 2.0)
