"""What only a real API server and real controllers can show."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from llm_operator.kube import Kube
from llm_operator.spec import parse_spec

GROUP, VERSION, PLURAL = "fleetlm.dev", "v1alpha1", "llmdeployments"


def llmd(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"hf": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}})
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


def create(kube: Kube, namespace: str, body: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    options = {"dry_run": "All"} if dry_run else {}
    response = kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, _preload_content=False, **options
    )
    return json.loads(response.data)


def eventually(check: Callable[[], Any], timeout: float = 120, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)
    return value


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"model": {"hf": {"repo": "a/b"}, "pvc": {"claimName": "w"}}}, "exactly one source"),
        ({"autoscaling": {"minReplicas": 4, "maxReplicas": 2}}, "must not exceed"),
        ({"engine": {"dtype": "int3"}}, "Unsupported value"),
    ],
)
def test_api_server_enforces_the_schema_and_cel_rules(
    kube: Kube, namespace: str, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as caught:
        create(kube, namespace, llmd("bad", **spec), dry_run=True)
    assert caught.value.status == 422 and message in caught.value.body


def test_api_server_defaults_match_the_operator(kube: Kube, namespace: str) -> None:
    stored = create(kube, namespace, llmd("defaults"), dry_run=True)
    ours = parse_spec(stored["spec"]).model_dump(by_alias=True, exclude_none=True)
    for key, value in stored["spec"].items():
        assert ours[key] == value or (isinstance(value, dict) and value.items() <= ours[key].items()), key


@pytest.mark.usefixtures("operator")
def test_operator_builds_owned_children_that_the_garbage_collector_removes(
    kube: Kube, namespace: str
) -> None:
    create(kube, namespace, llmd("demo", resources={"cpu": "500m", "memory": "1Gi"}, cache={"size": "2Gi"}))
    deployment = eventually(
        lambda: kube.get("apps/v1", "Deployment", namespace, "demo"), what="the Deployment"
    )
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "LLMDeployment"
    for api_version, kind, name in [
        ("v1", "Service", "demo"),
        ("v1", "PersistentVolumeClaim", "demo-model-cache"),
        ("policy/v1", "PodDisruptionBudget", "demo"),
    ]:
        assert kube.get(api_version, kind, namespace, name) is not None

    # Server-side apply is idempotent: a resync that changes nothing leaves the operator's field set untouched.
    def applied_at() -> str:
        fields = kube.get("apps/v1", "Deployment", namespace, "demo")["metadata"]["managedFields"]
        return next(
            f["time"] for f in fields if f["manager"] == "fleetlm-operator" and f["operation"] == "Apply"
        )

    before = applied_at()
    time.sleep(12)  # more than one resync period
    assert applied_at() == before

    def status() -> dict[str, Any]:
        return kube.get(f"{GROUP}/{VERSION}", "LLMDeployment", namespace, "demo").get("status", {})

    eventually(lambda: status().get("selector"), what="a status with the scale selector")
    if os.environ.get("FLEETLM_E2E_SERVE") == "1":  # the serving image is loaded into the cluster
        eventually(
            lambda: any(
                c["type"] == "Ready" and c["status"] == "True" for c in status().get("conditions", [])
            ),
            timeout=900,
            what="Ready",
        )

    kube.custom.delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "demo", propagation_policy="Foreground", _preload_content=False
    )
    eventually(
        lambda: kube.get("apps/v1", "Deployment", namespace, "demo") is None, what="garbage collection"
    )


@pytest.mark.usefixtures("operator")
def test_missing_image_surfaces_as_image_pull_failure(kube: Kube, namespace: str) -> None:
    create(
        kube,
        namespace,
        llmd("nopull", image="ghcr.io/fleetlm/does-not-exist:0", model={"pvc": {"claimName": "weights"}}),
    )
    kube.core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "weights"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
        _preload_content=False,
    )

    def degraded() -> dict[str, Any] | None:
        body = kube.get(f"{GROUP}/{VERSION}", "LLMDeployment", namespace, "nopull")
        conds = {c["type"]: c for c in body.get("status", {}).get("conditions", [])}
        cond = conds.get("Degraded", {})
        return cond if cond.get("reason") in ("ImagePullFailed", "Unschedulable") else None

    assert eventually(degraded, timeout=300, what="ImagePullFailed")
