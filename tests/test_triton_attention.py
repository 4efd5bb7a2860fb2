"""The CUDA attention kernels (Triton), checked on CPU by Triton's interpreter: kernel by kernel against
the plain-torch backend, then inside the engine against transformers' greedy output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (it comes with CUDA builds of torch)")

ROOT = Path(__file__).resolve().parent.parent
INTERPRETED = {**os.environ, "TRITON_INTERPRET": "1"}  # must be set before triton is imported


def test_the_triton_backend_matches_torch_on_mixed_steps_under_the_interpreter():
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_attention_check.py")], env=INTERPRETED, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


# A CI-sized share of test_engine_oracle (all of it passes interpreted too, in six minutes on 2 cores):
# every native architecture in a staggered chunked batch, the static padded decode buffers of CUDA
# graphs, preemption, and prefix-cache hits, all with the Triton kernels in the engine.
ORACLE_CASES = [
    *(f"test_mixed_staggered_batch_matches_transformers[{arch}-c]" for arch in ("llama", "mistral", "qwen2", "qwen3", "phi3")),
    "test_decode_steps_over_static_padded_buffers_match_transformers[mistral]",
    "test_preemption_under_kv_pressure_keeps_outputs_exact[llama]",
    "test_prefix_cache_hits_keep_outputs_token_identical[roomy-mistral]",
]


def test_the_engine_on_triton_kernels_matches_transformers_under_the_interpreter():
    ids = [f"tests/test_engine_oracle.py::{case}" for case in ORACLE_CASES]
    env = {**INTERPRETED, "FLEETLM_TEST_ATTENTION": "triton"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert f"{len(ids)} passed" in run.stdout, run.stdout[-1000:]
