"""bench/quant_gpu_bench.py runs end to end (on CPU, tiny shapes, a tiny config directory holding
nothing but its config, as bench/configs does): the device run has no first-run surprises left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.tiny_models import make_config_only_model


def test_the_quant_gpu_bench_runs_with_quick_shapes(tmp_path):
    model_dir = make_config_only_model(tmp_path, "llama")
    out = tmp_path / "quant_gpu_bench.json"
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-m", "bench.quant_gpu_bench", "--config", str(model_dir), "--device", "cpu",
         "--dtype", "float32", "--quick", "--out", str(out)],
        cwd=root, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] and report["commit"] and report["date"]
    speed, agreement = report["speed"], report["demo_agreement"]
    assert set(speed) == set(agreement) == {"none", "q8_0", "q4_0"}
    for scheme, row in speed.items():
        assert row["decode_batch_1_tok_s"] > 0 and row["decode_batch_4_tok_s"] > 0, scheme
        assert (row["paths"] == []) == (scheme == "none"), row["paths"]
    # Quantized layers hold their blocks, not floats: q4_0 < q8_0 < float32 (embeddings and lm_head stay float).
    assert speed["q4_0"]["weight_bytes"] < speed["q8_0"]["weight_bytes"] < 0.7 * speed["none"]["weight_bytes"]
    assert agreement["q8_0"]["weight_ratio_to_none"] < 0.55  # its table and 172-input down_proj stay float32
    assert agreement["none"]["agreement"] == 1.0 and agreement["q8_0"]["agreement"] >= 0.95
    assert "teacher-forced greedy agreement" in run.stdout and "batch_4 tok/s" in run.stdout
