"""Backpressure (429 + Retry-After) and API-key auth, each on a server configured for it."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server_util import RunningServer

MODEL = "stories260k"
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 500, "temperature": 0, "ignore_eos": True}


async def test_a_full_queue_answers_429_with_retry_after():
    # One batch slot and one queue place; four requests at once (each takes far longer than their
    # arrival spread): the first runs, the second waits, the rest have nowhere to go.
    with RunningServer(max_batch_size=1, queue_capacity=1) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            replies = await asyncio.gather(*(http.post("/v1/completions", json=LONG) for _ in range(4)))
        statuses = sorted(r.status_code for r in replies)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
        for r in replies:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
            else:
                assert r.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
        assert server.metric("llm_requests_failed_total") == statuses.count(429)
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        assert client.completions.create(model=MODEL, prompt="Once", max_tokens=3).choices


async def test_a_stream_is_refused_before_it_starts_never_inside_it():
    """A burst of streams (lists of prompts, whose sequences go to the engine together) against a small
    queue: each is a clean 429 before any byte of the body, or a stream that runs to [DONE]. Never a
    200 that then says queue_full: the sequences of the requests the queue check lets in are sent
    before another request is checked."""
    with RunningServer(max_batch_size=16, queue_capacity=40) as server:
        body = {**LONG, "prompt": ["Once upon a time", "The little dog"], "max_tokens": 20, "stream": True}

        async def stream(http: httpx.AsyncClient) -> tuple[int, str]:
            async with http.stream("POST", "/v1/completions", json=body) as reply:
                return reply.status_code, (await reply.aread()).decode()

        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            replies = await asyncio.gather(*(stream(http) for _ in range(60)))
        statuses = [status for status, _ in replies]
        assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
        for status, text in replies:
            if status == 200:
                assert '"error"' not in text and text.endswith("data: [DONE]\n\n"), text[-300:]
            else:
                assert status == 429 and '"queue_full"' in text


def test_api_key_guards_the_api_but_not_probes():
    with RunningServer(api_key="s3cret") as server:
        ok = openai.OpenAI(base_url=server.base_url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == MODEL
        wrong = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert err.value.code == "invalid_api_key"
        # The scheme is case-insensitive (RFC 7235), the key is not.
        for header, status in (("bearer s3cret", 200), ("BEARER s3cret", 200), ("Bearer S3CRET", 401), ("s3cret", 401), ("Basic s3cret", 401)):
            assert httpx.get(server.base_url + "/v1/models", headers={"Authorization": header}).status_code == status, header
        assert httpx.post(server.base_url + "/tokenize", json={"prompt": "x"}).status_code == 401
        assert httpx.get(server.base_url + "/health").status_code == 200
        assert httpx.get(server.base_url + "/metrics").status_code == 200


def test_a_non_ascii_api_key_matches_its_utf8_bytes():
    # A header's bytes reach the app decoded as Latin-1: the key's UTF-8 bytes are what a client sends.
    with RunningServer(api_key="clé-☃") as server:
        for key, status in (("clé-☃".encode(), 200), ("clé-☃".encode("latin-1", errors="replace"), 401), (b"cle-x", 401)):
            r = httpx.get(server.base_url + "/v1/models", headers={"Authorization": b"Bearer " + key})
            assert r.status_code == status, key


async def test_a_small_kv_cache_makes_requests_wait_not_fail():
    # Room for about two 300-token sequences; sixteen arrive at once. They queue, some are
    # preempted and recomputed, and every one still returns exactly what it returns alone.
    with RunningServer(kv_cache_tokens=640, max_batch_size=16) as server:
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        prompts = [f"Once upon a time {word}" for word in ("Lily", "Ben", "a dog", "the sun")] * 4

        async def run(prompt: str) -> str:
            out = await client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=300, temperature=0, extra_body={"ignore_eos": True}
            )
            assert out.usage.completion_tokens == 300
            return out.choices[0].text

        alone = {p: await run(p) for p in set(prompts)}
        together = await asyncio.gather(*(run(p) for p in prompts))
        assert together == [alone[p] for p in prompts]
        assert server.metric("llm_preemptions_total") > 0
        assert server.metric("llm_kv_cache_usage_ratio") == 0
