"""The real `python -m serving` process: SIGTERM drains in-flight work and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.server_util import free_port


def _wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server never became healthy")


def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = open(tmp_path / "server.log", "w")  # noqa: SIM115 - the process writes it until it exits
    env = {**os.environ, "LLM_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--drain-timeout", "60"],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        _wait_healthy(base, proc)
        body = {"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 450, "temperature": 0, "ignore_eos": True, "stream": True}
        events: list[dict] = []
        started = threading.Event()

        def consume() -> None:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[6:]))
                        started.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        health = httpx.get(base + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = httpx.post(base + "/v1/completions", json={"model": "stories260k", "prompt": "hi"}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        reader.join(60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log_file.close()
    # The in-flight stream was not cut: all 450 tokens arrived, then a clean finish.
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    logs = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("{")]
    finished = [entry for entry in logs if entry["msg"] == "request finished" and entry["status"] == 200]
    assert any(entry["completion_tokens"] == 450 for entry in finished)
    assert any(entry["msg"] == "draining" for entry in logs)
