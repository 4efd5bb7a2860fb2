"""What serving LoRA adapters costs: one server, the same streamed load on the base model, on one adapter,
and spread over several adapters at once (each step then adds every adapter's B·A·x for its rows).

The adapters are random PEFT adapters (rank --rank, every linear layer: PEFT's "all-linear") of the model's
shapes, written beside the results; the model is any FleetLM serves, e.g. SmolLM2-135M-Instruct's GGUF.
Prints a table and writes JSON (output tokens per second and TPOT, each against the base model's).

    python -m bench.lora_bench --model-path ~/models/smollm2-135m-instruct-q4_1 [--adapters 4 --rank 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.cpu_bench import start_fleetlm
from bench.loadgen import RunSummary, run_load
from bench.workload import make_workload
from serving.config import ServeConfig
from serving.models.loader import load_hf_config
from serving.models.source import resolve_source

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(out: Path, model_path: str, rank: int, seed: int) -> Path:
    """A PEFT LoRA adapter of every linear layer of the model at model_path, random A and B."""
    config = load_hf_config(resolve_source(ServeConfig(model_path=model_path)))
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name, (fan_in, fan_out) in shapes.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * fan_in**-0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS),
                      "base_model_name_or_path": model_path}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--adapters", type=int, default=4, help="adapters served, and spread over in the last run")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/lora_cpu.json"))
    parser.add_argument("--server-args", default="", help="more flags for the server, e.g. '--num-threads 2'")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    adapters = [write_adapter(work / f"a{i}", args.model_path, args.rank, seed=i) for i in range(args.adapters)]
    modules = [f"a{i}={path}" for i, path in enumerate(adapters)]
    extra = ["--served-model-name", "base", "--max-batch-size", str(max(16, args.concurrency)), "--lora-modules", *modules]
    extra += args.server_args.split()
    config = load_hf_config(resolve_source(ServeConfig(model_path=args.model_path)))
    workload = make_workload(args.requests, (args.input_len,) * 2, (args.output_len,) * 2, config.vocab_size, seed=0)
    proc, base_url = start_fleetlm(Path(args.model_path), extra, work / "server.log")
    rows: list[tuple[str, RunSummary]] = []
    try:
        asyncio.run(run_load(base_url, "base", workload[: args.concurrency], args.concurrency))  # warm-up
        for label, names in (
            ("base model", ["base"]),
            ("one adapter", ["a0"]),
            (f"{args.adapters} adapters at once", [f"a{i}" for i in range(args.adapters)]),
        ):
            rows.append((label, asyncio.run(run_load(base_url, names, workload, args.concurrency))))
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    base = rows[0][1]
    print(f"\nLoRA rank {args.rank} on every linear layer; {args.requests} requests of {args.input_len} in / "
          f"{args.output_len} out, {args.concurrency} streams")  # fmt: skip
    print(f"{'load':<22} {'out tok/s':>10} {'vs base':>8} {'TPOT p50 ms':>12} {'vs base':>8}")
    for label, row in rows:
        tpot = row.tpot_ms["p50"]
        print(f"{label:<22} {row.output_tok_s:>10.1f} {row.output_tok_s / base.output_tok_s:>8.2f} "
              f"{tpot:>12.1f} {tpot / base.tpot_ms['p50']:>8.2f}")  # fmt: skip
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{os.cpu_count()} cores",
        "model": args.model_path,
        "rank": args.rank,
        "adapters": args.adapters,
        "workload": {"requests": args.requests, "input_len": args.input_len, "output_len": args.output_len, "concurrency": args.concurrency},
        "runs": {label: {"output_tok_s": row.output_tok_s, "tpot_ms_p50": row.tpot_ms["p50"]} for label, row in rows},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
