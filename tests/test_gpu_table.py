"""bench/gpu_table.py: the README's GPU table says which targets a GPU report met, says that nothing
was measured when there is no GPU report, and replaces only the block between its markers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import gpu_table

ROOT = Path(__file__).resolve().parent.parent


def _summary(tok_s: float, ttft_p50: float, concurrency: int = 64) -> dict:
    return {"concurrency": concurrency, "requests": 256, "output_tokens": 131072, "duration_s": 131072 / tok_s,
            "output_tok_s": tok_s, "ttft_ms": {"p50": ttft_p50, "p99": 2 * ttft_p50, "mean": ttft_p50},
            "tpot_ms": {"p50": 9.5, "p99": 12.3, "mean": 10.0}}  # fmt: skip


def _report(**overrides) -> dict:
    """A GPU report shaped like bench/gpu_bench.py's (test_gpu_bench.py renders a real one too)."""
    decode_shape = {"requests": 256, "input_len": [128, 128], "output_len": [512, 512]}
    report = {
        "date": "2026-12-01", "commit": "abc1234", "config": "bench/configs/llama-3.1-8b", "device": "cuda",
        "dtype": "bfloat16", "quick": False, "machine": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0"},
        "fleetlm": {
            "single_stream": {"decode_tok_s": 230.4},
            "decode_heavy": {"tok_s": 15000.0, "shape": decode_shape},
            "prefill_heavy": {"tok_s": 6000.0, "shape": {"requests": 256, "input_len": [512, 512], "output_len": [128, 128]}},
            "mixed": {"tok_s": 9000.0, "shape": {"requests": 256, "input_len": [16, 512], "output_len": [16, 512]}},
        },
        "peers": {"transformers_batch_1": {"batch": 1, "prompt_len": 128, "output_len": 256, "tok_s": 40.0},
                  "transformers_batch_128": {"batch": 128, "prompt_len": 128, "output_len": 128, "tok_s": 3100.0}},
        "http": {"concurrency": 64, "workloads": {"decode_heavy": {
            "http": _summary(7200.0, 350.0), "engine_same_concurrency": _summary(8000.0, 90.0),
            "engine_offline_tok_s": 15000.0, "ratio_to_engine_same_concurrency": 0.9, "ratio_to_engine_offline": 0.48,
            "shape": decode_shape}}},
    }  # fmt: skip
    return {**report, **overrides}


def _rows(table: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_each_target_is_checked_against_the_measurement():
    table = gpu_table.table(_report())
    assert table.startswith("Measured 2026-12-01 at commit `abc1234` on NVIDIA H200 (torch 2.11.0+cu130, cuda 13.0)")
    rows = _rows(table)
    assert rows["single stream, decode after the first token (128 in)"] == ["230 tok/s", "≥ 215 tok/s", "yes"]
    assert rows["engine, offline: 256 × (128 in / 512 out)"] == ["15,000 tok/s", "≥ 16,000 tok/s", "**no**"]
    assert rows["engine, offline: 256 × (512 in / 128 out)"] == ["6,000 tok/s", "≥ 5,500 tok/s", "yes"]
    assert rows["engine, offline: 256 × (16–512 in / 16–512 out)"][1:] == ["–", "–"]
    throughput = rows["HTTP, streamed, concurrency 64: 256 × (128 in / 512 out)"]
    assert throughput[0].startswith("7,200 tok/s = 90% of the engine") and "8,000 tok/s; 48% of offline" in throughput[0]
    assert throughput[1:] == ["≥ 85% of the engine", "yes"]
    latency = rows["HTTP, concurrency 64: TTFT p50 / p99; TPOT p50 / p99"]
    assert latency[0].startswith("350 / 700 ms; 9.5 / 12.3 ms") and latency[1:] == ["TTFT p50 < 300 ms", "**no**"]
    assert rows["transformers `generate`, static batch 128 (128 in / 128 out)"] == ["3,100 tok/s", "peer", "–"]


def _quant_report(q8_ratio: float, q8_agreement: float) -> dict:
    """A report shaped like bench/quant_gpu_bench.py's (test_quant_gpu_bench.py runs the real one)."""
    def speed(ratio: float, b1: float, b32: float) -> dict:
        return {"weight_bytes": int(ratio * 16e9), "paths": ["triton"] if ratio < 1 else [], "decode_batch_1_tok_s": b1,
                "decode_batch_32_tok_s": b32, "weight_ratio_to_none": ratio}  # fmt: skip

    def agree(ratio: float, share: float) -> dict:
        return {"weight_bytes": 1000, "paths": [], "agreement": share, "positions": 923, "weight_ratio_to_none": ratio}

    return {"date": "2026-12-02", "commit": "def5678", "config": "bench/configs/llama-3.1-8b", "device": "cuda",
            "dtype": "bfloat16", "quick": False, "machine": {},
            "speed": {"none": speed(1.0, 200.0, 5000.0), "q8_0": speed(q8_ratio, 330.0, 7000.0), "q4_0": speed(0.3, 450.0, 6000.0)},
            "demo_agreement": {"none": agree(1.0, 1.0), "q8_0": agree(0.63, q8_agreement), "q4_0": agree(0.47, 0.89)}}  # fmt: skip


def test_the_quantization_rows_check_q8_0_against_its_targets():
    table = gpu_table.table(_report(), _quant_report(0.531, 0.987))
    assert "Quantization rows: `bench/results/quant_gpu_bench.json` (2026-12-02, `def5678`)" in table.splitlines()[0]
    rows = _rows(table)
    weights = rows["`--quantization q8_0`: weights; decode tok/s at batch 1 / 32"]
    assert weights == ["0.531 of bfloat16 (7.91 GiB); 330 / 7,000 (200 / 5,000 unquantized)", "≤ 0.55 of bfloat16", "yes"]
    assert rows["`--quantization q8_0`: greedy agreement on the demo model"] == ["98.7% of 923 positions", "≥ 95%", "yes"]
    assert rows["`--quantization q4_0`: greedy agreement on the demo model"][1:] == ["–", "–"]
    missed = _rows(gpu_table.table(_report(), _quant_report(0.593, 0.94)))
    assert missed["`--quantization q8_0`: weights; decode tok/s at batch 1 / 32"][2] == "**no**"
    assert missed["`--quantization q8_0`: greedy agreement on the demo model"][2] == "**no**"
    # A CPU or --quick quantization run adds nothing to the GPU table.
    assert gpu_table.table(_report(), {**_quant_report(0.5, 1.0), "device": "cpu"}) == gpu_table.table(_report())


def test_a_failed_http_part_is_shown_as_failed():
    rows = _rows(gpu_table.table(_report(http={"concurrency": 64, "error": "RuntimeError: server exited with 1"})))
    assert rows["HTTP, concurrency 64"] == ["failed: RuntimeError: server exited with 1", "", "**no**"]


def test_a_run_stopped_early_says_so():
    partial = {k: v for k, v in _report(complete=False).items() if k not in ("peers", "http")}
    table = gpu_table.table(partial)
    assert "of a run stopped before its end" in table and "transformers" not in table
    assert _rows(table)["HTTP, concurrency 64"][0] == "not reached: the run stopped before it"
    assert "stopped" not in gpu_table.table(_report(complete=True)).splitlines()[0]


def test_without_gpu_results_the_block_says_none_were_measured():
    assert gpu_table.block(None) == gpu_table.NOT_MEASURED
    assert gpu_table.block(_report(quick=True)) == gpu_table.NOT_MEASURED
    assert gpu_table.block(_report(device="cpu")) == gpu_table.NOT_MEASURED
    assert "No GPU figures have been measured yet" in gpu_table.NOT_MEASURED


def test_the_readme_block_is_replaced_and_nothing_else(tmp_path):
    results, readme = tmp_path / "gpu_bench.json", tmp_path / "README.md"
    results.write_text(json.dumps(_report()))
    before = (ROOT / "README.md").read_text()
    readme.write_text(before)
    command = [sys.executable, "-m", "bench.gpu_table", "--results", str(results), "--readme", str(readme),
               "--quant-results", str(tmp_path / "none.json")]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, timeout=60)
    after = readme.read_text()
    head, rest = after.split(gpu_table.START + "\n")
    body, tail = rest.split("\n" + gpu_table.END)
    assert body == gpu_table.table(_report())
    assert before.startswith(head) and before.endswith(tail)
    subprocess.run(command, cwd=ROOT, check=True, timeout=60)  # idempotent: markers kept
    assert readme.read_text() == after


def test_the_committed_readme_shows_the_committed_results():
    """The README's block is what gpu_table makes of bench/results/gpu_bench.json (or of its absence)."""
    readme = (ROOT / "README.md").read_text()
    assert readme.count(gpu_table.START) == 1 and readme.count(gpu_table.END) == 1
    body = readme.split(gpu_table.START + "\n")[1].split("\n" + gpu_table.END)[0]
    assert body == gpu_table.block(gpu_table.load(ROOT / gpu_table.RESULTS), gpu_table.load(ROOT / gpu_table.QUANT_RESULTS))
