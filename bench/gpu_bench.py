"""The engine on a GPU, with random weights of a real architecture (--load-format dummy), against
transformers' generate in the same run.

- single stream: one request, 128 prompt tokens, decode tok/s after the first token;
- offline throughput: 256 x (128 in / 512 out), 256 x (512 / 128), and a mixed-length workload;
- transformers `generate` at batch 1 and a static batch of 128 (same config, same dtype).

Prints a table and writes JSON with the date and commit (bench/results/gpu_bench.json). --quick runs
tiny shapes (a CPU smoke test of this script: tests/test_gpu_bench.py).

    python -m bench.gpu_bench --config bench/configs/llama-3.1-8b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from pathlib import Path

import torch

WORKLOADS = {"decode_heavy": (256, 128, 512), "prefill_heavy": (256, 512, 128)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _engine(config_dir: str, device: str, dtype: str, batch: int, seq_len: int):
    from serving.config import ServeConfig
    from serving.engine.builder import build_engine

    cfg = ServeConfig(
        model_path=config_dir, device=device, dtype=dtype, load_format="dummy", max_batch_size=batch, max_seq_len=seq_len
    )
    return build_engine(cfg).engine


def _run(engine, requests: list[tuple[list[int], int]], device: str) -> dict:
    from serving.engine.sampling_params import SamplingParams

    first: dict[str, float] = {}
    produced = 0
    start = time.perf_counter()
    for i, (prompt, out) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True))
    while engine.has_work:
        for o in engine.step():
            produced += len(o.token_ids)
            first.setdefault(o.request_id, time.perf_counter())
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": produced, "tok_s": produced / elapsed, "first_token_s": min(first.values()) - start}


def single_stream(engine, vocab: int, prompt_len: int, out: int, device: str) -> dict:
    prompt = [random.randrange(vocab) for _ in range(prompt_len)]
    _run(engine, [(prompt, 4)], device)  # warm-up
    r = _run(engine, [(prompt, out)], device)
    decode_s = r["seconds"] - r["first_token_s"]
    return {**r, "decode_tok_s": (out - 1) / decode_s}


def offline(engine, vocab: int, n: int, prompt_len: int, out: int, device: str, mixed: bool = False) -> dict:
    rng = random.Random(0)
    requests = []
    for _ in range(n):
        p, o = (rng.randint(16, 2 * prompt_len), rng.randint(16, 2 * out)) if mixed else (prompt_len, out)
        requests.append(([rng.randrange(vocab) for _ in range(p)], o))
    return _run(engine, requests, device)


def transformers_generate(config_dir: str, device: str, dtype: str, batch: int, prompt_len: int, out: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), device=device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, min_new_tokens=2)  # warm-up
        _sync(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=out, min_new_tokens=out, do_sample=False)
        _sync(device)
    elapsed = time.perf_counter() - start
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"batch": batch, "seconds": elapsed, "tok_s": batch * out / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="bench/configs/llama-3.1-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--out", default="bench/results/gpu_bench.json")
    args = parser.parse_args()
    scale = 16 if args.quick else 1
    n, stream_out = 256 // scale, 256 // scale
    workloads = {k: (n, p // scale, o // scale) for k, (_, p, o) in WORKLOADS.items()}
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.config).vocab_size
    engine = _engine(args.config, args.device, args.dtype, batch=n, seq_len=2048 // scale)
    results: dict = {"single_stream": single_stream(engine, vocab, 128 // scale, stream_out, args.device)}
    for name, (count, p, o) in workloads.items():
        results[name] = offline(engine, vocab, count, p, o, args.device)
    results["mixed"] = offline(engine, vocab, n, 256 // scale, 256 // scale, args.device, mixed=True)
    del engine
    peers = {
        "transformers_batch_1": transformers_generate(args.config, args.device, args.dtype, 1, 128 // scale, stream_out),
        f"transformers_batch_{128 // scale}": transformers_generate(args.config, args.device, args.dtype, 128 // scale, 128 // scale, 128 // scale),
    }  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{'run':<26} {'out tok/s':>10} {'seconds':>8}")
    print(f"{'single stream (decode)':<26} {results['single_stream']['decode_tok_s']:>10.1f} {results['single_stream']['seconds']:>8.2f}")
    for name in (*workloads, "mixed"):
        print(f"{name:<26} {results[name]['tok_s']:>10.1f} {results[name]['seconds']:>8.2f}")
    for name, r in peers.items():
        print(f"{name:<26} {r['tok_s']:>10.1f} {r['seconds']:>8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "config": args.config, "device": args.device,
              "dtype": args.dtype, "quick": args.quick, "fleetlm": results, "peers": peers}  # fmt: skip
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
