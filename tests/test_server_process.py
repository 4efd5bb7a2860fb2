"""The real `python -m serving` process: SIGTERM drains in-flight work and exits 0; a bad model fails before it binds."""

from __future__ import annotations

import calendar
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server_util import free_port, wait_healthy


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.02)


def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = open(tmp_path / "server.log", "w")  # noqa: SIM115 - the process writes it until it exits
    env = {**os.environ, "LLM_NUM_THREADS": "1"}
    # One batch slot: six accepted requests run one after another, so there is work in flight
    # well after SIGTERM however fast the machine is.
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--drain-timeout", "120"]
    proc = subprocess.Popen([*cmd, "--max-batch-size", "1"], stdout=log_file, stderr=subprocess.STDOUT, env=env)
    streams = 6
    try:
        wait_healthy(base, proc)
        body = {"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 450, "temperature": 0, "ignore_eos": True, "stream": True}
        finishes: list[str | None] = []
        started = threading.Event()

        def consume() -> None:
            reason = None
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        started.set()
                        reason = json.loads(line[6:])["choices"][0]["finish_reason"] or reason
            finishes.append(reason)

        readers = [threading.Thread(target=consume) for _ in range(streams)]
        for reader in readers:
            reader.start()
        assert started.wait(30)

        def active_requests() -> float:
            text = httpx.get(base + "/metrics", timeout=5).text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("llm_active_requests{"))

        # Every request in flight on the server (however busy this machine is), then SIGTERM.
        _wait_for(lambda: active_requests() == streams, "all streams in flight")
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: httpx.get(base + "/health", timeout=5).status_code == 503, "draining")
        health = httpx.get(base + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = httpx.post(base + "/v1/completions", json={"model": "stories260k", "prompt": "hi"}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        for reader in readers:
            reader.join(120)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log_file.close()
    # No in-flight stream was cut: every one got all 450 tokens and a clean finish.
    assert finishes == ["length"] * streams
    logs = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines() if line.startswith("{")]
    finished = [entry for entry in logs if entry["msg"] == "request finished" and entry["status"] == 200]
    assert sum(entry["completion_tokens"] == 450 for entry in finished) == streams
    assert any(entry["msg"] == "draining" for entry in logs)


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({}, "no config.json and no GGUF file"),
        ({"config.json": "{not json"}, "not a valid JSON file"),
        ({"config.json": '{"model_type": "nosuchmodel"}'}, "nosuchmodel"),
    ],
    ids=["empty directory", "config.json not JSON", "unknown architecture"],
)
def test_a_bad_model_source_fails_before_binding_with_one_line(tmp_path, files, needle):
    model = tmp_path / "model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    port = free_port()
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--model-path", str(model)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in lines[0], lines
    assert "listening" not in run.stdout + run.stderr


def test_drain_timeout_ends_streams_with_an_error_event_not_a_cut(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--drain-timeout", "0.2"]
    env = {**os.environ, "LLM_NUM_THREADS": "1"}
    with open(tmp_path / "server.log", "w") as log_file:
        # One batch slot and long outputs: the streams cannot finish within the drain timeout.
        proc = subprocess.Popen([*cmd, "--max-batch-size", "1"], stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(base, proc)
            body = {"model": "stories260k", "prompt": "Once", "max_tokens": 450, "ignore_eos": True, "stream": True}
            ends: list[list[str]] = []

            def consume() -> None:
                events: list[str] = []
                with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
                    for line in r.iter_lines():  # a cut body would raise here
                        if line.startswith("data: "):
                            events.append(line[6:])
                ends.append(events[-2:])

            readers = [threading.Thread(target=consume) for _ in range(3)]
            for reader in readers:
                reader.start()
            _wait_for(lambda: "llm_active_requests{" in (t := httpx.get(base + "/metrics").text)
                      and any(line.startswith("llm_active_requests{") and line.endswith(" 3.0") for line in t.splitlines()),
                      "three streams in flight")
            proc.send_signal(signal.SIGTERM)
            for reader in readers:
                reader.join(60)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert len(ends) == 3
    cut = 0
    for last, done in ends:
        assert done == "[DONE]"  # every body ends properly
        event = json.loads(last)
        if "error" in event:
            assert event["error"]["code"] == "drain_timeout" and "--drain-timeout" in event["error"]["message"]
            cut += 1
        else:
            assert event["choices"][0]["finish_reason"] == "length"  # one finished within the timeout
    assert cut >= 1  # one batch slot: 3 x 450 tokens one after another outlast a 0.2 s drain


def test_a_client_that_stopped_reading_does_not_hold_the_shutdown(tmp_path):
    """SIGTERM while a client keeps its connection open without reading a long stream: its unsent bytes
    can never go, and closing that connection gracefully would wait for them forever (the pod stuck in
    Terminating until the kubelet kills it). The server drops it after the drain and exits 0."""
    import socket

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--drain-timeout", "1"]
    with open(tmp_path / "server.log", "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "LLM_NUM_THREADS": "1"})
        stalled = socket.socket()
        try:
            wait_healthy(base, proc)
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            stalled.connect(("127.0.0.1", port))
            # Some 5 MB of events (16 choices x 500 tokens x 20 alternatives each): more than the socket buffers hold.
            body = json.dumps({"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True,
                               "stream": True, "n": 16, "logprobs": 20}).encode()  # fmt: skip
            head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            stalled.sendall(head.encode() + body)
            _wait_for(lambda: _unread_bytes(stalled) >= 2048, "the client's receive buffer filled")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0  # drain 1 s, 5 s for streams to flush, then its connection goes
        finally:
            stalled.close()
            if proc.poll() is None:
                proc.kill()
    assert "closing connections whose clients stopped reading" in (tmp_path / "server.log").read_text()


def _unread_bytes(sock) -> int:
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def _engine_pids(server_pid: int) -> list[int]:
    """The server's children running run_engine (multiprocessing's spawn)."""
    children = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(server_pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in children.splitlines() if "multiprocessing.spawn" in line]


def _engine_pid(server_pid: int) -> int:
    """The engine process: the server's one child running run_engine."""
    pids = _engine_pids(server_pid)
    assert len(pids) == 1, pids
    return pids[0]


def test_an_engine_that_dies_takes_the_server_down_non_zero(tmp_path):
    """The engine process killed (the OOM killer's way): in-flight requests get an error, and the
    server exits 1 so that Kubernetes or a service manager restarts it, rather than answer 503 forever."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--num-threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(base, proc)
        os.kill(_engine_pid(proc.pid), signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        assert "the engine process exited unexpectedly" in proc.stderr.read()
    finally:
        proc.kill()


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state first)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _started_after_boot(pid: int) -> float:
    """When the process started, in seconds since boot (the kernel's clock ticks: exact between processes)."""
    return int(_stat(pid)[19]) / os.sysconf("SC_CLK_TCK")


def test_the_engine_starts_loading_before_the_api_has_imported_its_modules(tmp_path):
    """The two processes import torch and the rest at once (the engine then loads the model), rather than the
    engine starting only once the API is listening: about half the time to ready on two cores."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = open(tmp_path / "server.log", "w")  # noqa: SIM115 - the process writes it until it exits
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--num-threads", "1"]
    launched = time.time()
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_healthy(base, proc)
        engine_after = _started_after_boot(_engine_pid(proc.pid)) - _started_after_boot(proc.pid)
        logs = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
        (listening,) = [entry for entry in logs if entry["msg"] == "listening"]
        stamp = time.strptime(listening["ts"][:19], "%Y-%m-%dT%H:%M:%S")
        listening_after = calendar.timegm(stamp) + float(listening["ts"][19:23]) - launched
        # Once its modules are imported the API listens; the engine had started well before that.
        assert engine_after < listening_after / 2, (engine_after, listening_after)
    finally:
        proc.kill()
        proc.wait()


def _gone(pid: int) -> bool:
    try:
        return _stat(pid)[0] in ("Z", "X")  # exited, not yet reaped
    except FileNotFoundError:
        return True


def test_an_engine_still_loading_dies_with_the_api_process(fake_hub, tmp_path):
    """The API process killed outright (SIGKILL: the OOM killer, `kill -9`) while its engine is still loading
    the model, here stuck in a download: the engine goes with it at once, rather than go on loading, holding
    its memory, until it finds no one to report to."""
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path / "src", "llama")
    fake_hub.add_repo("acme/slow", {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()})
    stall = fake_hub.stall("model.safetensors", after_bytes=64)
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(free_port()), "--num-threads", "1",
           "--model-path", "acme/slow", "--download-dir", str(tmp_path / "cache")]  # fmt: skip
    env = {**os.environ, "HF_HUB_DOWNLOAD_TIMEOUT": "300"}  # the stalled download would wait this long
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        assert stall.reached.wait(120), "the engine never reached the model's weights"
        engine = _engine_pid(proc.pid)
        proc.kill()
        proc.wait()
        _wait_for(lambda: _gone(engine), "the engine process to exit", timeout=60)
    finally:
        proc.kill()
        stall.release()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_starting_stops_at_once_without_a_traceback(sig, code):
    """Ctrl-C (to the whole process group, as a terminal sends it) or SIGTERM while the API process is still
    importing and its engine loading: exit at once, engine and all, with no traceback from either. It
    raised KeyboardInterrupt into whatever import was running, which printed its traceback, could leave a
    library half-imported that failed again at exit, or leave the import lock held (a hang at exit)."""
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(free_port()), "--num-threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(lambda: _engine_pids(proc.pid), "the engine process to start")  # the API's imports take seconds more
        engine = _engine_pid(proc.pid)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == code, out
        assert "listening" not in out and "Traceback" not in out and "KeyboardInterrupt" not in out, out
        _wait_for(lambda: _gone(engine), "the engine process to exit", timeout=30)
    finally:
        proc.kill()


def test_a_port_in_use_is_one_error_and_exit_one():
    """Bound by another socket: the server says so and exits (it hung, its engine still loading)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port), "--num-threads", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_a_burst_of_connections_and_an_idle_one_are_all_answered():
    """Clients the server has not yet accepted wait in the kernel's accept queue: a burst of 300 while the
    server is busy (stopped here) must all be held there and answered, not dropped (hypercorn's backlog
    of 100 dropped the rest, whose requests then read a reset). And a connection that sat idle past
    hypercorn's 5 s default (a load balancer's pooled one, or a request not read yet on a busy server)
    is still served: the server keeps connections 75 s."""
    import selectors
    import socket

    port = free_port()
    cmd = [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "LLM_NUM_THREADS": "1"})
    sockets: list[socket.socket] = []
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        idle = socket.create_connection(("127.0.0.1", port))
        opened = time.monotonic()
        proc.send_signal(signal.SIGSTOP)
        selector = selectors.DefaultSelector()
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            selector.register(s, selectors.EVENT_WRITE)
            sockets.append(s)
        connected = 0
        deadline = time.monotonic() + 3  # a dropped SYN is retried after 1 s: past it, those are refused
        while connected < len(sockets) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                selector.unregister(key.fileobj)
                connected += key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        assert connected == len(sockets)
        for s in sockets:
            s.setblocking(True)
            s.settimeout(60)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        proc.send_signal(signal.SIGCONT)
        assert all(s.recv(64).startswith(b"HTTP/1.1 200") for s in sockets)

        time.sleep(max(0.0, opened + 6 - time.monotonic()))  # idle past hypercorn's default keep-alive
        idle.settimeout(60)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(64).startswith(b"HTTP/1.1 200")
        idle.close()
    finally:
        for s in sockets:
            s.close()
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
