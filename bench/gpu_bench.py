"""The engine on a GPU, with random weights of a real architecture (--load-format dummy), against
transformers' generate in the same run, and the same engine behind its HTTP server.

- single stream: one request, 128 prompt tokens, decode tok/s after the first token;
- offline throughput: 256 x (128 in / 512 out), 256 x (512 / 128), and a mixed-length workload;
- transformers `generate` at batch 1 and a static batch of 128 (same config, same dtype);
- HTTP: `python -m serving` on a free port, the decode-heavy workload streamed through bench.loadgen
  at concurrency 64 (TTFT/TPOT p50/p99), against the engine fed the same requests 64 at a time in
  this process: their ratio is the server's overhead (--skip-http where quart/hypercorn are missing).

Phases run one after another, each freeing the GPU before the next loads its weights: engine,
transformers, then the server (its own process, so the engine here must have let go of the memory).
Every run draws its own random prompts (bench.workload): no run hits another's prefix cache. Prompts
are token ids and lengths come from `usage`; a config directory without a tokenizer (bench/configs)
gets a generated one of its vocabulary size (--tokenizer-path), since the server will not start without.
A JSON is written after each phase, so a run stopped by a time limit keeps what it measured.

Prints a table and writes JSON with the date and commit (bench/results/gpu_bench.json; `python -m
bench.gpu_table` makes the README's table of it). --quick runs tiny shapes (a CPU smoke test of this
script: tests/test_gpu_bench.py).

    python -m bench.gpu_bench --config bench/configs/llama-3.1-8b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import torch

from bench.workload import Request, make_workload

# name -> (requests, prompt tokens, output tokens); "mixed" draws both lengths from 16 to 2x these.
WORKLOADS = {"decode_heavy": (256, 128, 512), "prefill_heavy": (256, 512, 128), "mixed": (256, 256, 256)}
HTTP_CONCURRENCY = 64


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free_gpu(device: str) -> int:
    """Collect what the last phase dropped and hand the allocator's cache back to the driver; returns
    the bytes torch still reserves (0 when the phase freed everything)."""
    gc.collect()
    if not device.startswith("cuda"):
        return 0
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved()


def _engine(config_dir: str, device: str, dtype: str, batch: int, seq_len: int):
    from serving.config import ServeConfig
    from serving.engine.builder import build_engine

    cfg = ServeConfig(
        model_path=config_dir, device=device, dtype=dtype, load_format="dummy", max_batch_size=batch, max_seq_len=seq_len
    )
    return build_engine(cfg).engine


def workload(name: str, scale: int, vocab: int, tag: str = "") -> tuple[list[Request], dict]:
    """The requests of a named workload at 1/scale of its shape, and that shape; seeded by the name
    and tag, so that two runs of one shape share no prompt (the engine's prefix cache outlives a run)."""
    n, p, o = WORKLOADS[name]
    n, p, o = n // scale, p // scale, o // scale
    lengths = ((16 // scale, 2 * p), (16 // scale, 2 * o)) if name == "mixed" else ((p, p), (o, o))
    requests = make_workload(n, *lengths, vocab_size=vocab, seed=zlib.crc32(f"{name}{tag}".encode()))
    return requests, {"requests": n, "input_len": list(lengths[0]), "output_len": list(lengths[1])}


def _run(engine, requests: list[Request], device: str, concurrency: int | None = None) -> dict:
    """Every request through engine.step(): all queued at once (offline), or `concurrency` in flight,
    the next one added as one finishes (what an HTTP client at that concurrency does)."""
    from serving.engine.sampling_params import SamplingParams

    added: dict[str, float] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    done: dict[str, float] = {}
    counts: dict[str, int] = {}
    itl: dict[str, list[float]] = {}
    pending = iter(enumerate(requests))

    def add_next() -> None:
        for i, req in pending:
            added[f"r{i}"] = time.perf_counter()
            params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
            engine.add_request(f"r{i}", req.prompt_ids, params)
            return

    start = time.perf_counter()
    for _ in range(concurrency or len(requests)):
        add_next()
    while engine.has_work:
        for o in engine.step():
            now = time.perf_counter()
            counts[o.request_id] = counts.get(o.request_id, 0) + len(o.token_ids)
            if o.request_id in first:
                itl.setdefault(o.request_id, []).append(now - last[o.request_id])
            first.setdefault(o.request_id, now)
            last[o.request_id] = now
            if o.finished:
                done[o.request_id] = now
                add_next()
    _sync(device)
    elapsed = time.perf_counter() - start
    produced = sum(counts.values())
    expected = sum(r.max_tokens for r in requests)
    if produced != expected:
        raise RuntimeError(f"the engine produced {produced} tokens, not the {expected} asked for (ignore_eos)")
    result = {"seconds": elapsed, "output_tokens": produced, "tok_s": produced / elapsed, "first_token_s": min(first.values()) - start}
    if concurrency is not None:  # per-request latencies, summarised as the load generator does HTTP's
        from dataclasses import asdict

        from bench.loadgen import RequestResult, RunSummary

        per_request = [
            RequestResult(len(req.prompt_ids), counts[rid], first[rid] - added[rid], done[rid] - added[rid], itl.get(rid, []))
            for rid, req in ((f"r{i}", r) for i, r in enumerate(requests))
        ]
        result["summary"] = asdict(RunSummary.from_results("fleetlm engine", concurrency, per_request, elapsed))
    return result


def single_stream(engine, vocab: int, prompt_len: int, out: int, device: str) -> dict:
    warm, prompt = make_workload(2, (prompt_len, prompt_len), (out, out), vocab_size=vocab, seed=1)
    _run(engine, [Request(warm.prompt_ids, 4)], device)  # another prompt: the measured one is not cached
    r = _run(engine, [prompt], device)
    decode_s = r["seconds"] - r["first_token_s"]
    return {**r, "decode_tok_s": (out - 1) / decode_s}


def transformers_generate(model, vocab: int, device: str, batch: int, prompt_len: int, out: int) -> dict:
    ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, min_new_tokens=2)  # warm-up
        _sync(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=out, min_new_tokens=out, do_sample=False)
        _sync(device)
    elapsed = time.perf_counter() - start
    return {"batch": batch, "prompt_len": prompt_len, "output_len": out, "seconds": elapsed, "tok_s": batch * out / elapsed}


def write_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A tokenizer whose every id decodes to a word of its own ("w123"), for config directories
    that have none: the server needs one to start and to stream text, and a model's own cannot be
    fetched where this runs. Prompts are token ids, so it never tokenizes; usage counts the tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def _has_tokenizer(config_dir: str) -> bool:
    return any((Path(config_dir) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def http(
    args: argparse.Namespace, runs: dict[str, list[Request]], warmup: list[Request], concurrency: int, vocab: int, seq_len: int
) -> dict:
    """Each workload streamed through `python -m serving` at `concurrency`, with the engine's
    settings; the server is stopped with SIGTERM (its drain) and its exit code kept."""
    import asyncio
    from dataclasses import asdict

    from bench.loadgen import run_load
    from bench.serving_bench import start_server

    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--load-format", "dummy", "--dtype", args.dtype, "--max-seq-len", str(seq_len)]
        tokenizer = "the config directory's"
        if not _has_tokenizer(args.config):
            write_word_tokenizer(Path(tmp), vocab)
            flags += ["--tokenizer-path", tmp]
            tokenizer = "a word per id (bench.gpu_bench.write_word_tokenizer): the config directory has none"
        server = argparse.Namespace(model_path=args.config, device=args.device, max_batch_size=concurrency, threads=None)
        started = time.perf_counter()
        proc, base_url, model = start_server(server, extra_args=flags)
        result: dict = {"concurrency": concurrency, "tokenizer": tokenizer, "server_start_s": time.perf_counter() - started}
        try:
            asyncio.run(run_load(base_url, model, warmup, concurrency))
            result["workloads"] = {name: asdict(asyncio.run(run_load(base_url, model, reqs, concurrency))) for name, reqs in runs.items()}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                result["server_exit_code"] = proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                result["server_exit_code"] = f"killed: still running 90 s after SIGTERM ({proc.wait()})"
    for name, reqs in runs.items():
        got, expected = result["workloads"][name]["output_tokens"], sum(r.max_tokens for r in reqs)
        if got != expected:
            raise RuntimeError(f"HTTP {name}: usage counted {got} completion tokens, not the {expected} asked for")
    return result


def vocab_size_of(config_dir: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(config_dir).vocab_size


def git_commit() -> str:
    """The commit measured: FLEETLM_COMMIT where set, else git's HEAD. The lent GPU machine runs a copy of
    the working tree without .git (and maybe without git), so bench/device_check.sh is given it."""
    if given := os.environ.get("FLEETLM_COMMIT", "").strip():
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    except OSError:  # no git at all
        return "unknown"
    return head.stdout.strip() or "unknown"


def machine_info(device: str) -> dict:
    """What a GPU result is comparable with: torch, the platform, and on CUDA the GPU and CUDA version."""
    info = {"torch": torch.__version__, "platform": platform.platform()}
    if device.startswith("cuda"):
        info |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="bench/configs/llama-3.1-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--skip-http", action="store_true", help="no server run (where quart/hypercorn are missing)")
    parser.add_argument(
        "--http-workloads", default="decode_heavy", help=f"comma-separated, of {', '.join(WORKLOADS)}, through HTTP"
    )
    parser.add_argument("--out", default="bench/results/gpu_bench.json")
    args = parser.parse_args()
    scale = 16 if args.quick else 1
    seq_len, concurrency = 2048 // scale, HTTP_CONCURRENCY // scale
    vocab = vocab_size_of(args.config)
    runs = {name: workload(name, scale, vocab) for name in WORKLOADS}
    http_names = [] if args.skip_http else [n.strip() for n in args.http_workloads.split(",") if n.strip()]
    unknown = set(http_names) - set(WORKLOADS)
    if unknown:
        parser.error(f"--http-workloads: unknown {', '.join(sorted(unknown))}")

    commit = git_commit()
    report: dict = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "config": args.config, "device": args.device,
                    "dtype": args.dtype, "quick": args.quick, "machine": machine_info(args.device), "complete": False}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every phase: a run stopped by its time limit keeps what it measured
        out.write_text(json.dumps(report, indent=1) + "\n")

    def row(label: str, tok_s: float, seconds: float, more: str = "") -> None:
        print(f"{label:<34} {tok_s:>10.1f} {seconds:>8.2f}{more}", flush=True)

    print(f"{'run':<34} {'out tok/s':>10} {'seconds':>8}", flush=True)
    # Phase 1: the engine in this process, offline and (for the HTTP comparison) `concurrency` at a time.
    engine = _engine(args.config, args.device, args.dtype, batch=WORKLOADS["decode_heavy"][0] // scale, seq_len=seq_len)
    results: dict = {"single_stream": single_stream(engine, vocab, 128 // scale, 256 // scale, args.device)}
    row("single stream (decode)", results["single_stream"]["decode_tok_s"], results["single_stream"]["seconds"])
    batch_warmup = make_workload(WORKLOADS["decode_heavy"][0] // scale, (128 // scale,) * 2, (4, 4), vocab, seed=3)
    _run(engine, batch_warmup, args.device)  # kernels for full batches compile here, not in the first run
    for name, (requests, shape) in runs.items():
        results[name] = {**_run(engine, requests, args.device), "shape": shape}
        row(name, results[name]["tok_s"], results[name]["seconds"])
    # Fresh prompts (the offline runs' are in the prefix cache now); the server gets the same ones.
    served = {name: workload(name, scale, vocab, tag=f"@c{concurrency}")[0] for name in http_names}
    at_concurrency = {name: _run(engine, reqs, args.device, concurrency) for name, reqs in served.items()}
    for name, r in at_concurrency.items():
        row(f"{name}, engine at c{concurrency}", r["tok_s"], r["seconds"])
    del engine
    report |= {"fleetlm": results, "gpu_reserved_bytes": {"after_engine": _free_gpu(args.device)}}
    save()

    # Phase 2: transformers, one model for both batch sizes.
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device(args.device):  # random init where the weights live: minutes faster than on the CPU for 8B
        peer = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config), dtype=getattr(torch, args.dtype)).eval()
    static = 128 // scale
    peers = {
        "transformers_batch_1": transformers_generate(peer, vocab, args.device, 1, 128 // scale, 256 // scale),
        f"transformers_batch_{static}": transformers_generate(peer, vocab, args.device, static, 128 // scale, 128 // scale),
    }
    del peer
    for name, r in peers.items():
        row(name, r["tok_s"], r["seconds"])
    report["peers"] = peers
    save()

    # Phase 3: the server, in its own process, on the memory the two phases above gave back.
    http_report: dict | None = None
    if http_names:
        report["gpu_reserved_bytes"]["before_server"] = _free_gpu(args.device)
        warmup = make_workload(concurrency, (128 // scale, 128 // scale), (16 // scale, 16 // scale), vocab, seed=2)
        try:
            http_report = http(args, served, warmup, concurrency, vocab, seq_len)
        except Exception as exc:  # still write what the other phases measured
            http_report = {"concurrency": concurrency, "error": f"{type(exc).__name__}: {exc}"}
            print(f"HTTP part failed: {http_report['error']}", flush=True)
        for name in http_report.get("workloads", {}):
            through_http, engine_c = http_report["workloads"][name], at_concurrency[name]
            ratio = through_http["output_tok_s"] / engine_c["tok_s"]
            http_report["workloads"][name] = {
                "http": through_http,
                "engine_same_concurrency": engine_c["summary"],
                "engine_offline_tok_s": results[name]["tok_s"],
                "ratio_to_engine_same_concurrency": ratio,
                "ratio_to_engine_offline": through_http["output_tok_s"] / results[name]["tok_s"],
                "shape": runs[name][1],
            }
            ttft, tpot = through_http["ttft_ms"], through_http["tpot_ms"]
            row(f"{name}, HTTP at c{concurrency}", through_http["output_tok_s"], through_http["duration_s"],
                f"  TTFT p50/p99 {ttft['p50']:.1f}/{ttft['p99']:.1f} ms  TPOT p50/p99 {tpot['p50']:.2f}/{tpot['p99']:.2f} ms"
                f"  HTTP/engine {ratio:.2f}")  # fmt: skip
    report |= {"http": http_report, "complete": True}
    save()
    if http_report and "error" in http_report:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
