"""X-Request-Id: a client's id (or a generated one) comes back on every response, SSE streams and
errors included, is the OpenAI `id`, and names the request's log lines; reusing one is harmless."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from tests.server_util import RunningServer

MODEL = "stories260k"
BODY = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    with RunningServer() as s:
        yield s


def test_a_given_id_is_returned_and_is_the_openai_id(server, caplog):
    with caplog.at_level(logging.INFO, logger="fleetlm"):
        r = httpx.post(server.base_url + "/v1/completions", json=BODY, headers={"X-Request-Id": "trace-42.a"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "trace-42.a"
    assert r.json()["id"] == "cmpl-trace-42.a"
    finished = [rec for rec in caplog.records if rec.getMessage() == "request finished"]
    assert [rec.request_id for rec in finished] == ["trace-42.a"]


def test_streams_and_errors_carry_it_too(server, caplog):
    with httpx.stream(
        "POST", server.base_url + "/v1/completions", json={**BODY, "stream": True}, headers={"X-Request-Id": "s-1"}
    ) as r:
        assert r.headers["x-request-id"] == "s-1"
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert events and all('"id": "cmpl-s-1"' in e or '"id":"cmpl-s-1"' in e for e in events)
    with caplog.at_level(logging.INFO, logger="fleetlm"):
        bad = httpx.post(server.base_url + "/v1/completions", json={**BODY, "max_tokens": -1}, headers={"X-Request-Id": "e-1"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "e-1"
    assert any(
        getattr(rec, "request_id", None) == "e-1" and rec.status == 400 and "max_tokens" in rec.error for rec in caplog.records
    )
    missing = httpx.get(server.base_url + "/v1/nothing", headers={"X-Request-Id": "e-2"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "e-2"


def test_missing_or_unusable_ids_are_generated(server):
    ids = set()
    for header in ({}, {"X-Request-Id": ""}, {"X-Request-Id": "has spaces; and <tags>"}, {"X-Request-Id": "x" * 500}):
        r = httpx.post(server.base_url + "/v1/completions", json=BODY, headers=header)
        rid = r.headers["x-request-id"]
        assert r.status_code == 200 and len(rid) == 32 and r.json()["id"] == f"cmpl-{rid}"
        ids.add(rid)
    assert len(ids) == 4


async def test_one_id_reused_by_concurrent_requests_keeps_them_apart(server):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        prompts = ["Once upon a time", "The dog", "Lily and Ben", "One day"]
        solo = [(await client.post("/v1/completions", json={**BODY, "prompt": p})).json()["choices"][0]["text"] for p in prompts]
        together = await asyncio.gather(
            *(client.post("/v1/completions", json={**BODY, "prompt": p}, headers={"X-Request-Id": "same"}) for p in prompts)
        )
    assert [r.json()["choices"][0]["text"] for r in together] == solo
