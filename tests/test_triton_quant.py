"""The CUDA quantized matmuls (Triton, fused dequantize-matmul), checked on CPU by Triton's interpreter
against dequantize-then-matmul, layer by layer and in a quantized tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (it comes with CUDA builds of torch)")

ROOT = Path(__file__).resolve().parent.parent


def test_the_triton_quantized_matmul_matches_dequantize_then_matmul_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}  # set before triton is imported
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_quant_check.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
