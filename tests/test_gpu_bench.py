"""bench/gpu_bench.py runs end to end (on CPU, tiny shapes, a tiny config without weights): the
device script has no first-run surprises left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.tiny_models import make_tiny_model


def test_the_gpu_bench_runs_with_quick_shapes(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    out = tmp_path / "gpu_bench.json"
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-m", "bench.gpu_bench", "--config", str(model_dir), "--device", "cpu", "--dtype", "float32",
         "--quick", "--out", str(out)],
        cwd=root, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] and report["commit"]
    for name in ("single_stream", "decode_heavy", "prefill_heavy", "mixed"):
        assert report["fleetlm"][name]["output_tokens"] > 0 and report["fleetlm"][name]["tok_s"] > 0
    assert report["fleetlm"]["decode_heavy"]["output_tokens"] == 16 * 32  # 256/16 requests x 512/16 tokens
    assert set(report["peers"]) == {"transformers_batch_1", "transformers_batch_8"}
    assert "single stream (decode)" in run.stdout
