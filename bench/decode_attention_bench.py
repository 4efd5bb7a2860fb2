"""Paged decode attention on a GPU: the Triton kernel with each sequence's keys split into parts
(split-K, as the runner picks by batch size: triton_attention.decode_splits), the same kernel in one
part per sequence, and the torch reference path (gather the blocks, then SDPA), over batch sizes and
context lengths, with Llama-3.1-8B's attention shape (32 query heads on 8 KV heads, head size 128).

What the split is for: at a few sequences, batch x 8 KV heads programs leave most of the GPU's
multiprocessors idle and each reads its whole context tile after tile. The table gives microseconds
per layer and the KV bytes read per second.

    python -m bench.decode_attention_bench      # CUDA; writes bench/results/decode_attention_bench.json
    TRITON_INTERPRET=1 python -m bench.decode_attention_bench --device cpu --quick --splits 3   (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.gpu_bench import git_commit, machine_info

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
BATCHES = (1, 4, 16, 64, 256)
CONTEXTS = (512, 4096, 32768)
MAX_TOKENS = 1 << 20  # batch x context: 512 MiB of K and V per layer in bf16


def _time_us(fn, device: torch.device, repeats: int) -> float:
    """Median of `repeats` timed calls, after warm-up (compiles): CUDA events on a GPU."""
    fn()
    if device.type != "cuda":
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e6
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def measure(
    batch: int, context: int, device: torch.device, dtype: torch.dtype, repeats: int, heads: tuple[int, int, int], splits: int | None
) -> dict:
    from serving.models.attention import AttentionBatch, PagedAttention
    from serving.models.triton_attention import decode_splits, paged_decode_attention

    num_heads, kv_heads, head_dim = heads
    blocks_per_seq = -(-context // BLOCK)
    k_cache = torch.randn(batch * blocks_per_seq * BLOCK, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    # Each sequence's blocks scattered over the cache, as the block manager leaves them after a while.
    tables = torch.randperm(batch * blocks_per_seq, device=device).view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.long, device=device)
    q = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype)
    out = torch.empty_like(q)
    scale = head_dim**-0.5
    splits = splits or decode_splits(batch, kv_heads, device)
    row: dict = {"batch": batch, "context": context, "splits": splits}
    kv_bytes = 2 * batch * context * kv_heads * head_dim * k_cache.element_size()
    runs = {
        "split_us": lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, BLOCK, scale, out=out, splits=splits),
        "one_part_us": lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, BLOCK, scale, out=out, splits=1),
    }
    reference = PagedAttention(num_heads, kv_heads, head_dim, scale, None)
    meta = AttentionBatch(slot_mapping=lens, block_size=BLOCK, decode_rows=torch.arange(batch, device=device),
                          decode_blocks=tables, decode_lens=lens, decodes_first=True)  # fmt: skip
    if batch * context <= MAX_TOKENS // 4:  # the gather copies every sequence's K/V: memory-bound on its own
        runs["torch_us"] = lambda: reference._decode_torch(q, k_cache, v_cache, meta)
    for name, fn in runs.items():
        row[name] = _time_us(fn, device, repeats)
    paged_decode_attention(q, k_cache, v_cache, tables, lens, BLOCK, scale, out=out, splits=splits)
    want = reference._decode_torch(q, k_cache, v_cache, meta)
    row["max_abs_error"] = (out.float() - want.float()).abs().max().item()
    row["split_kv_gb_s"] = kv_bytes / row["split_us"] / 1e3
    row["split_speedup"] = row["one_part_us"] / row["split_us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--splits", type=int, help="parts per sequence instead of the runner's choice")
    parser.add_argument("--out", default="bench/results/decode_attention_bench.json")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.quick:
        shape, batches, contexts, repeats = (4, 2, 16), (1, 3), (40, 100), 1
    else:
        shape, batches, contexts, repeats = (HEADS, KV_HEADS, HEAD_DIM), BATCHES, CONTEXTS, 20
    rows = []
    print(f"{'batch':>5} {'context':>7} {'splits':>6} {'split us':>9} {'1 part us':>9} {'torch us':>9} {'speedup':>7} {'KV GB/s':>8}")
    for batch in batches:
        for context in contexts:
            if batch * context > MAX_TOKENS:
                continue
            r = measure(batch, context, device, dtype, repeats, shape, args.splits)
            rows.append(r)
            torch_us = f"{r['torch_us']:>9.1f}" if "torch_us" in r else f"{'-':>9}"
            print(f"{batch:>5} {context:>7} {r['splits']:>6} {r['split_us']:>9.1f} {r['one_part_us']:>9.1f} {torch_us} "
                  f"{r['split_speedup']:>6.2f}x {r['split_kv_gb_s']:>8.0f}", flush=True)  # fmt: skip
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    worst = max(r["max_abs_error"] for r in rows)
    report = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "device": args.device, "dtype": args.dtype,
              "quick": args.quick, "machine": machine_info(args.device),
              "shape": dict(zip(("heads", "kv_heads", "head_dim"), shape, strict=True)), "block_size": BLOCK,
              "rows": rows, "max_abs_error": worst}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if worst > tolerance:
        raise SystemExit(f"the kernel's output differs from the torch path's by {worst} (> {tolerance})")


if __name__ == "__main__":
    main()
