"""The README's GPU table, made from bench/results/gpu_bench.json (bench/gpu_bench.py's report): each
run with the issue's target and whether it was met, and the date, commit and device it was measured
on. Without GPU results (no file, or only a --quick or CPU run) it says so instead: no number here is
ever typed in by hand.

    python -m bench.gpu_table                       # print the table
    python -m bench.gpu_table --readme README.md    # replace the block between the gpu-table markers
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

START, END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"
RESULTS = Path("bench/results/gpu_bench.json")
QUANT_RESULTS = Path("bench/results/quant_gpu_bench.json")  # bench/quant_gpu_bench.py's report

# The targets (output tokens per second unless said otherwise).
SINGLE_STREAM_TOK_S = 215
DECODE_HEAVY_TOK_S = 16_000
PREFILL_HEAVY_TOK_S = 5_500
HTTP_SHARE_OF_ENGINE = 0.85
HTTP_TTFT_P50_MS = 300
# q8_0 "halves" the weights: 34 bytes per 32 weights against bf16's 64 is 0.53 (its block scales).
Q8_WEIGHT_RATIO = 0.55
Q8_AGREEMENT = 0.95

NOT_MEASURED = f"""No GPU figures have been measured yet. They come from one run of `bash bench/device_check.sh`
on a machine with an NVIDIA GPU: it runs `python -m bench.gpu_bench --config bench/configs/llama-3.1-8b
--device cuda --dtype bfloat16` and writes `bench/results/gpu_bench.json`, from which
`python -m bench.gpu_table --readme README.md` makes the table here. The targets it checks:
single-stream decode ≥ {SINGLE_STREAM_TOK_S} tok/s; 256 × (128 in / 512 out) ≥ {DECODE_HEAVY_TOK_S:,} tok/s;
256 × (512 in / 128 out) ≥ {PREFILL_HEAVY_TOK_S:,} tok/s; through HTTP at concurrency 64,
≥ {HTTP_SHARE_OF_ENGINE:.0%} of the engine's tok/s with the same requests and TTFT p50 < {HTTP_TTFT_P50_MS} ms;
`--quantization q8_0` at ≤ {Q8_WEIGHT_RATIO} of the bf16 weights with ≥ {Q8_AGREEMENT:.0%} greedy agreement on the demo
model (`bench/quant_gpu_bench.py`, `bench/results/quant_gpu_bench.json`)."""


def is_gpu_report(report: dict | None) -> bool:
    return bool(report) and not report.get("quick") and str(report.get("device", "")).startswith("cuda")


def _shape(shape: dict) -> str:
    def span(lo_hi: list[int]) -> str:
        lo, hi = lo_hi
        return f"{lo}" if lo == hi else f"{lo}–{hi}"

    return f"{shape['requests']} × ({span(shape['input_len'])} in / {span(shape['output_len'])} out)"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def quant_rows(quant: dict) -> list[tuple[str, str, str, str]]:
    """Rows of bench/quant_gpu_bench.py's report: weight memory and decode speed of each scheme on the
    benchmark's shape (random weights), greedy agreement on the demo model (real weights)."""
    rows = []
    speed, agreement = quant.get("speed", {}), quant.get("demo_agreement", {})
    base = speed.get("none", {})
    for scheme in ("q8_0", "q4_0"):
        if scheme in speed:
            row, target = speed[scheme], scheme == "q8_0"
            keys = [k for k in row if k.startswith("decode_batch_")]
            batches = " / ".join(k[len("decode_batch_") : -len("_tok_s")] for k in keys)
            rows.append((
                f"`--quantization {scheme}`: weights; decode tok/s at batch {batches}",
                f"{row['weight_ratio_to_none']:.3f} of {quant['dtype']} ({row['weight_bytes'] / 2**30:.2f} GiB); "
                f"{' / '.join(f'{row[k]:,.0f}' for k in keys)} ({' / '.join(f'{base[k]:,.0f}' for k in keys)} unquantized)",
                f"≤ {Q8_WEIGHT_RATIO} of {quant['dtype']}" if target else "–",
                _met(row["weight_ratio_to_none"] <= Q8_WEIGHT_RATIO) if target else "–",
            ))  # fmt: skip
        if scheme in agreement:
            row, target = agreement[scheme], scheme == "q8_0"
            rows.append((
                f"`--quantization {scheme}`: greedy agreement on the demo model",
                f"{row['agreement']:.1%} of {row['positions']} positions",
                f"≥ {Q8_AGREEMENT:.0%}" if target else "–",
                _met(row["agreement"] >= Q8_AGREEMENT) if target else "–",
            ))  # fmt: skip
    return rows


def table(report: dict, quant: dict | None = None) -> str:
    """The Markdown table of one GPU report (and of the quantization report measured beside it), with a
    line saying where and when it was measured."""
    fleet, rows = report["fleetlm"], []
    stream = fleet["single_stream"]["decode_tok_s"]
    rows.append(("single stream, decode after the first token (128 in)", f"{stream:,.0f} tok/s",
                 f"≥ {SINGLE_STREAM_TOK_S} tok/s", _met(stream >= SINGLE_STREAM_TOK_S)))  # fmt: skip
    targets = {"decode_heavy": DECODE_HEAVY_TOK_S, "prefill_heavy": PREFILL_HEAVY_TOK_S}
    for name in ("decode_heavy", "prefill_heavy", "mixed"):
        if name not in fleet:
            continue
        tok_s, target = fleet[name]["tok_s"], targets.get(name)
        label = f"engine, offline: {_shape(fleet[name]['shape'])}" if "shape" in fleet[name] else f"engine, offline: {name}"
        rows.append((label, f"{tok_s:,.0f} tok/s", f"≥ {target:,} tok/s" if target else "–",
                     _met(tok_s >= target) if target else "–"))  # fmt: skip
    http = report.get("http") or {}
    if not http:
        why = "not run (`--skip-http`)" if "http" in report else "not reached: the run stopped before it"
        rows.append(("HTTP, concurrency 64", why,
                     f"≥ {HTTP_SHARE_OF_ENGINE:.0%} of the engine; TTFT p50 < {HTTP_TTFT_P50_MS} ms", "–"))  # fmt: skip
    if "error" in http:
        rows.append((f"HTTP, concurrency {http.get('concurrency')}", f"failed: {http['error']}", "", "**no**"))
    for run in http.get("workloads", {}).values():
        served, engine = run["http"], run["engine_same_concurrency"]
        c, ratio = served["concurrency"], run["ratio_to_engine_same_concurrency"]
        rows.append((
            f"HTTP, streamed, concurrency {c}: {_shape(run['shape'])}",
            f"{served['output_tok_s']:,.0f} tok/s = {ratio:.0%} of the engine fed the same requests {c} at a time "
            f"({engine['output_tok_s']:,.0f} tok/s; {run['ratio_to_engine_offline']:.0%} of offline)",
            f"≥ {HTTP_SHARE_OF_ENGINE:.0%} of the engine", _met(ratio >= HTTP_SHARE_OF_ENGINE),
        ))  # fmt: skip
        ttft, tpot = served["ttft_ms"], served["tpot_ms"]
        rows.append((
            f"HTTP, concurrency {c}: TTFT p50 / p99; TPOT p50 / p99",
            f"{ttft['p50']:,.0f} / {ttft['p99']:,.0f} ms; {tpot['p50']:.1f} / {tpot['p99']:.1f} ms "
            f"(engine: TTFT {engine['ttft_ms']['p50']:,.0f} / {engine['ttft_ms']['p99']:,.0f} ms)",
            f"TTFT p50 < {HTTP_TTFT_P50_MS} ms", _met(ttft["p50"] < HTTP_TTFT_P50_MS),
        ))  # fmt: skip
    for peer in report.get("peers", {}).values():
        batch = peer.get("batch")
        what = "one request" if batch == 1 else f"static batch {batch}"
        shape = f" ({peer['prompt_len']} in / {peer['output_len']} out)" if "prompt_len" in peer else ""
        rows.append((f"transformers `generate`, {what}{shape}", f"{peer['tok_s']:,.0f} tok/s", "peer", "–"))
    if is_gpu_report(quant):
        rows += quant_rows(quant)
    machine = report.get("machine", {})
    device = machine.get("gpu") or report.get("device")
    software = ", ".join(f"{k} {machine[k]}" for k in ("torch", "cuda") if machine.get(k))
    lines = [
        f"Measured {report['date']} at commit `{report['commit']}` on {device}"
        f"{f' ({software})' if software else ''}: `{report['config']}`, {report['dtype']}, random weights "
        f"(`--load-format dummy`); output tokens per second. From `bench/results/gpu_bench.json`"
        + ("." if report.get("complete", True) else ", of a run stopped before its end (later rows are missing).")
        + (f" Quantization rows: `bench/results/quant_gpu_bench.json` ({quant['date']}, `{quant['commit']}`)."
           if is_gpu_report(quant) else ""),
        "",
        "| run | measured | target | met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def block(report: dict | None, quant: dict | None = None) -> str:
    """What goes between the README's markers: the table, or why there is none."""
    return table(report, quant) if report is not None and is_gpu_report(report) else NOT_MEASURED


def replace_block(text: str, content: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"want exactly one {START} ... {END} block")
    return pattern.sub(lambda _: f"{START}\n{content}\n{END}", text)


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--quant-results", type=Path, default=QUANT_RESULTS)
    parser.add_argument("--readme", type=Path, help="write the block into this file instead of printing it")
    args = parser.parse_args()
    content = block(load(args.results), load(args.quant_results))
    if args.readme is None:
        print(content)
    else:
        args.readme.write_text(replace_block(args.readme.read_text(), content))


if __name__ == "__main__":
    main()
