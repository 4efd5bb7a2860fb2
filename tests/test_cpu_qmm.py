"""The CPU block-quantized matmul (serving/models/_qmm.c through serving.models.cpu_qmm).

The kernel quantizes activations per block of 32 to int8 and multiplies in integers; its result
must match `emulated_matmul` (the same arithmetic in float64) to float32 accumulation accuracy,
and the exactly dequantized reference to what int8 activations allow.
"""

import functools
import os
import threading

import pytest
import torch

from serving.models import cpu_qmm
from serving.models.quant import quantize_q4_0, quantize_q8_0

pytestmark = pytest.mark.skipif(not cpu_qmm.available(), reason="serving.models._qmm not built (or no SIMD)")

FORMATS = ("q4_0", "q4_1", "q8_0")
# (K, N): K not a power of two, N not a multiple of any tile.
SHAPES = ((576, 49), (1536, 37), (64, 960))
MS = (1, 2, 3, 5, 16, 17, 64, 300)
RTOL = 1e-5


def to_bytes(fmt: str, w: torch.Tensor) -> torch.Tensor:
    """Float weights (N, K) -> GGUF Q4_0 / Q8_0 bytes (N, K/32 * block bytes), by quant.py's quantizers."""
    N, K = w.shape
    if fmt == "q8_0":
        q, d = quantize_q8_0(w)
        parts = (d.unsqueeze(-1).view(torch.uint8), q.view(torch.uint8))
    elif fmt == "q4_0":
        packed, d = quantize_q4_0(w)
        parts = (d.unsqueeze(-1).view(torch.uint8), packed)
    else:
        raise ValueError(fmt)
    return torch.cat(parts, dim=-1).reshape(N, -1).contiguous()


def q4_1_bytes(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d, m (N, K/32) float16 and values q (N, K/32, 32) in 0..15 -> GGUF Q4_1 bytes."""
    packed = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
    parts = (d.unsqueeze(-1).view(torch.uint8), m.unsqueeze(-1).view(torch.uint8), packed)
    return torch.cat(parts, dim=-1).reshape(d.shape[0], -1).contiguous()


@functools.cache
def weights(fmt: str, K: int, N: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if fmt == "q4_1":
        KB = K // 32
        d = (torch.rand(N, KB, generator=g) * 0.05).half()
        m = (torch.randn(N, KB, generator=g) * 0.2).half()
        q = torch.randint(0, 16, (N, KB, 32), generator=g, dtype=torch.uint8)
        return q4_1_bytes(d, m, q)
    w = torch.randn(N, K, generator=g) * torch.logspace(-1, 0.5, N, dtype=torch.float32).unsqueeze(1)
    return to_bytes(fmt, w)


@functools.cache
def activations(M: int, K: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    x[:, 7] *= 20  # an outlier channel, as LLM activations have
    return x


def error_scale(x: torch.Tensor, w: torch.Tensor, fmt: str) -> torch.Tensor:
    """A bound on the sum of |terms| the kernel adds in float32, per output: |x_q| @ (|W| + |offset|)^T."""
    K = x.shape[-1]
    blocks = x.reshape(-1, K // 32, 32).double().abs()
    # |quantized x| <= |x| + half a step (max|x| / 254) of its block.
    xq = (blocks + blocks.amax(dim=-1, keepdim=True) / 254).reshape(-1, K)
    wabs = cpu_qmm.dequantize(w, fmt, K).abs()
    if fmt != "q8_0":
        # Q4 nibbles are multiplied unsigned; the offset (-8 d or m) is added per block.
        blocks = w.reshape(w.shape[0], K // 32, -1)
        dd = blocks[..., 0:2].contiguous().view(torch.float16).double()
        off = (
            blocks[..., 2:4].contiguous().view(torch.float16).double().abs()
            if fmt == "q4_1"
            else 8 * dd.abs()
        )
        wabs = wabs + (15 * dd.abs() + off).expand(-1, -1, 32).reshape(w.shape[0], K)
    return xq @ wabs.t()


def assert_matches_emulation(x, w, fmt, y=None):
    if y is None:
        y = cpu_qmm.matmul(x, w, fmt, w.shape[0])
    emulated = cpu_qmm.emulated_matmul(x, w, fmt)
    scale = error_scale(x, w, fmt).reshape(emulated.shape)
    err = (y.double() - emulated).abs()
    bad = err > RTOL * scale + 1e-37
    assert not bad.any(), f"{int(bad.sum())} outputs off, worst {(err / scale.clamp_min(1e-300)).max():.3g}"
    return y


@pytest.fixture(autouse=True)
def _restore():
    yield
    cpu_qmm.set_num_threads(None)
    cpu_qmm._qmm.set_simd(cpu_qmm._SIMD)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M", MS)
def test_matches_emulated_arithmetic(fmt, M):
    for K, N in SHAPES:
        w, x = weights(fmt, K, N), activations(M, K)
        cpu_qmm.set_num_threads(1)
        y1 = assert_matches_emulation(x, w, fmt)
        cpu_qmm.set_num_threads(2)
        y2 = cpu_qmm.matmul(x, w, fmt, N)
        # Each output is computed by one tile, whichever thread runs it: bit for bit the same.
        assert torch.equal(y1, y2), (K, N)


@pytest.mark.parametrize("fmt", FORMATS)
def test_close_to_exact_reference(fmt):
    K, N = 1536, 96
    w, x = weights(fmt, K, N), activations(64, K)
    y = cpu_qmm.matmul(x, w, fmt, N).double()
    ref = cpu_qmm.reference_matmul(x, w, fmt)
    # Int8 activations (per-block scales; an outlier channel coarsens its blocks) cost 1-2% here.
    rel = ((y - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    worst = ((y - ref).abs().max() / ref.abs().max()).item()
    print(f"{fmt}: max row relative error {rel:.2e}, max |error| / max |out| {worst:.2e}")
    assert rel < 0.03 and worst < 0.03


@pytest.mark.parametrize("fmt", FORMATS)
def test_scalar_path_matches_too(fmt):
    for K, N in ((576, 9), (64, 13)):
        w, x = weights(fmt, K, N), activations(5, K)
        simd = cpu_qmm.matmul(x, w, fmt, N)
        cpu_qmm._qmm.set_simd("scalar")
        assert cpu_qmm.simd() == "scalar"
        assert_matches_emulation(x, w, fmt)
        cpu_qmm.set_num_threads(2)
        scalar = assert_matches_emulation(x, w, fmt)
        cpu_qmm._qmm.set_simd(cpu_qmm._SIMD)
        torch.testing.assert_close(scalar, simd, rtol=1e-4, atol=1e-4)


def awkward_q8_0(N: int, K: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    KB = K // 32
    q = torch.randint(-128, 128, (N, KB, 32), generator=g, dtype=torch.int8)
    q[0] = -128  # every weight -128: |w| is 128 as an unsigned byte
    q[1, :, ::2] = 127
    q[1, :, 1::2] = -128
    d = (torch.rand(N, KB, generator=g) * 0.01).half()
    d[2] = 0  # zero blocks
    d[3, 0] = torch.tensor(2.0**-24, dtype=torch.float16)  # the smallest float16 subnormal
    d[3, 1] = torch.tensor(3 * 2.0**-20, dtype=torch.float16)  # another subnormal
    d[4] = 65504.0  # the largest float16
    parts = (d.unsqueeze(-1).view(torch.uint8), q.view(torch.uint8))
    return torch.cat(parts, dim=-1).reshape(N, -1).contiguous()


def awkward_q4(fmt: str, N: int, K: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    KB = K // 32
    q = torch.randint(0, 16, (N, KB, 32), generator=g, dtype=torch.uint8)
    q[0] = 0
    q[1] = 15
    q[2] = 8
    d = (torch.rand(N, KB, generator=g) * 0.01).half()
    d[3] = 0
    d[4, 0] = torch.tensor(2.0**-24, dtype=torch.float16)
    d[4, 1] = torch.tensor(5 * 2.0**-22, dtype=torch.float16)
    d[5] = -1000.0
    if fmt == "q4_0":
        packed = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
        return torch.cat((d.unsqueeze(-1).view(torch.uint8), packed), dim=-1).reshape(N, -1).contiguous()
    m = (torch.randn(N, KB, generator=g) * 0.1).half()
    m[6] = torch.tensor(2.0**-23, dtype=torch.float16)
    m[7] = -60000.0
    return q4_1_bytes(d, m, q)


def awkward_activations(M: int, K: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, K, generator=g)
    x[0] = 0  # a zero row
    x[1, :32] = 0  # a zero block
    x[2] *= 1e25  # huge (times the largest float16 scale, still finite)
    x[3] *= 1e-30  # tiny
    # Values landing on halves after scaling (d = 1): rounding half away from zero.
    x[4, :32] = torch.tensor([127.0, -127.0] + [k + 0.5 for k in range(-15, 15)])
    x[5, :64] = torch.linspace(-3, 3, 64)
    x[6, 32:64] = -1e-3
    return x


@pytest.mark.parametrize("simd", ["simd", "scalar"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_awkward_values(fmt, simd):
    N, K = 13, 96
    w = awkward_q8_0(N, K) if fmt == "q8_0" else awkward_q4(fmt, N, K)
    if simd == "scalar":
        cpu_qmm._qmm.set_simd("scalar")
    x = awkward_activations(9, K)
    y = assert_matches_emulation(x, w, fmt)
    assert torch.isfinite(y).all()
    assert (y[0] == 0).all()
    if fmt == "q8_0":
        assert (y[:, 2] == 0).all()
    # The activation quantizer itself: halves round away from zero.
    q, d = cpu_qmm.quantize_activations(x[4:5, :32])
    assert d.item() == 1.0
    assert q[0, 0, :6].tolist() == [127, -127, -15, -14, -13, -12]


def test_subnormal_activations_do_not_break():
    K, N = 64, 8
    w = weights("q8_0", K, N)
    x = torch.full((2, K), 1e-42)  # float32 subnormals: the scale underflows to 0 or loses precision
    x[1] = torch.linspace(-1e-39, 1e-39, K)
    y = cpu_qmm.matmul(x, w, "q8_0", N)
    assert torch.isfinite(y).all() and y.abs().max() < 1e-36
    assert_matches_emulation(x, w, "q8_0", y)


def test_shapes_dtypes_and_layouts():
    K, N = 96, 20
    w = weights("q4_0", K, N)
    x = torch.randn(2, 3, K)
    y = cpu_qmm.matmul(x, w, "q4_0", N)
    assert y.shape == (2, 3, N) and y.dtype == torch.float32
    torch.testing.assert_close(
        y, cpu_qmm.matmul(x.reshape(6, K), w, "q4_0", N).reshape(2, 3, N), rtol=0, atol=0
    )
    # Non-contiguous x, bfloat16 x, a flat weight buffer (as torch.frombuffer gives), empty x.
    xt = torch.randn(K, 5).t()
    torch.testing.assert_close(
        cpu_qmm.matmul(xt, w, "q4_0", N), cpu_qmm.matmul(xt.contiguous(), w, "q4_0", N)
    )
    yb = cpu_qmm.matmul(x.bfloat16(), w.flatten(), "q4_0", N)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, N)
    assert cpu_qmm.matmul(torch.empty(0, K), w, "q4_0", N).shape == (0, N)
    out = torch.full((6, N), float("nan"))
    assert cpu_qmm.matmul(x, w, "q4_0", N, out=out) is out
    torch.testing.assert_close(out.view(2, 3, N), y, rtol=0, atol=0)
    with pytest.raises(ValueError):
        cpu_qmm.matmul(x, w, "q4_0", N, out=torch.empty(5, N))
    # Unaligned weight and activation pointers.
    wbuf = torch.empty(w.numel() + 1, dtype=torch.uint8)
    wbuf[1:] = w.flatten()
    xbuf = torch.empty(3 * K + 1)
    xbuf[1:] = x[0].flatten()
    x_odd = xbuf[1:].view(3, K)
    # (M decides the code path: bit-identical only for the same M.)
    torch.testing.assert_close(cpu_qmm.matmul(x_odd, wbuf[1:], "q4_0", N), cpu_qmm.matmul(x[0], w, "q4_0", N))


def test_rejects_bad_arguments():
    w = weights("q8_0", 64, 4)
    with pytest.raises(ValueError):
        cpu_qmm.matmul(torch.randn(1, 64), w[:3], "q8_0", 4)
    with pytest.raises(ValueError):
        cpu_qmm.matmul(torch.randn(1, 64), w.float(), "q8_0", 4)
    with pytest.raises(ValueError):
        cpu_qmm.matmul(torch.randn(1, 48), w, "q8_0", 4)
    with pytest.raises(KeyError):
        cpu_qmm.matmul(torch.randn(1, 64), w, "q5_0", 4)
    with pytest.raises(ValueError):
        cpu_qmm._qmm.matmul(2, 0, 0, 0, 1, 33, 1)
    with pytest.raises(ValueError):
        cpu_qmm._qmm.matmul(3, 0, 0, 0, 1, 32, 1)
    with pytest.raises(ValueError):
        cpu_qmm._qmm.set_num_threads(0)


def test_thread_count_follows_torch_unless_pinned():
    before = torch.get_num_threads()
    try:
        w, x = weights("q8_0", 64, 8), torch.randn(1, 64)
        torch.set_num_threads(1)
        cpu_qmm.matmul(x, w, "q8_0", 8)
        assert cpu_qmm.get_num_threads() == 1
        cpu_qmm.set_num_threads(2)
        torch.set_num_threads(1)
        cpu_qmm.matmul(x, w, "q8_0", 8)
        assert cpu_qmm.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_concurrent_callers_get_correct_results():
    # Two Python threads at once (the GIL is released): one gets the pool, the other runs alone.
    cpu_qmm.set_num_threads(2)
    K, N = 576, 960
    w, x = weights("q4_0", K, N), activations(16, K)
    expected = cpu_qmm.matmul(x, w, "q4_0", N)
    failures = []

    def run():
        for _ in range(20):
            if not torch.equal(cpu_qmm.matmul(x, w, "q4_0", N), expected):
                failures.append(1)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_survives_fork():
    cpu_qmm.set_num_threads(2)
    K, N = 576, 960
    w, x = weights("q8_0", K, N), activations(16, K)
    expected = cpu_qmm.matmul(x, w, "q8_0", N)
    pid = os.fork()
    if pid == 0:  # the child: the workers are gone; a call must still finish, and correctly
        ok = False
        try:
            ok = torch.equal(cpu_qmm.matmul(x, w, "q8_0", N), expected)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
