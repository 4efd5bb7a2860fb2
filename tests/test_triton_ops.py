"""The fused Triton kernels around a step's matmuls (RMS norm with the residual add, rotary with the
K/V cache write, silu * up), checked on CPU by Triton's interpreter against the torch path they
replace, and compiled for a Hopper GPU. Inside the engine they run wherever the Triton backend does:
tests/test_triton_attention.py's interpreted oracle cases cover them against transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (it comes with CUDA builds of torch)")

ROOT = Path(__file__).resolve().parent.parent


def test_the_fused_kernels_match_the_torch_path_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}  # must be set before triton is imported
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_ops_check.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.parametrize("dtype", ["*bf16", "*fp32"])
def test_the_fused_kernels_compile_for_a_hopper_gpu(dtype):
    """Llama-3.1-8B's sizes: hidden 4096, intermediate 14336, head size 128."""
    from serving.models import triton_ops as ops
    from tests.hopper_ptx import sm90_ptx

    norm = {"x_ptr": dtype, "res_ptr": dtype, "w_ptr": dtype, "out_ptr": dtype, "stride_x": "i32", "stride_r": "i32",
            "stride_o": "i32", "dim": "i32", "eps": "fp32"}  # fmt: skip
    for residual in (False, True):
        block = ops._block(4096)
        sm90_ptx(ops._rms_norm_kernel, norm, {"HAS_RESIDUAL": residual, "BLOCK": block}, ["x_ptr", "res_ptr", "w_ptr", "out_ptr"],
                 {"num_warps": ops._warps(block)})  # fmt: skip
    silu = {"gu_ptr": dtype, "out_ptr": dtype, "stride_g": "i32", "stride_o": "i32", "inter": "i32"}
    sm90_ptx(ops._silu_mul_kernel, silu, {"BLOCK": 1024}, ["gu_ptr", "out_ptr", "inter"], {"num_warps": 4})
    rotary = {"qk_ptr": dtype, "v_ptr": dtype, "k_cache_ptr": dtype, "v_cache_ptr": dtype, "cos_ptr": "*fp32", "sin_ptr": "*fp32",
              "pos_ptr": "*i64", "slots_ptr": "*i64", **dict.fromkeys(["stride_qt", "stride_qh", "stride_vt", "stride_vh",
              "stride_cs", "stride_ch", "stride_c", "q_heads", "kv_heads", "head_dim", "rot_half"], "i32")}  # fmt: skip
    pointers = [name for name, kind in rotary.items() if kind.startswith("*")]
    sm90_ptx(ops._rotary_cache_kernel, rotary, {"BLOCK": ops._block(128)}, pointers, {"num_warps": 4})
