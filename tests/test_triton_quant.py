"""The CUDA block-quantized matmul (Triton), checked on CPU by Triton's interpreter against
dequantize-then-matmul: the kernel, BlockQuantLinear's triton path, a tiny quantized model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (it comes with CUDA builds of torch)")


def test_block_quant_kernel_matches_the_dequantizing_path_under_the_interpreter():
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # must be set before triton is imported
    env.pop("FLEETLM_QUANT_PATH", None)  # the check sets it itself
    run = subprocess.run([sys.executable, "-m", "tests.triton_quant_check"], env=env, cwd=root,
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_every_tuning_candidate_compiles_for_a_hopper_gpu():
    """No GPU needed to compile: each autotuning config, for each format, builds to PTX for sm_90 with
    tensor-core MMAs and asynchronous (pipelined) weight loads, so a GPU run meets no compile error."""
    from serving.models import triton_quant
    from tests.hopper_ptx import sm90_ptx

    integers = ["M", "N", "K", "stride_xm", "stride_om", "M_BUCKET"]
    configs = {str(c): c for cs in triton_quant._CONFIGS.values() for c in cs}.values()  # a config can serve two buckets
    for fmt in ("q8_0", "q4_0", "q4_1"):
        for config in configs:
            pointers = {"x_ptr": "*bf16", "values_ptr": "*i8" if fmt == "q8_0" else "*u8", "scales_ptr": "*fp16",
                        "mins_ptr": "*fp16", "out_ptr": "*bf16"}  # fmt: skip
            constants = {"FMT": fmt, "PRECISION": "tf32", "UPCAST": False, **config.kwargs}
            aligned = [*pointers, "N", "K", "stride_xm", "stride_om"]
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            ptx = sm90_ptx(triton_quant._block_quant_matmul_kernel, {**pointers, **dict.fromkeys(integers, "i32")}, constants, aligned, options)
            assert "mma" in ptx and "cp.async" in ptx, (fmt, config)
