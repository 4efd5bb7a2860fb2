"""End-to-end tests against a real cluster: the CRD, the API server's validation and defaulting, and the
operator (run in-process, as in tests/operator) creating real children that real controllers act on.

Run with `python -m pytest e2e` after e2e/kind.sh (or against any kind/k3d cluster). Skipped unless the
current kubeconfig context reaches a cluster whose context name starts with kind- or k3d- (so a production
context is never touched by accident); FLEETLM_E2E=1 lifts the name check.

No test needs the internet: the operator's children are checked as objects and the pods' states as the
kubelet reports them (an image that cannot be pulled is one of them). On a cluster that can only reach a
Hub mirror, FLEETLM_E2E_HF_ENDPOINT is passed to the operator as --hf-endpoint, and FLEETLM_E2E_IMAGE names
the serving image in the cluster's own registry.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator

import kubernetes
import pytest
from llm_operator.__main__ import run
from llm_operator.config import parse_args
from llm_operator.kube import Kube


def _cluster() -> tuple[Kube | None, str]:
    try:
        _, context = kubernetes.config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG"))
        api = kubernetes.config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
        kubernetes.client.VersionApi(api).get_code(_request_timeout=5)
    except Exception as error:  # any failure to reach a cluster means: skip
        return None, f"no cluster reachable ({error.__class__.__name__})"
    name = context["name"]
    if not name.startswith(("kind-", "k3d-")) and os.environ.get("FLEETLM_E2E") != "1":
        return None, f"context {name!r} is not a kind/k3d cluster (set FLEETLM_E2E=1 to use it anyway)"
    return Kube(api), name


@pytest.fixture(scope="session")
def kube() -> Kube:
    client, why = _cluster()
    if client is None:
        pytest.skip(why)
    return client


@pytest.fixture(scope="session")
def crd(kube: Kube) -> None:
    from tests.operator.crd_schema import crd as load

    kube.custom.patch_cluster_custom_object(
        "apiextensions.k8s.io", "v1", "customresourcedefinitions", "llmdeployments.fleetlm.dev", load(),
        field_manager="fleetlm-e2e", force=True, _content_type="application/apply-patch+yaml", _preload_content=False,
    )  # fmt: skip


@pytest.fixture
def namespace(kube: Kube, crd: None) -> Iterator[str]:
    name = f"fleetlm-e2e-{uuid.uuid4().hex[:6]}"
    kube.core.create_namespace({"metadata": {"name": name}}, _preload_content=False)
    yield name
    kube.core.delete_namespace(name, _preload_content=False)


@pytest.fixture
def operator(kube: Kube, namespace: str) -> Iterator[None]:
    image = os.environ.get("FLEETLM_E2E_IMAGE", "ghcr.io/fleetlm/fleetlm:0.1.0")
    config = parse_args(
        ["--standalone", "--namespaces", namespace, "--health-port", "0", "--metrics-port", "0", "--resync-seconds", "10",
         "--default-image", image, "--default-cpu-image", os.environ.get("FLEETLM_E2E_CPU_IMAGE", image),
         "--no-require-gpu-nodes",
         *(["--hf-endpoint", os.environ["FLEETLM_E2E_HF_ENDPOINT"]] if os.environ.get("FLEETLM_E2E_HF_ENDPOINT") else [])],
        env={},
    )  # fmt: skip
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=run, args=(config,), kwargs={"stop_flag": stop, "ready_flag": ready}, daemon=True
    )
    thread.start()
    assert ready.wait(60)
    yield
    stop.set()
    thread.join(60)
