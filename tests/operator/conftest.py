"""An in-memory Kubernetes API (kmock, tests/operator/apiserver.py) and the real operator running against it."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from llm_operator.__main__ import run
from llm_operator.config import OperatorConfig, parse_args
from llm_operator.kube import Kube

from tests.operator.apiserver import BackgroundApiServer

IMAGE = "ghcr.io/fleetlm/fleetlm:test"
RESYNC_SECONDS = 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The tests have no Hub: a port nothing listens on refuses at once, so revisions stay unpinned
# (RevisionPinned False, ResolveFailed) unless a test names a fake Hub in model.hf.endpoint.
NO_HUB = f"http://127.0.0.1:{_closed_port()}"


@pytest.fixture(scope="session")
def apiserver() -> Iterator[BackgroundApiServer]:
    with BackgroundApiServer() as server:
        yield server


@pytest.fixture(scope="session")
def kubeconfig(apiserver: BackgroundApiServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_kubeconfig(apiserver, tmp_path_factory.mktemp("kube") / "config")


def write_kubeconfig(apiserver: BackgroundApiServer, path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": apiserver.url}}],
                "users": [{"name": "test", "user": {"token": "test-token"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
                "current-context": "kmock",
            }
        )
    )
    return path


@pytest.fixture(scope="session")
def kube(kubeconfig: Path) -> Kube:
    """The tests' own client: a separate configuration from the operator's."""
    return client(kubeconfig)


def client(kubeconfig: Path) -> Kube:
    return Kube(kubernetes.config.new_client_from_config(config_file=str(kubeconfig)))


def private_api() -> tuple:
    """Module-scoped `apiserver` and `kube` fixtures for a test module that needs an API of its own, out of
    reach of the session's running operator: `apiserver, kube = private_api()` at the module's top."""

    @pytest.fixture(scope="module")
    def apiserver() -> Iterator[BackgroundApiServer]:
        with BackgroundApiServer() as server:
            yield server

    @pytest.fixture(scope="module")
    def kube(apiserver: BackgroundApiServer, tmp_path_factory: pytest.TempPathFactory) -> Kube:
        return client(write_kubeconfig(apiserver, tmp_path_factory.mktemp("kube") / "config"))

    return apiserver, kube


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def operator(kubeconfig: Path, kube: Kube) -> Iterator[OperatorConfig]:
    """The operator as `fleetlm-operator` runs it (kopf, handlers, metrics and health servers), in a thread."""
    kube.core.create_node(
        {"metadata": {"name": "gpu-node"}, "status": {"capacity": {"cpu": "64", "nvidia.com/gpu": "8"}}}
    )
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    flags = ["--standalone", "--resync-seconds", str(RESYNC_SECONDS), "--default-image", IMAGE, "--default-cpu-image", IMAGE, "--hf-endpoint", NO_HUB, "--revision-recheck-seconds", "1"]
    flags += ["--health-port", str(free_port()), "--metrics-port", str(free_port())]
    config = parse_args(flags, env={})
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=run, args=(config,), kwargs={"stop_flag": stop, "ready_flag": ready}, daemon=True
    )
    thread.start()
    assert ready.wait(30), "the operator did not start"
    yield config
    stop.set()
    thread.join(30)
    assert not thread.is_alive(), "the operator did not stop"
    if previous is None:
        os.environ.pop("KUBECONFIG", None)
    else:
        os.environ["KUBECONFIG"] = previous


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    """A namespace of the test's own; its LLMDeployments are deleted afterwards, so that their periodic
    resyncs do not pile up for the tests after it."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    yield name
    for body in kube.list("fleetlm.dev/v1alpha1", "LLMDeployment", name):
        kube.delete("fleetlm.dev/v1alpha1", "LLMDeployment", name, body["metadata"]["name"])


def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll until `check()` returns something truthy (and return it), or fail with its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}: last saw {value!r}")
        time.sleep(0.05)
