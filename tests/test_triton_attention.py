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


@pytest.mark.timeout(900)  # one interpreted process: 3 to 6 minutes on 2 cores, as fast as one core is
def test_the_engine_on_triton_kernels_matches_transformers_under_the_interpreter():
    ids = [f"tests/test_engine_oracle.py::{case}" for case in ORACLE_CASES]
    env = {**INTERPRETED, "FLEETLM_TEST_ATTENTION": "triton"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=850)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert f"{len(ids)} passed" in run.stdout, run.stdout[-1000:]


# Shapes a GPU run compiles: Llama-3.1-8B (32 query heads on 8 KV heads, head size 128) in bfloat16 and
# float32, and 7 query heads per KV head with a head size that is no power of two (both padded).
COMPILED_SHAPES = [(4, 128, "*bf16", "tf32"), (4, 128, "*fp32", "ieee"), (7, 80, "*bf16", "tf32")]


@pytest.mark.parametrize("group,head_dim,dtype,precision", COMPILED_SHAPES)
def test_the_kernels_compile_for_a_hopper_gpu(group, head_dim, dtype, precision):
    """No GPU needed to compile: the decode kernel (with and without row indirection) and the prefill
    kernel build for sm_90, their half-precision dots on tensor cores (MMA) and no register spilled to
    local memory, so a GPU run meets no compile error and no slow path."""
    from serving.models import triton_attention as ta
    from tests.hopper_ptx import sm90_ptx

    strides = ["stride_qt", "stride_qh", "stride_ks", "stride_kh", "stride_vs", "stride_vh", "stride_ot", "stride_oh", "stride_tb"]
    tensors = dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "out_ptr"], dtype)
    size = 4 if dtype == "*fp32" else 2  # bytes per element: the prefill tile depends on it
    parts = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"}
    # Row ids, block tables, lengths and offsets are int64, as the runner sends them (host_inputs.HostInts).
    decode = {**tensors, **parts, "rows_ptr": "*i64", "tables_ptr": "*i64", "lens_ptr": "*i64"}
    prefill = {**tensors, "starts_ptr": "*i64", "lens_ptr": "*i64", "cached_ptr": "*i64", "tables_ptr": "*i64"}
    kernels = [
        (ta._paged_decode_kernel, decode, {"HAS_ROWS": rows, "GROUP": group, "GROUP_PAD": ta._pad(group), "HEAD_DIM": head_dim,
         "D_PAD": ta._pad(head_dim), "PAGE": 16, "BLOCK_N": ta._DECODE_N, "SPLITS": splits, "PRECISION": precision})
        for rows in (False, True) for splits in (1, ta._MAX_SPLITS)
    ]  # fmt: skip
    kernels.append((ta._paged_prefill_kernel, prefill, {"GROUP": group, "HEAD_DIM": head_dim, "D_PAD": ta._pad(head_dim), "PAGE": 16,
                    "BLOCK_M": ta.prefill_tile(size), "BLOCK_N": ta.prefill_tile(size), "PRECISION": precision}))  # fmt: skip
    for kernel, pointers, constants in kernels:
        arguments = {**pointers, "scale": "fp32", "window": "i32", **dict.fromkeys(strides, "i32")}
        aligned = [n for n in [*pointers, *strides[:-1]] if n != "rows_ptr"]
        ptx = sm90_ptx(kernel, arguments, constants, aligned, {"num_warps": 4})
        assert precision == "ieee" or "mma" in ptx, (kernel.__name__, constants)  # float32 dots stay off the tensor cores
    merge = {**parts, "out_ptr": dtype, "rows_ptr": "*i64", "stride_ot": "i32", "stride_oh": "i32"}
    for rows in (False, True):
        constants = {"HAS_ROWS": rows, "HEAD_DIM": head_dim, "D_PAD": ta._pad(head_dim), "SPLITS": 3, "SPLITS_PAD": 4}
        sm90_ptx(ta._merge_splits_kernel, merge, constants, [*parts, "out_ptr", "stride_ot"], {"num_warps": 1})


@pytest.mark.parametrize(
    "batch,kv_heads,multiprocessors,splits",
    [(1, 8, 132, 16), (4, 8, 132, 8), (8, 8, 132, 4), (16, 8, 132, 2), (17, 8, 132, 1), (256, 8, 132, 1), (1, 32, 132, 8), (1, 8, 16, 4)],
)
def test_decode_splits_fill_the_multiprocessors_only_where_the_sequences_do_not(monkeypatch, batch, kv_heads, multiprocessors, splits):
    """Split-K where batch x KV heads programs leave multiprocessors idle (a few streams): a power of two
    up to about two programs per multiprocessor, at most _MAX_SPLITS parts; none on a CPU (the
    interpreter's path)."""
    import torch

    from serving.models import triton_attention as ta

    monkeypatch.setattr(ta, "_multiprocessors", lambda index: multiprocessors)
    assert ta.decode_splits(batch, kv_heads, torch.device("cuda", 0)) == splits
    assert ta.decode_splits(batch, kv_heads, torch.device("cpu")) == 1


def test_the_decode_attention_bench_runs_under_the_interpreter(tmp_path):
    """bench/decode_attention_bench.py end to end on tiny shapes with three parts per sequence: what the
    device script runs compiled has no first-run surprise, and its outputs agree with the torch path."""
    import json

    out = tmp_path / "decode_attention_bench.json"
    run = subprocess.run([sys.executable, "-m", "bench.decode_attention_bench", "--device", "cpu", "--quick", "--splits", "3",
                          "--out", str(out)], env=INTERPRETED, cwd=ROOT, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["batch"], r["context"], r["splits"]) for r in report["rows"]] == [(1, 40, 3), (1, 100, 3), (3, 40, 3), (3, 100, 3)]
    assert report["max_abs_error"] < 2e-2 and report["commit"]
