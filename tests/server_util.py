"""Run the real FleetLM server (hypercorn + Quart + engine) on a free port, in a thread."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import threading
import time

import httpx

from serving.config import ServeConfig
from serving.server import serve

# A minimal template so the demo model (which ships none) can serve chat in tests.
TEST_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll a `python -m serving` subprocess's /health until 200; fail with its output if it exits."""
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


class RunningServer:
    def __init__(self, **settings):
        settings.setdefault("port", free_port())
        settings.setdefault("host", "127.0.0.1")
        settings.setdefault("device", "cpu")
        settings.setdefault("num_threads", 1)
        # serve() runs inside the test process here: pinning it would pin pytest and every later test.
        settings.setdefault("cpu_affinity", "none")
        self.config = ServeConfig(**settings)
        self.base_url = f"http://127.0.0.1:{self.config.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.exit_code: int | None = None

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self.exit_code = await serve(self.config, self._stop, handle_signals=False)

        asyncio.run(main())

    def __enter__(self) -> RunningServer:
        self._thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if not self._thread.is_alive():
                raise RuntimeError(f"server exited early with code {self.exit_code}")
            time.sleep(0.05)
        raise TimeoutError("server did not become healthy")

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)

    def metrics(self) -> dict[str, float]:
        """Scrape /metrics into {'name{labels}': value}."""
        text = httpx.get(self.base_url + "/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def metric(self, name: str) -> float:
        return sum(v for k, v in self.metrics().items() if re.fullmatch(rf"{name}(\{{.*\}})?", k))
