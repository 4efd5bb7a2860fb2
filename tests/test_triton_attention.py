"""The CUDA decode kernel (Triton), checked on CPU by Triton's interpreter against plain torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (it comes with CUDA builds of torch)")


def test_paged_decode_kernel_matches_torch_under_the_interpreter():
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # must be set before triton is imported
    run = subprocess.run([sys.executable, str(root / "tests" / "triton_decode_check.py")], env=env, cwd=root,
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
