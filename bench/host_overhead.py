"""The engine's host work per decode step, apart from the model: what a GPU waits on between steps.

On a GPU the step's Python (scheduling, block tables, packing inputs, appending sampled tokens) runs
while the device idles: at batch 256 of an 8B model a decode step's weights and KV take some 7 ms
to read on an H200, so every millisecond of host work costs a seventh of the throughput. This
measures it on the CPU with a model so small (one layer, hidden 32) that its compute is a sliver,
timed apart and subtracted: step time, model forward, and the rest ("host"), at several batch sizes,
through the eager path and through the CUDA graphs' static-buffer path (run eagerly here).

    python -m bench.host_overhead            # prints a table, writes bench/results/host_overhead.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from array import array
from pathlib import Path

import torch
from transformers import AutoConfig

from bench.gpu_bench import git_commit, machine_info
from serving.config import ServeConfig
from serving.engine.builder import BLOCK_SIZE, build_engine
from serving.engine.sampling_params import SamplingParams
from serving.models.native import StepInputs
from serving.models.runner import ForwardChunk

RESULTS = Path(__file__).resolve().parent / "results" / "host_overhead.json"
PROMPT, MAX_LEN = 128, 1024


def measure(model_dir: str, batch: int, graphs: bool, steps: int) -> dict:
    engine = build_engine(
        ServeConfig(model_path=model_dir, device="cpu", dtype="float32", load_format="dummy", max_batch_size=batch, max_seq_len=MAX_LEN)
    ).engine
    if graphs:
        engine.runner.use_decode_graphs(batch, MAX_LEN, capture=False)
    rng = random.Random(batch)
    params = SamplingParams(max_tokens=MAX_LEN - PROMPT, ignore_eos=True, temperature=0.0)
    for i in range(batch):
        engine.add_request(f"r{i}", [rng.randrange(3, 512) for _ in range(PROMPT)], params)
    while engine.scheduler.waiting or not all(s.is_decoding for s in engine.scheduler.running):
        engine.step()
    model = engine.runner.model
    forward = model.forward
    in_model = 0.0

    def timed_forward(*args, **kwargs):
        nonlocal in_model
        started = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            in_model += time.perf_counter() - started

    for _ in range(10):  # warm-up: allocator, first-call paths
        engine.step()
    model.forward = timed_forward
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    step = (time.perf_counter() - started) / steps
    assert all(s.is_decoding for s in engine.scheduler.running) and len(engine.scheduler.running) == batch
    return {
        "batch": batch,
        "path": "static buffers (CUDA graphs' inputs)" if graphs else "eager",
        "step_ms": round(step * 1e3, 3),
        "model_ms": round(in_model / steps * 1e3, 3),
        "host_ms": round((step - in_model / steps) * 1e3, 3),
    }


def inputs_at_context(batch: int, context: int, repeats: int = 20) -> dict:
    """Packing one pure-decode step's inputs alone (StepInputs.build) at a long context, with block
    tables as the block manager holds them: at batch 256 and 32k tokens they are half a million ints,
    which the engine-driven rows above (1k context) barely show."""
    rng = random.Random(context)
    blocks = -(-context // BLOCK_SIZE)
    chunks = [
        ForwardChunk(i, [rng.randrange(512)], context - 1, array("q", rng.sample(range(1 << 20), blocks)), True)
        for i in range(batch)
    ]
    build = lambda: StepInputs.build(chunks, list(range(batch)), BLOCK_SIZE, "triton", torch.device("cpu"))  # noqa: E731
    build()
    started = time.perf_counter()
    for _ in range(repeats):
        build()
    return {"batch": batch, "context": context, "inputs_ms": round((time.perf_counter() - started) / repeats * 1e3, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 32768])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the host work is single-threaded Python; so is the model's, here
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        AutoConfig.for_model(
            "llama", vocab_size=512, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=MAX_LEN,
        ).save_pretrained(tmp)  # fmt: skip
        for batch in args.batches:
            for graphs in (False, True):
                rows.append(measure(tmp, batch, graphs, args.steps))
                r = rows[-1]
                print(f"batch {r['batch']:4d}  {r['path']:38s} step {r['step_ms']:7.3f} ms  model {r['model_ms']:7.3f} ms  host {r['host_ms']:7.3f} ms")
    contexts = []
    for context in args.contexts:
        contexts.append(inputs_at_context(max(args.batches), context))
        c = contexts[-1]
        print(f"batch {c['batch']:4d}  step inputs alone at a {c['context']}-token context: {c['inputs_ms']:7.3f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "machine": machine_info("cpu"), "rows": rows,
        "step_inputs_at_context": contexts,
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
