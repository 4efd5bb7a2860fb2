"""OpenAI-compatible load generator: streams completions at a given concurrency against any endpoint
(FleetLM, vLLM, ...) and reports TTFT, TPOT, ITL (p50/p99) and output tokens per second.

    python -m bench.loadgen --base-url http://127.0.0.1:8080/v1 --model stories260k \\
        --concurrency 1,16 --num-requests 64 --input-len 16-64 --output-len 16-256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx
import openai

from bench.workload import Request, make_workload, parse_length


@dataclass(slots=True)
class RequestResult:
    prompt_tokens: int
    output_tokens: int
    ttft: float | None  # None where the system does not stream (the transformers peer)
    latency: float
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass(slots=True)
class RunSummary:
    system: str
    concurrency: int
    requests: int
    duration_s: float
    output_tokens: int
    output_tok_s: float
    latency_s: dict[str, float | None]
    ttft_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]

    @classmethod
    def from_results(cls, system: str, concurrency: int, results: list[RequestResult], duration: float) -> RunSummary:
        def stats(values: list[float], scale: float = 1000) -> dict[str, float | None]:
            ms = [v * scale for v in values]
            return {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "mean": statistics.fmean(ms) if ms else None}

        tokens = sum(r.output_tokens for r in results)
        return cls(
            system=system,
            concurrency=concurrency,
            requests=len(results),
            duration_s=duration,
            output_tokens=tokens,
            output_tok_s=tokens / duration,
            latency_s=stats([r.latency for r in results], scale=1),
            ttft_ms=stats([r.ttft for r in results if r.ttft is not None]),
            tpot_ms=stats([t for r in results if (t := r.tpot) is not None]),
            itl_ms=stats([i for r in results for i in r.itl]),
        )


async def _one(client: openai.AsyncOpenAI, model: str, req: Request, ignore_eos: bool) -> RequestResult:
    """One streamed request. The openai client sends it; its SSE lines are read raw
    (with_streaming_response) so the client's per-chunk object building, which on a small CPU
    costs as much as the server's own work per token, stays out of the measurement."""
    start = time.perf_counter()
    first: float | None = None
    last = start
    itl: list[float] = []
    output_tokens = 0
    async with client.completions.with_streaming_response.create(
        model=model,
        prompt=req.prompt_ids,
        max_tokens=req.max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": ignore_eos},
    ) as response:
        async for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
            if chunk.get("usage"):
                output_tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return RequestResult(len(req.prompt_ids), output_tokens, (first or end) - start, end - start, itl)


async def run_load(
    base_url: str,
    model: str | list[str],
    workload: list[Request],
    concurrency: int,
    system: str = "fleetlm",
    ignore_eos: bool = True,
    keepalive: bool = True,
) -> RunSummary:
    """keepalive=False: a new connection per request (llama.cpp's server closes a kept-alive connection
    after a few requests, and a request sent on it just then fails without a response). Several models:
    the requests take them in turn (LoRA adapters of one server, say)."""
    models = [model] if isinstance(model, str) else model
    idle = concurrency + 4 if keepalive else 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=idle)
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", http_client=http, max_retries=0)
        semaphore = asyncio.Semaphore(concurrency)

        async def bounded(req: Request, name: str) -> RequestResult:
            async with semaphore:
                return await _one(client, name, req, ignore_eos)

        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(r, models[i % len(models)]) for i, r in enumerate(workload)))
        return RunSummary.from_results(system, concurrency, list(results), time.perf_counter() - started)


def format_table(rows: list[RunSummary]) -> str:
    def fmt(v: float | None, digits: int = 1) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    lines = [
        "| system | concurrency | requests | output tok/s | latency p50 / p99 s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.system} | {r.concurrency} | {r.requests} | {r.output_tok_s:.0f} | "
            f"{fmt(r.latency_s['p50'], 2)} / {fmt(r.latency_s['p99'], 2)} | "
            f"{fmt(r.ttft_ms['p50'])} / {fmt(r.ttft_ms['p99'])} | {fmt(r.tpot_ms['p50'])} / {fmt(r.tpot_ms['p99'])} | "
            f"{fmt(r.itl_ms['p50'])} / {fmt(r.itl_ms['p99'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="OpenAI base URL, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--vocab-size", type=int, default=512, help="prompt token ids are drawn below this")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated sweep")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", default="16-64", help="N or LOW-HIGH tokens")
    parser.add_argument("--output-len", default="16-256", help="N or LOW-HIGH tokens (ignore_eos keeps them exact)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    workload = make_workload(args.num_requests, parse_length(args.input_len), parse_length(args.output_len), args.vocab_size, args.seed)
    rows = [asyncio.run(run_load(args.base_url, args.model, workload, int(c))) for c in args.concurrency.split(",")]
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
