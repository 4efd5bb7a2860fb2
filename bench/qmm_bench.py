"""CPU block-quantized matmul (serving.models.cpu_qmm) against torch's CPU kernels, on SmolLM2-135M shapes.

For each weight shape (K x N) and batch M: GMAC/s of our kernel (Q4_0 and Q8_0, and Q4_1, at 1 and
2 threads), torch's `_weight_int4pack_mm_for_cpu` (bf16 activations, Q4_0 weights packed as
`Int4CpuLinear` does), `_weight_int8pack_mm` (bf16) and float32 `x @ w.t()`. For the decode-sized
rows (M <= 16) each call uses another of enough distinct weight copies to exceed the L3 cache,
so weights come from RAM as they do in a real decode step. Prints a table and writes JSON.

    python -m bench.qmm_bench                 # everything, twice (about five minutes)
    python -m bench.qmm_bench --quick --rounds 1   # fewer rows, once
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from serving.models import cpu_qmm
from serving.models.quant import quantize_q4_0, quantize_q8_0, unpack_q4_0

SHAPES = [  # (K, N, what)
    (576, 960, "q/k/v (fused)"),
    (576, 576, "attn out"),
    (576, 3072, "gate/up (fused)"),
    (1536, 576, "down"),
    (576, 49152, "lm_head"),
]
MS = (1, 4, 16, 64, 512)
ROTATE_BYTES = 96 << 20  # distinct weight copies per row: more than the 32 MB L3, with margin
ROTATE_MAX_M = 16
RESULTS = Path(__file__).resolve().parent / "results" / "qmm_bench.json"


def gguf_bytes(fmt: str, w: torch.Tensor) -> torch.Tensor:
    N = w.shape[0]
    if fmt == "q8_0":
        q, d = quantize_q8_0(w)
        parts = (d.unsqueeze(-1).view(torch.uint8), q.view(torch.uint8))
    elif fmt == "q4_0":
        packed, d = quantize_q4_0(w)
        parts = (d.unsqueeze(-1).view(torch.uint8), packed)
    else:  # q4_1: min/max per block, as llama.cpp's quantizer
        blocks = w.reshape(N, -1, 32)
        lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        q = ((blocks - lo) / torch.where(d == 0, 1.0, d) + 0.5).floor().clamp(0, 15).to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        parts = (d.half().view(torch.uint8), lo.half().view(torch.uint8), packed)
    return torch.cat(parts, dim=-1).reshape(N, -1).contiguous()


def time_calls(fn, args_list, seconds: float) -> tuple[float, float]:
    """Median and 10th-percentile seconds per call, cycling through args_list."""
    for args in args_list[:2]:
        fn(*args)
    times = []
    deadline = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < deadline or len(times) < 5:
        args = args_list[i % len(args_list)]
        i += 1
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times), times[len(times) // 10]


def copies_for(nbytes: int, M: int) -> int:
    return max(1, -(-ROTATE_BYTES // nbytes)) if M <= ROTATE_MAX_M else 1


def bench_shape(K: int, N: int, Ms, threads, seconds: float, formats) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.05
    rows = []
    # Our kernel.
    for fmt in formats:
        base = gguf_bytes(fmt, w)
        for M in Ms:
            ws = [base] + [base.clone() for _ in range(copies_for(base.numel(), M) - 1)]
            x = torch.randn(M, K, generator=g)
            out = torch.empty(M, N)
            code = cpu_qmm.FORMATS[fmt]
            args = [(code, x.data_ptr(), wi.data_ptr(), out.data_ptr(), M, K, N) for wi in ws]
            for t in threads:
                cpu_qmm.set_num_threads(t)
                med, p10 = time_calls(cpu_qmm._qmm.matmul, args, seconds)
                rows.append(
                    dict(
                        kernel=f"qmm {fmt}", K=K, N=N, M=M, threads=t, copies=len(ws), median_s=med, p10_s=p10
                    )
                )
            del ws
    cpu_qmm.set_num_threads(None)
    # torch baselines.
    packed, d = quantize_q4_0(w)
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        unpack_q4_0(packed).flatten(-2).to(torch.int32), 1
    )
    sz = d.t().float()
    sz = torch.stack((sz, torch.zeros_like(sz)), dim=-1).bfloat16()
    int8 = (w / w.abs().amax(1, keepdim=True) * 127).round().to(torch.int8)
    s8 = (w.abs().amax(1) / 127).bfloat16()
    f32 = w.contiguous()
    baselines = {
        "torch int4pack bf16": (
            lambda x, a, b: torch.ops.aten._weight_int4pack_mm_for_cpu(x, a, 32, b),
            (int4, sz),
            torch.bfloat16,
            int4.numel() * int4.element_size() + sz.numel() * 2,
        ),
        "torch int8pack bf16": (
            torch.ops.aten._weight_int8pack_mm,
            (int8, s8),
            torch.bfloat16,
            int8.numel() + s8.numel() * 2,
        ),
        "torch f32 x@w.t()": (lambda x, a: x @ a.t(), (f32,), torch.float32, f32.numel() * 4),
    }
    before = torch.get_num_threads()
    for name, (fn, weights, dtype, nbytes) in baselines.items():
        for M in Ms:
            copies = copies_for(nbytes, M)
            sets = [weights] + [tuple(t.clone() for t in weights) for _ in range(copies - 1)]
            x = torch.randn(M, K, generator=g).to(dtype)
            args = [(x, *s) for s in sets]
            for t in threads:
                torch.set_num_threads(t)
                with torch.inference_mode():
                    med, p10 = time_calls(fn, args, seconds)
                rows.append(
                    dict(kernel=name, K=K, N=N, M=M, threads=t, copies=copies, median_s=med, p10_s=p10)
                )
            del sets
    torch.set_num_threads(before)
    for r in rows:
        r["gmacs"] = r["M"] * r["K"] * r["N"] / r["median_s"] / 1e9
        r["gmacs_p10"] = r["M"] * r["K"] * r["N"] / r["p10_s"] / 1e9
    return rows


def accuracy() -> list[dict]:
    """Error against the exactly dequantized reference, SmolLM2-like activations (an outlier channel)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for K, N in ((576, 960), (1536, 576)):
        w = torch.randn(N, K, generator=g) * 0.05
        x = torch.randn(64, K, generator=g)
        x[:, 5] *= 20
        for fmt in ("q4_0", "q4_1", "q8_0"):
            wq = gguf_bytes(fmt, w)
            y = cpu_qmm.matmul(x, wq, fmt, N).double()
            ref = cpu_qmm.reference_matmul(x, wq, fmt)
            emu = cpu_qmm.emulated_matmul(x, wq, fmt)
            out.append(
                dict(
                    fmt=fmt,
                    K=K,
                    N=N,
                    max_row_rel_err=((y - ref).norm(dim=1) / ref.norm(dim=1)).max().item(),
                    max_abs_err_over_max_abs=((y - ref).abs().max() / ref.abs().max()).item(),
                    max_abs_err_vs_emulated_over_max_abs=((y - emu).abs().max() / ref.abs().max()).item(),
                )
            )
        # torch's int4 kernel on the same Q4_0 weights, for comparison (bf16 activations).
        packed, d = quantize_q4_0(w)
        int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            unpack_q4_0(packed).flatten(-2).to(torch.int32), 1
        )
        sz = d.t().float()
        sz = torch.stack((sz, torch.zeros_like(sz)), dim=-1).bfloat16()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), int4, 32, sz).double()
        ref = cpu_qmm.reference_matmul(x, gguf_bytes("q4_0", w), "q4_0")
        out.append(
            dict(
                fmt="q4_0 (torch int4pack bf16)",
                K=K,
                N=N,
                max_row_rel_err=((y - ref).norm(dim=1) / ref.norm(dim=1)).max().item(),
                max_abs_err_over_max_abs=((y - ref).abs().max() / ref.abs().max()).item(),
            )
        )
    return out


def overhead(seconds: float) -> dict:
    """Per-call costs: the extension call itself, the Python wrapper, and the pool round trip."""
    res = {}
    x, w = torch.randn(1, 32), gguf_bytes("q4_0", torch.randn(8, 32))
    out = torch.empty(1, 8)
    raw = (0, x.data_ptr(), w.data_ptr(), out.data_ptr(), 1, 32, 8)
    res["raw_call_tiny_us"] = time_calls(cpu_qmm._qmm.matmul, [raw], seconds)[0] * 1e6
    res["python_wrapper_tiny_us"] = time_calls(cpu_qmm.matmul, [(x, w, "q4_0", 8)], seconds)[0] * 1e6
    # A decode-sized call: 576x576 Q4_0, M=1, back to back; and with 20 us of other work between calls.
    K = N = 576
    w = gguf_bytes("q4_0", torch.randn(N, K) * 0.05)
    x, out = torch.randn(1, K), torch.empty(1, N)
    args = [(0, x.data_ptr(), w.data_ptr(), out.data_ptr(), 1, K, N)]

    def with_gap(*a):
        cpu_qmm._qmm.matmul(*a)
        end = time.perf_counter() + 20e-6
        while time.perf_counter() < end:
            pass

    for t in (1, 2):
        cpu_qmm.set_num_threads(t)
        res[f"call_576x576_m1_t{t}_us"] = time_calls(cpu_qmm._qmm.matmul, args, seconds)[0] * 1e6
        res[f"call_576x576_m1_t{t}_with_20us_gaps_us"] = time_calls(with_gap, args, seconds)[0] * 1e6 - 20
    cpu_qmm.set_num_threads(None)
    t1, t2 = res["call_576x576_m1_t1_us"], res["call_576x576_m1_t2_us"]
    res["pool_overhead_est_us"] = t2 - t1 / 2
    return res


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per cell: the round with the highest throughput, and every round's GMAC/s."""
    merged: dict[tuple, dict] = {}
    for rows in rounds:
        for r in rows:
            key = (r["kernel"], r["K"], r["N"], r["M"], r["threads"])
            best = merged.get(key)
            all_rounds = ([*best["gmacs_rounds"], r["gmacs"]]) if best else [r["gmacs"]]
            if best is None or r["gmacs"] > best["gmacs"]:
                merged[key] = dict(r)
            merged[key]["gmacs_rounds"] = all_rounds
    return list(merged.values())


def fmt_table(rows: list[dict], threads) -> str:
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    shapes = list(dict.fromkeys((r["K"], r["N"]) for r in rows))
    Ms = sorted({r["M"] for r in rows})
    index = {(r["kernel"], r["K"], r["N"], r["M"], r["threads"]): r["gmacs"] for r in rows}
    head = f"{'shape KxN':>11} {'kernel':<20}" + "".join(
        f" {'M=' + str(m) + ' t' + str(t):>9}" for m in Ms for t in threads
    )
    lines = ["GMAC/s (median per call, best of the rounds; higher is better)", head, "-" * len(head)]
    for K, N in shapes:
        for k in kernels:
            cells = [index.get((k, K, N, m, t)) for m in Ms for t in threads]
            if all(c is None for c in cells):
                continue
            lines.append(
                f"{f'{K}x{N}':>11} {k:<20}"
                + "".join(f" {c:9.1f}" if c is not None else f" {'-':>9}" for c in cells)
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="M in {1, 16, 512}, shorter timing")
    p.add_argument("--seconds", type=float, default=0.25, help="timing per row and thread count")
    p.add_argument("--threads", default="1,2")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="sweeps; each cell reports its best round (another process taking a core for a while "
        "spoils one round's cells, seldom all)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if not cpu_qmm.available():
        raise SystemExit("serving.models._qmm is not built (or has no SIMD path on this CPU)")
    Ms = (1, 16, 512) if args.quick else MS
    seconds = args.seconds / 2 if args.quick else args.seconds
    threads = tuple(int(t) for t in args.threads.split(","))
    load_before = os.getloadavg()
    rounds: list[list[dict]] = []
    for r in range(args.rounds):
        rows = []
        for K, N, what in SHAPES:
            formats = ("q8_0", "q4_0") if N == 49152 else ("q4_0", "q4_1", "q8_0")
            print(f"round {r + 1}/{args.rounds}: {K}x{N} ({what}) ...", flush=True)
            rows += bench_shape(K, N, Ms, threads, seconds, formats)
        rounds.append(rows)
    rows = merge_rounds(rounds)
    table = fmt_table(rows, threads)
    print()
    print(table)
    acc = accuracy()
    print("\nAccuracy against the exactly dequantized weights (64 rows, an outlier channel):")
    for a in acc:
        extra = a.get("max_abs_err_vs_emulated_over_max_abs")
        extra = f", vs emulated {extra:.1e}" if extra is not None else ""
        print(
            f"  {a['fmt']:<28} {a['K']}x{a['N']}: max row rel err {a['max_row_rel_err']:.2e}, "
            f"max|err|/max|out| {a['max_abs_err_over_max_abs']:.2e}{extra}"
        )
    ov = overhead(0.3)
    print("\nPer-call costs (us):")
    for k, v in ov.items():
        print(f"  {k:<44} {v:7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        machine=platform.machine(),
        processor=platform.processor(),
        cpus=os.cpu_count(),
        torch=torch.__version__,
        simd=cpu_qmm.simd(),
        loadavg_before=load_before,
        loadavg_after=os.getloadavg(),
        rotate_bytes=ROTATE_BYTES,
        rotate_max_m=ROTATE_MAX_M,
        rounds=args.rounds,
    )
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows, accuracy=acc, overhead_us=ov), indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
