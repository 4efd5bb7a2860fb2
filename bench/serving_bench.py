"""FleetLM vs transformers on the same model and workload, in one run: prints a table, writes JSON.

Starts `python -m serving` on a free port (or uses --base-url), sweeps concurrency with the
load generator, then runs the transformers peer one request at a time and in static batches.
Then --rounds more times, alternately, FleetLM at the top concurrency and the peer's best static
batch: on a shared machine whose speed drifts over minutes, ratios of measurements taken seconds
apart are what to trust, and their spread says how much.

    python -m bench.serving_bench                      # the embedded demo model, CPU
    python -m bench.serving_bench --model-path DIR --vocab-size 49152 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import httpx
import torch

from bench.loadgen import RunSummary, format_table, run_load
from bench.peer_transformers import load_peer, run_one_at_a_time, run_static_batches
from bench.workload import make_workload, parse_length


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, extra_args: Sequence[str] = ()) -> tuple[subprocess.Popen, str, str]:
    """`python -m serving` on a free port with args' settings plus extra_args (more server flags);
    returns once /health says ready: the process, its /v1 URL and the served model's name."""
    port = _free_port()
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    cmd += ["--max-batch-size", str(args.max_batch_size), "--device", args.device]
    if args.model_path:
        cmd += ["--model-path", args.model_path]
    if args.threads:
        cmd += ["--num-threads", str(args.threads)]
    cmd += extra_args
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
                return proc, base + "/v1", model
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server did not become healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", help="model to serve and to load in the peer (default: the embedded demo)")
    parser.add_argument("--base-url", help="benchmark an already running endpoint instead of starting one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", default="16-64")
    parser.add_argument("--output-len", default="16-256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="server torch threads (default: the server's own default)")
    parser.add_argument(
        "--peer-threads", default=f"1,{os.cpu_count()}", help="torch thread counts to run the peer with; its best counts"
    )
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--rounds", type=int, default=4, help="extra paired rounds of the top-concurrency comparison")
    parser.add_argument("--json", default="bench/results/serving_bench.json")
    args = parser.parse_args()

    workload = make_workload(args.num_requests, parse_length(args.input_len), parse_length(args.output_len), args.vocab_size, args.seed)
    sweep = [int(c) for c in args.concurrency.split(",")]
    rows: list[RunSummary] = []
    proc = None
    if args.base_url:
        base_url = args.base_url
        model = httpx.get(base_url + "/models").json()["data"][0]["id"]
    else:
        proc, base_url, model = start_server(args)
    top = max(sweep)
    static_threads: dict[str, int] = {}  # the peer's static-batch rows (by system name) -> its thread count
    rounds: list[dict[str, float]] = []
    try:
        asyncio.run(run_load(base_url, model, workload[:4], 4))  # warm-up
        for c in sweep:
            rows.append(asyncio.run(run_load(base_url, model, workload, c)))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)

        # The idle server uses no CPU while the peer runs in this process.
        if not args.no_peer:
            from serving.models.source import demo_model_dir

            peer = load_peer(args.model_path or str(demo_model_dir()))
            for threads in sorted({int(t) for t in args.peer_threads.split(",")}):
                torch.set_num_threads(threads)
                run_one_at_a_time(peer, workload[:2])  # warm-up
                one, batched = run_one_at_a_time(peer, workload), run_static_batches(peer, workload, top)
                for summary in (one, batched):
                    summary.system += f", {threads} thread{'s' if threads > 1 else ''}"
                    rows.append(summary)
                    print(format_table(rows[-1:]).splitlines()[-1], flush=True)
                static_threads[batched.system] = threads
            best = max((r for r in rows if r.system in static_threads), key=lambda r: r.output_tok_s)
            torch.set_num_threads(static_threads[best.system])
            for _ in range(args.rounds):
                fleet = asyncio.run(run_load(base_url, model, workload, top)).output_tok_s
                peer_tok_s = run_static_batches(peer, workload, top).output_tok_s
                rounds.append({"fleetlm": fleet, "peer": peer_tok_s})
                print(f"round {len(rounds)}: fleetlm c{top} {fleet:.0f} tok/s, {best.system} {peer_tok_s:.0f} tok/s", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    print()
    print(format_table(rows))
    ours = {r.concurrency: r.output_tok_s for r in rows if r.system == "fleetlm"}
    ratios = {}
    if 1 in ours and top in ours:
        ratios[f"fleetlm c{top} / fleetlm c1"] = ours[top] / ours[1]
    name = f"fleetlm c{top} / best transformers static batch {top}"
    static = [r for r in rows if r.system in static_threads]
    if rounds:
        paired = sorted(r["fleetlm"] / r["peer"] for r in rounds)
        ratios[f"{name}, median of {len(paired)} paired rounds"] = statistics.median(paired)
        ratios[f"{name}, min"], ratios[f"{name}, max"] = paired[0], paired[-1]
    elif static and top in ours:  # minutes apart: read with the machine's drift in mind
        ratios[f"{name}, sweep"] = ours[top] / max(r.output_tok_s for r in static)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(
            {
                "args": vars(args),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
                "rows": [asdict(r) for r in rows],
                "rounds": rounds,
                "ratios": ratios,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
