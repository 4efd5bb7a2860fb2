"""CPU matrix multiply straight from GGUF's Q4_0 / Q4_1 / Q8_0 weight bytes (the `_qmm` extension).

`matmul(x, w, fmt, N)` computes x @ W^T with W given as its raw GGUF bytes: N rows of K/32 blocks
(Q4_0: float16 d + 16 bytes of nibbles; Q4_1: d, float16 m + nibbles; Q8_0: d + 32 int8). The
extension quantizes each 32-value block of x to int8 as GGUF's Q8_0 does (d = max|x| / 127, values
rounded half away from zero) and multiplies in integers; `emulated_matmul` reproduces that
arithmetic exactly in float64, `reference_matmul` multiplies by the exactly dequantized weights.

The extension is optional (built by setup.py when a C compiler is there): check `available()` and
fall back to torch kernels otherwise. By default a call uses as many threads as
`torch.get_num_threads()`; `set_num_threads(n)` pins the count.
"""

from __future__ import annotations

import torch

try:
    from serving.models import _qmm
except ImportError:  # built without a C compiler, or an unsupported platform
    _qmm = None

BLOCK = 32
FORMATS = {"q4_0": 0, "q4_1": 1, "q8_0": 2}
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}

# The code path the extension picked at import (set_simd can switch to "scalar" for tests).
_SIMD = _qmm.simd() if _qmm is not None else "none"
_pinned_threads: int | None = None
_threads = _qmm.get_num_threads() if _qmm is not None else 1


def available() -> bool:
    """The extension is importable and has a SIMD code path on this CPU."""
    return _qmm is not None and _SIMD != "scalar"


def simd() -> str:
    """The extension's code path in use: 'avx2', 'scalar', or 'none' when it is not built."""
    return _qmm.simd() if _qmm is not None else "none"


def set_num_threads(n: int | None) -> None:
    """Threads per call, the calling thread included; None: follow torch.get_num_threads()."""
    global _pinned_threads, _threads
    if _qmm is None:
        return
    if n is not None:
        _qmm.set_num_threads(int(n))
        _threads = int(n)
    _pinned_threads = n


def get_num_threads() -> int:
    return _qmm.get_num_threads() if _qmm is not None else 1


def _sync_threads() -> None:
    global _threads
    if _pinned_threads is None:
        n = torch.get_num_threads()
        if n != _threads:
            _qmm.set_num_threads(n)
            _threads = n


def row_bytes(fmt: str, K: int) -> int:
    """Bytes of one weight row of K values."""
    return K // BLOCK * BLOCK_BYTES[fmt]


def matmul(
    x: torch.Tensor, w: torch.Tensor, fmt: str, N: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., K) @ W^T -> (..., N), W: uint8 GGUF bytes of N rows of K/32 `fmt` blocks.

    The result is float32 for float32 x, else cast to x's dtype. `out`, a contiguous float32
    tensor of x.numel() / K * N elements, receives the float32 result instead of a new tensor.
    """
    # Every check here costs a few hundred nanoseconds; a decode step makes ~120 calls.
    if _qmm is None:
        raise RuntimeError("serving.models._qmm is not built")
    code = FORMATS[fmt]
    K = x.shape[-1]
    if K % BLOCK or K == 0:
        raise ValueError(f"K ({K}) is not a positive multiple of {BLOCK}")
    if (
        w.dtype != torch.uint8
        or not w.is_cpu
        or w.numel() != N * (K // BLOCK) * BLOCK_BYTES[fmt]
        or not w.is_contiguous()
    ):
        raise ValueError(
            f"w must be contiguous CPU uint8 holding {N} rows of {row_bytes(fmt, K)} bytes ({fmt}), "
            f"got {w.dtype} {tuple(w.shape)} on {w.device}"
        )
    if not x.is_cpu:
        raise ValueError(f"x must be on CPU, not {x.device}")
    xc = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    M = xc.numel() // K
    if out is None:
        f32 = torch.float32  # explicit: the default dtype may have been changed
        out = (
            torch.empty(x.shape[0], N, dtype=f32)
            if x.dim() == 2
            else torch.empty(*x.shape[:-1], N, dtype=f32)
        )
    elif out.dtype != torch.float32 or not out.is_cpu or out.numel() != M * N or not out.is_contiguous():
        raise ValueError(f"out must be contiguous CPU float32 with {M * N} elements")
    if _pinned_threads is None:
        _sync_threads()
    _qmm.matmul(code, xc.data_ptr(), w.data_ptr(), out.data_ptr(), M, K, N)
    return out if x.dtype == torch.float32 or not x.dtype.is_floating_point else out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# References (torch, slow): for tests and fallbacks.


def dequantize(w: torch.Tensor, fmt: str, K: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """GGUF bytes of rows of K values -> (rows, K) weights, computed exactly in float64."""
    blocks = w.reshape(-1, K // BLOCK, BLOCK_BYTES[fmt])
    d = blocks[..., 0:2].contiguous().view(torch.float16).double()  # (rows, K/32, 1)
    if fmt == "q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).double()
        values = q * d
    else:
        nibbles = blocks[..., 4:] if fmt == "q4_1" else blocks[..., 2:]
        q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).double()
        if fmt == "q4_1":
            m = blocks[..., 2:4].contiguous().view(torch.float16).double()
            values = q * d + m
        else:
            values = (q - 8) * d
    return values.reshape(-1, K).to(dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) float32 -> int8 values (..., K/32, 32) and float32 scales (..., K/32), as the kernel does.

    d = max|x| / 127 and x / d are float32 divisions (computed in float64 and rounded once, which
    gives the correctly rounded float32 quotient); values round half away from zero, clamp to +-127.
    """
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    amax = blocks.abs().amax(dim=-1)
    d = (amax.double() / 127).float()
    zero = d == 0
    t = (blocks.double() / torch.where(zero, 1.0, d).double().unsqueeze(-1)).float().double()
    a = t.abs()
    floor = a.floor()
    r = (floor + (a - floor >= 0.5).double()).clamp(max=127)
    q = torch.copysign(r, t).masked_fill(zero.unsqueeze(-1), 0).to(torch.int8)
    return q, d


def emulated_matmul(x: torch.Tensor, w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The kernel's arithmetic (int8 activations, exact integer block dots) in float64: (..., N)."""
    K = x.shape[-1]
    q, d = quantize_activations(x.reshape(-1, K))
    xq = (q.double() * d.double().unsqueeze(-1)).reshape(-1, K)  # exact
    out = xq @ dequantize(w, fmt, K).t()
    return out.reshape(*x.shape[:-1], -1)


def reference_matmul(x: torch.Tensor, w: torch.Tensor, fmt: str) -> torch.Tensor:
    """x @ W^T with W dequantized exactly and no activation rounding, in float64: (..., N)."""
    K = x.shape[-1]
    out = x.reshape(-1, K).double() @ dequantize(w, fmt, K).t()
    return out.reshape(*x.shape[:-1], -1)
