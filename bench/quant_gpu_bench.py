"""Weight-only block quantization (q8_0, q4_0) against float weights, in one run: the weights' memory
and decode speed with random weights of a real architecture (--load-format dummy), and greedy
agreement with the float model on the demo model (stories260K, real trained weights, tiny).

- weight bytes: `serving.models.quant.weight_bytes` of the loaded model (quantized layers at their
  packed size), and its ratio to the float model's;
- decode tok/s at batch 1 and batch 32: that many requests of 128 prompt tokens and 128 new ones
  through engine.step(), the tokens after every request's first over the time they took (after a
  warm-up run of the same shape);
- agreement: the float model's greedy continuations of a few prompts, teacher-forced through each
  model: the share of positions (prompt and continuation) whose argmax is the float model's.

The issue's target: q8_0 halves the weights' memory with >= 95% greedy agreement on the demo model.
On CUDA the quantized layers run the Triton kernel (serving/models/triton_quant.py), on CPU the C
kernels; the table says which. Prints a table and writes JSON with the date and commit
(bench/results/quant_gpu_bench.json). --quick runs tiny shapes (tests/test_quant_gpu_bench.py).

    python -m bench.quant_gpu_bench --config bench/configs/llama-3.1-8b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.gpu_bench import git_commit, machine_info

SCHEMES = ("none", "q8_0", "q4_0")
PROMPTS = (
    "Once upon a time, there was a little girl named Lily.",
    "One day, Tom went to the park with his mom.",
    "The big dog saw a red ball",
    "Sam and his friend wanted to build a tall tower.",
    "There was a small bird who could not fly.",
    "Mia liked to help her dad in the garden.",
    "The sun was hot, so the children went to the lake.",
    "A little boy found a shiny box under his bed.",
)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _build(model_path: str, device: str, dtype: str, scheme: str, dummy: bool, batch: int, seq_len: int):
    from serving.config import ServeConfig
    from serving.engine.builder import build_engine

    seq_len = -(-seq_len // 16) * 16  # whole KV-cache blocks
    cfg = ServeConfig(
        model_path=model_path, device=device, dtype=dtype, quantization=scheme, load_format="dummy" if dummy else "auto",
        max_batch_size=batch, max_seq_len=seq_len, kv_cache_tokens=batch * seq_len,
    )  # fmt: skip
    return build_engine(cfg).engine


def _paths(model: torch.nn.Module) -> list[str]:
    from serving.models.quant import BlockQuantLinear

    return sorted({m.path for m in model.modules() if isinstance(m, BlockQuantLinear)})


def _generate(engine, prompts: list[list[int]], max_tokens: int, device: str) -> tuple[dict[str, list[int]], dict[str, float], float]:
    """Greedy tokens per request, when each got its first token, and when the last finished."""
    from serving.engine.sampling_params import SamplingParams

    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    first: dict[str, float] = {}
    while engine.has_work:
        outputs = engine.step()
        _sync(device)
        now = time.perf_counter()
        for o in outputs:
            tokens[o.request_id] += o.token_ids
            first.setdefault(o.request_id, now)
    return tokens, first, time.perf_counter()


def decode_tok_s(engine, batch: int, prompt_len: int, out: int, vocab: int, device: str) -> float:
    rng = random.Random(batch)
    for _ in range(2):  # the first run warms up: kernels compile (and on CUDA tune), memory is touched
        prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(batch)]
        tokens, first, end = _generate(engine, prompts, out, device)
    if any(len(t) != out for t in tokens.values()):
        raise RuntimeError(f"asked for {out} tokens a request, got {sorted({len(t) for t in tokens.values()})}")
    return batch * (out - 1) / (end - max(first.values()))


def speed(args: argparse.Namespace, scale: int, results: dict, save: Callable[[], None]) -> None:
    """Per scheme, into `results`: weight bytes, compute paths, decode tok/s at batch 1 and 32 (random
    weights). `save` is called after each scheme: a run cut short keeps what it measured."""
    from transformers import AutoConfig

    from serving.models.quant import weight_bytes

    vocab = AutoConfig.from_pretrained(args.config).vocab_size
    prompt_len, out, batches = 128 // scale, 128 // scale, (1, 32 // scale)
    for scheme in SCHEMES:
        engine = _build(args.config, args.device, args.dtype, scheme, True, batches[-1], prompt_len + out)
        model = engine.runner.model
        row: dict = {"weight_bytes": weight_bytes(model), "paths": _paths(model)}
        if args.device.startswith("cuda"):
            row["gpu_allocated_bytes"] = torch.cuda.memory_allocated()  # weights and the (same-sized) KV cache
        for b in batches:
            row[f"decode_batch_{b}_tok_s"] = decode_tok_s(engine, b, prompt_len, out, vocab, args.device)
        row["weight_ratio_to_none"] = row["weight_bytes"] / results.get("none", row)["weight_bytes"]
        results[scheme] = row
        save()
        del engine, model
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _teacher_forced_picks(engine, sequences: list[list[int]]) -> torch.Tensor:
    """The argmax at every position of each sequence, all positions computed in one prefill each."""
    from serving.models.runner import ForwardChunk

    picks = []
    for i, seq in enumerate(sequences):
        blocks = list(range(-(-len(seq) // 16)))
        logits = engine.runner.execute([ForwardChunk(i, seq, 0, blocks, decode=False)], list(range(len(seq))))
        picks.append(logits.argmax(-1).cpu())
    return torch.cat(picks)


def agreement(args: argparse.Namespace, scale: int) -> dict:
    """Teacher-forced greedy agreement of each scheme with the float model, on the demo model."""
    from transformers import AutoTokenizer

    from serving.models.quant import weight_bytes
    from serving.models.source import demo_model_dir

    demo = str(demo_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(demo)
    prompts = [tokenizer(p).input_ids for p in PROMPTS[: len(PROMPTS) // scale]]
    new_tokens = 96 // scale
    seq_len = max(map(len, prompts)) + new_tokens + 16
    engine = _build(demo, args.device, args.dtype, "none", False, 1, seq_len)
    tokens, _, _ = _generate(engine, prompts, new_tokens, args.device)
    sequences = [p + tokens[f"r{i}"] for i, p in enumerate(prompts)]
    del engine
    results: dict = {}
    for scheme in SCHEMES:
        engine = _build(demo, args.device, args.dtype, scheme, False, 1, seq_len)
        picks = _teacher_forced_picks(engine, sequences)
        results[scheme] = {"picks": picks, "weight_bytes": weight_bytes(engine.runner.model), "paths": _paths(engine.runner.model)}
        del engine
        gc.collect()
    reference = results["none"]["picks"]
    for row in results.values():
        row["agreement"] = (row.pop("picks") == reference).float().mean().item()
        row["positions"] = reference.numel()
        row["weight_ratio_to_none"] = row["weight_bytes"] / results["none"]["weight_bytes"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="bench/configs/llama-3.1-8b", help="a model directory (its config is enough)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--out", default="bench/results/quant_gpu_bench.json")
    args = parser.parse_args()
    scale = 8 if args.quick else 1
    report = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "config": args.config, "device": args.device,
              "dtype": args.dtype, "quick": args.quick, "machine": machine_info(args.device), "speed": {},
              "demo_agreement": {}}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=1) + "\n")

    # The acceptance figure (agreement, on the small demo model) first: the 8B builds of the speed part
    # take most of the time, and each of their results is saved as it comes.
    report["demo_agreement"] = agrees = agreement(args, scale)
    save()
    print("demo model (stories260K, real weights), teacher-forced greedy agreement with the float model")
    for scheme, row in agrees.items():
        print(f"{scheme:<8} {row['agreement']:>8.1%} of {row['positions']} positions, weights x{row['weight_ratio_to_none']:.3f}")
    speeds = report["speed"]
    speed(args, scale, speeds, save)

    batches = [k for k in speeds["none"] if k.startswith("decode_batch_")]
    print(f"{args.config} on {args.device} ({args.dtype}), random weights")
    print(f"{'scheme':<8} {'weights':>12} {'x none':>7} {'path':>10}" + "".join(f" {k[7:-6] + ' tok/s':>16}" for k in batches))
    for scheme, row in speeds.items():
        print(f"{scheme:<8} {row['weight_bytes'] / 2**20:>8.1f} MiB {row['weight_ratio_to_none']:>7.3f} "
              f"{','.join(row['paths']) or '-':>10}" + "".join(f" {row[k]:>16.1f}" for k in batches))  # fmt: skip


if __name__ == "__main__":
    main()
