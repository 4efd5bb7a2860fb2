"""bench/gpu_bench.py runs end to end (on CPU, tiny shapes, a tiny config directory holding nothing but
its config, as bench/configs does): the device script has no first-run surprises left, the HTTP
part included, and bench/gpu_table.py reads what it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import gpu_table
from tests.tiny_models import make_config_only_model, make_tiny_model


def test_the_gpu_bench_runs_with_quick_shapes(tmp_path):
    model_dir = make_config_only_model(tmp_path, "llama")
    out = tmp_path / "gpu_bench.json"
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_bench", "--config", str(model_dir), "--device", "cpu", "--dtype", "float32",
         "--quick", "--out", str(out)],
        cwd=root, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] and report["commit"] and report["complete"]
    for name in ("single_stream", "decode_heavy", "prefill_heavy", "mixed"):
        assert report["fleetlm"][name]["output_tokens"] > 0 and report["fleetlm"][name]["tok_s"] > 0
    assert report["fleetlm"]["decode_heavy"]["output_tokens"] == 16 * 32  # 256/16 requests x 512/16 tokens
    assert report["fleetlm"]["prefill_heavy"]["shape"] == {"requests": 16, "input_len": [32, 32], "output_len": [8, 8]}
    assert set(report["peers"]) == {"transformers_batch_1", "transformers_batch_8"}
    assert "single stream (decode)" in run.stdout

    http = report["http"]
    assert http["concurrency"] == 4 and http["server_exit_code"] == 0, http
    assert "word per id" in http["tokenizer"]  # the config directory has none of its own
    decode = http["workloads"]["decode_heavy"]
    for side in (decode["http"], decode["engine_same_concurrency"]):
        assert side["requests"] == 16 and side["output_tokens"] == 16 * 32 and side["concurrency"] == 4
        assert 0 < side["ttft_ms"]["p50"] <= side["ttft_ms"]["p99"] and side["tpot_ms"]["p50"] > 0
    assert decode["ratio_to_engine_same_concurrency"] == decode["http"]["output_tok_s"] / decode["engine_same_concurrency"]["output_tok_s"]
    assert "HTTP at c4" in run.stdout

    # A quick CPU run is no GPU measurement: the README block keeps saying none was made.
    assert gpu_table.block(report) == gpu_table.NOT_MEASURED
    as_gpu = {**report, "quick": False, "device": "cuda", "machine": {**report["machine"], "gpu": "NVIDIA H200"}}
    table = gpu_table.table(as_gpu)
    assert f"{decode['http']['output_tok_s']:,.0f} tok/s" in table and "NVIDIA H200" in table
    assert "16 × (8 in / 32 out)" in table and "transformers `generate`, static batch 8" in table


def test_the_gpu_bench_can_leave_the_server_out(tmp_path):
    """--skip-http runs where quart, hypercorn and openai are not installed (blocked here)."""
    model_dir = make_tiny_model(tmp_path, "llama")
    out = tmp_path / "gpu_bench.json"
    root = Path(__file__).resolve().parent.parent
    argv = ["gpu_bench", "--config", str(model_dir), "--device", "cpu", "--dtype", "float32", "--quick", "--skip-http",
            "--out", str(out)]  # fmt: skip
    probe = (
        "import sys, runpy; sys.modules.update(dict.fromkeys(['quart', 'hypercorn', 'openai'])); "
        f"sys.argv = {argv!r}; runpy.run_module('bench.gpu_bench', run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["http"] is None and report["fleetlm"]["decode_heavy"]["output_tokens"] == 16 * 32
    assert "not run (`--skip-http`)" in gpu_table.table({**report, "quick": False, "device": "cuda"})
