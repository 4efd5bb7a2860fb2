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

# The in-memory API can drop the watch event that follows kopf's finalizer patch (the session fixture's
# operator resyncs every 2 s for the same reason): a quick resync reconciles regardless.
QUICK_RESYNC = ["--resync-seconds", "1"]


def _start(apiserver: BackgroundApiServer, tmp_path: Path, flags: list[str]) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": str(write_kubeconfig(apiserver, tmp_path / "config"))}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.Popen(
        [sys.executable, "-m", "llm_operator", *flags],
        env=env,
        cwd=tmp_path,  # not the repository: operator/ there would shadow the stdlib module
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(process: subprocess.Popen) -> list[dict]:
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the operator did not stop on SIGTERM")
    assert process.returncode == 0, stderr[-2000:]
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def _reconciled(kube, name: str) -> bool:
    """The operator reconciled the object: its status names the generation (the model claim is missing,
    so the reconciliation ends Degraded, which is as good a sign of life as any)."""
    body = kube.get("fleetlm.dev/v1alpha1", "LLMDeployment", "ml", name)
    return bool(body and body.get("status", {}).get("observedGeneration") == 1)


def _reconcile_one(tmp_path: Path, name: str, flags: list[str]) -> list[dict]:
    """Run the operator process with `flags` until it has reconciled one LLMDeployment; its log lines."""
    from kubernetes import config as kubeconfig
    from llm_operator.kube import Kube

    with BackgroundApiServer() as apiserver:
        process = _start(apiserver, tmp_path, [*flags, "--health-port", "0", "--metrics-port", "0", *QUICK_RESYNC])
        kube = Kube(kubeconfig.new_client_from_config(config_file=str(tmp_path / "config")))
        body = {
            "apiVersion": "fleetlm.dev/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": name, "namespace": "ml"},
            "spec": {"model": {"pvc": {"claimName": "weights"}}},
        }
        kube.custom.create_namespaced_custom_object("fleetlm.dev", "v1alpha1", "ml", "llmdeployments", body)
        try:
            eventually(lambda: _reconciled(kube, name) or process.poll() is not None, timeout=60, what="a status")
            assert _reconciled(kube, name)
        finally:
            lines = _stop(process)
    return lines


def test_without_kopfs_peering_it_says_so_and_runs_standalone(tmp_path: Path) -> None:
    """Run from a checkout against a cluster without kopf's peering CRD (the test API serves none), and
    without --standalone: kopf alone would wait for peering forever, reconciling nothing."""
    lines = _reconcile_one(tmp_path, "lone", [])
    warning = next(line for line in lines if line["msg"].startswith("peering is unavailable"))
    assert warning["level"] == "warning"
    assert "kopf.dev/v1 clusterkopfpeerings" in warning["msg"] and "running standalone" in warning["msg"]
    assert "--standalone" in warning["msg"]


def test_the_settings_are_logged_once_not_on_every_line(tmp_path: Path) -> None:
    lines = _reconcile_one(tmp_path, "quiet", ["--standalone"])
    per_object = [line for line in lines if "k8s_ref" in line]
    assert per_object, "kopf logged nothing about the object"
    assert all("settings" not in line and len(json.dumps(line)) < 1500 for line in lines)
    (start,) = [line for line in lines if line["msg"] == "operator starting"]
    assert start["config"]["namespaces"] == [] and start["config"]["standalone"] is True


def test_process_logs_json_serves_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    health, metrics = free_port(), free_port()
    with BackgroundApiServer() as apiserver:
        flags = ["--standalone", "--namespaces", "ml", "--health-port", str(health), "--metrics-port", str(metrics)]
        process = _start(apiserver, tmp_path, flags)
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
