"""`python -m llm_operator` as a process: JSON logs, the health and metrics endpoints, and a clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.operator.apiserver import BackgroundApiServer
from tests.operator.conftest import eventually, free_port, write_kubeconfig


def test_process_logs_json_serves_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    health, metrics = free_port(), free_port()
    with BackgroundApiServer() as apiserver:
        env = {**os.environ, "KUBECONFIG": str(write_kubeconfig(apiserver, tmp_path / "config"))}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        flags = [
            "--standalone",
            "--namespaces",
            "ml",
            "--health-port",
            str(health),
            "--metrics-port",
            str(metrics),
        ]
        process = subprocess.Popen(
            [sys.executable, "-m", "llm_operator", *flags],
            env=env,
            cwd=tmp_path,  # not the repository: operator/ there would shadow the stdlib module
            stderr=subprocess.PIPE,
            text=True,
        )
        try:

            def healthy() -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=1) as response:
                        return response.status == 200
                except OSError:
                    return process.poll() is not None  # stop polling if it died

            eventually(healthy, timeout=30, what="/healthz")
            assert process.poll() is None
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
                assert b"fleetlm_operator_reconcile_duration_seconds" in response.read()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                pytest.fail("the operator did not stop on SIGTERM")
    assert process.returncode == 0
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert lines and all({"ts", "level", "logger", "msg"} <= line.keys() for line in lines)
    assert any("kopf" in line["logger"] for line in lines)
