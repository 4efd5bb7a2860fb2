"""The real operator (kopf, handlers, kubernetes client) against the in-memory API: the reconciliation loop.

The tests play the cluster's other controllers themselves: they write Deployment status as the deployment
controller would, and create pods with the states a kubelet reports.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from typing import Any

import pytest
from llm_operator.config import OperatorConfig
from llm_operator.kube import Kube

from tests.operator.apiserver import BackgroundApiServer
from tests.operator.conftest import RESYNC_SECONDS, eventually

pytestmark = pytest.mark.usefixtures("operator")

GROUP, VERSION, PLURAL = "fleetlm.dev", "v1alpha1", "llmdeployments"


def create(kube: Kube, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"hf": {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"}})
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    response = kube.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, _preload_content=False
    )
    return json.loads(response.data)


def patch_spec(kube: Kube, namespace: str, name: str, spec: dict[str, Any]) -> None:
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}, _content_type="application/merge-patch+json"
    )


def llmd(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    body = kube.get(f"{GROUP}/{VERSION}", "LLMDeployment", namespace, name)
    assert body is not None
    return body


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def wait_condition(
    kube: Kube, namespace: str, name: str, kind: str, status: str, reason: str | None = None
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        cond = condition(llmd(kube, namespace, name), kind)
        return cond if cond.get("status") == status and reason in (None, cond.get("reason")) else None

    return eventually(check, what=f"{kind}={status} ({reason})")


def events(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    return [e for e in kube.list("v1", "Event", namespace) if e["involvedObject"]["name"] == name]


def child(kube: Kube, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
    return eventually(lambda: kube.get(api_version, kind, namespace, name), what=f"{kind} {name}")


def pod(name: str, owner: str, model: str, status: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/name": "fleetlm",
                "fleetlm.dev/llmdeployment": owner,
                "app.kubernetes.io/managed-by": "fleetlm-operator",
            },
            "annotations": {"fleetlm.dev/model": model},
        },
        "spec": {"containers": [{"name": "server", "image": "x"}]},
        "status": status,
    }


def set_pod(kube: Kube, namespace: str, body: dict[str, Any]) -> None:
    name = body["metadata"]["name"]
    if kube.get("v1", "Pod", namespace, name) is None:
        kube.core.create_namespaced_pod(
            namespace, {k: v for k, v in body.items() if k != "status"}, _preload_content=False
        )
    kube.core.patch_namespaced_pod_status(
        name,
        namespace,
        {"status": body["status"]},
        _content_type="application/merge-patch+json",
        _preload_content=False,
    )


def roll_out(kube: Kube, namespace: str, name: str, ready: int) -> None:
    """What the deployment controller reports once `ready` pods of the current template are available."""
    deployment = kube.get("apps/v1", "Deployment", namespace, name)
    assert deployment is not None
    generation = deployment["metadata"]["generation"]
    status = {
        "observedGeneration": generation,
        "replicas": ready,
        "updatedReplicas": ready,
        "readyReplicas": ready,
        "availableReplicas": ready,
    }
    kube.custom.patch_namespaced_custom_object_status(
        "apps",
        "v1",
        namespace,
        "deployments",
        name,
        {"status": status},
        _content_type="application/merge-patch+json",
    )


MODEL = "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"
DOWNLOADING = {
    "phase": "Pending",
    "initContainerStatuses": [{"name": "model-download", "state": {"running": {}}}],
}
SERVING = {
    "phase": "Running",
    "conditions": [{"type": "Ready", "status": "True"}],
    "initContainerStatuses": [{"name": "model-download", "state": {"terminated": {"exitCode": 0}}}],
    "containerStatuses": [{"name": "server", "ready": True, "state": {"running": {}}}],
}


def test_create_builds_owned_children_and_status_follows_the_pods(kube: Kube, namespace: str) -> None:
    created = create(kube, namespace, "demo")
    uid = created["metadata"]["uid"]
    for api_version, kind, name in [
        ("v1", "PersistentVolumeClaim", "demo-model-cache"),
        ("v1", "Service", "demo"),
        ("apps/v1", "Deployment", "demo"),
        ("policy/v1", "PodDisruptionBudget", "demo"),
    ]:
        obj = child(kube, api_version, kind, namespace, name)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == uid
    assert kube.get("autoscaling/v2", "HorizontalPodAutoscaler", namespace, "demo") is None

    pending = wait_condition(kube, namespace, "demo", "Progressing", "True")
    status = llmd(kube, namespace, "demo")["status"]
    assert status["observedGeneration"] == 1 and pending["observedGeneration"] == 1
    assert status["endpoint"] == f"http://demo.{namespace}.svc:80/v1"
    assert status["selector"] == "app.kubernetes.io/name=fleetlm,fleetlm.dev/llmdeployment=demo"
    assert status["model"] == MODEL and status["phase"] == "Pending"
    assert condition(llmd(kube, namespace, "demo"), "Ready")["status"] == "False"

    set_pod(kube, namespace, pod("demo-1", "demo", MODEL, DOWNLOADING))
    wait_condition(kube, namespace, "demo", "ModelCached", "False", "Downloading")
    assert llmd(kube, namespace, "demo")["status"]["phase"] == "Downloading"

    set_pod(kube, namespace, pod("demo-1", "demo", MODEL, SERVING))
    roll_out(kube, namespace, "demo", ready=1)
    ready = wait_condition(kube, namespace, "demo", "Ready", "True", "Serving")
    assert "1/1" in ready["message"] and ready["lastTransitionTime"]
    status = llmd(kube, namespace, "demo")["status"]
    assert (status["phase"], status["readyReplicas"], status["replicas"]) == ("Ready", 1, 1)
    assert condition(llmd(kube, namespace, "demo"), "ModelCached")["status"] == "True"
    assert status["cachedModel"] == MODEL
    assert condition(llmd(kube, namespace, "demo"), "Degraded")["status"] == "False"
    reasons = eventually(
        lambda: (
            {e["reason"] for e in events(kube, namespace, "demo")} >= {"Serving", "Downloaded"}
            and events(kube, namespace, "demo")
        )
    )
    assert all(e["type"] == "Normal" for e in reasons)


def test_spec_changes_patch_add_and_remove_children(kube: Kube, namespace: str) -> None:
    create(kube, namespace, "upd", cache={"accessMode": "ReadWriteMany"})
    child(kube, "apps/v1", "Deployment", namespace, "upd")

    patch_spec(
        kube,
        namespace,
        "upd",
        {
            "engine": {"maxBatchSize": 48},
            "autoscaling": {"maxReplicas": 5, "metric": "queueSize"},
            "replicas": 2,
        },
    )

    def patched() -> dict[str, Any] | None:
        dep = kube.get("apps/v1", "Deployment", namespace, "upd")
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"] if dep else []
        return dep if "48" in args and dep["spec"]["replicas"] == 2 else None

    eventually(patched, what="the Deployment to carry the new spec")
    hpa = child(kube, "autoscaling/v2", "HorizontalPodAutoscaler", namespace, "upd")
    assert hpa["spec"]["maxReplicas"] == 5
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "llm_queue_size"
    eventually(
        lambda: llmd(kube, namespace, "upd")["status"].get("observedGeneration") == 2,
        what="observedGeneration 2",
    )

    # Turning autoscaling off removes the HPA (and only it).
    kube.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "upd",
        {"spec": {"autoscaling": None}},
        _content_type="application/merge-patch+json",
    )
    eventually(
        lambda: kube.get("autoscaling/v2", "HorizontalPodAutoscaler", namespace, "upd") is None,
        what="the HPA to go",
    )
    assert kube.get("v1", "Service", namespace, "upd") is not None


def test_scale_subresource_value_reaches_the_deployment(kube: Kube, namespace: str) -> None:
    # `kubectl scale llmd/x` and the HPA both write spec.replicas through /scale.
    create(kube, namespace, "scaled", cache={"accessMode": "ReadWriteMany"})
    child(kube, "apps/v1", "Deployment", namespace, "scaled")
    patch_spec(kube, namespace, "scaled", {"replicas": 3})
    eventually(
        lambda: kube.get("apps/v1", "Deployment", namespace, "scaled")["spec"]["replicas"] == 3,
        what="3 replicas",
    )


def test_scaling_a_read_write_once_cache_keeps_the_claim_and_colocates_replicas(kube: Kube, namespace: str) -> None:
    """`kubectl scale llmd/x --replicas=2` on a one-replica resource: the API refuses any change to a
    claim's access mode (this emulator enforces it as the API server does), so the claim keeps
    ReadWriteOnce, every other child is applied, and the replicas are kept on the claim's node."""
    create(kube, namespace, "grow", replicas=1)
    claim = child(kube, "v1", "PersistentVolumeClaim", namespace, "grow-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    patch_spec(kube, namespace, "grow", {"replicas": 2})
    deployment = eventually(
        lambda: (d := kube.get("apps/v1", "Deployment", namespace, "grow")) and d["spec"]["replicas"] == 2 and d,
        what="2 replicas",
    )
    terms = deployment["spec"]["template"]["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms == [
        {"labelSelector": {"matchLabels": {"app.kubernetes.io/name": "fleetlm", "fleetlm.dev/llmdeployment": "grow"}},
         "topologyKey": "kubernetes.io/hostname"}
    ]  # fmt: skip
    assert kube.get("v1", "PersistentVolumeClaim", namespace, "grow-model-cache")["spec"]["accessModes"] == ["ReadWriteOnce"]
    wait_condition(kube, namespace, "grow", "Degraded", "False")


def test_asking_an_existing_claim_for_what_it_cannot_change_says_so_and_applies_the_rest(
    kube: Kube, namespace: str
) -> None:
    create(kube, namespace, "mode", replicas=1, cache={"size": "4Gi"})
    child(kube, "v1", "PersistentVolumeClaim", namespace, "mode-model-cache")
    patch_spec(kube, namespace, "mode", {"replicas": 3, "cache": {"accessMode": "ReadWriteMany", "size": "2Gi"}})
    degraded = wait_condition(kube, namespace, "mode", "Degraded", "True", "CacheClaimImmutable")
    assert "cache.accessMode is ReadWriteMany but claim mode-model-cache was created ReadWriteOnce" in degraded["message"]
    assert "a claim only grows" in degraded["message"] and "kubectl delete pvc mode-model-cache" in degraded["message"]
    # Everything else of the new spec is applied; the claim is unchanged.
    eventually(lambda: kube.get("apps/v1", "Deployment", namespace, "mode")["spec"]["replicas"] == 3, what="3 replicas")
    claim = kube.get("v1", "PersistentVolumeClaim", namespace, "mode-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"] == "4Gi"
    assert any(e["reason"] == "CacheClaimImmutable" and e["type"] == "Warning" for e in events(kube, namespace, "mode"))
    # Asking for what the claim is clears it; growing the claim is allowed once it is bound (the API refuses
    # any change to a Pending claim's spec): the PV controller's binding is a claim event that applies it.
    patch_spec(kube, namespace, "mode", {"cache": {"accessMode": None, "size": "8Gi"}})
    wait_condition(kube, namespace, "mode", "Degraded", "False")
    assert kube.get("v1", "PersistentVolumeClaim", namespace, "mode-model-cache")["spec"]["resources"]["requests"]["storage"] == "4Gi"
    kube.core.patch_namespaced_persistent_volume_claim_status(
        "mode-model-cache", namespace, {"status": {"phase": "Bound"}}, _preload_content=False
    )
    grown = eventually(
        lambda: kube.get("v1", "PersistentVolumeClaim", namespace, "mode-model-cache")["spec"]["resources"]["requests"]["storage"] == "8Gi",
        what="the claim to grow",
    )
    assert grown


def test_deleted_or_edited_children_are_restored(kube: Kube, namespace: str) -> None:
    create(kube, namespace, "heal")
    child(kube, "v1", "Service", namespace, "heal")
    original = child(kube, "apps/v1", "Deployment", namespace, "heal")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]

    kube.delete("v1", "Service", namespace, "heal")
    restored = child(kube, "v1", "Service", namespace, "heal")
    assert restored["spec"]["ports"][0]["port"] == 80

    edit = {
        "spec": {
            "template": {
                "spec": {"containers": [{"name": "server", "image": "evil:latest", "args": ["--oops"]}]}
            }
        }
    }
    kube.custom.patch_namespaced_custom_object(
        "apps", "v1", namespace, "deployments", "heal", edit, _content_type="application/merge-patch+json"
    )

    def repaired() -> bool:
        container = kube.get("apps/v1", "Deployment", namespace, "heal")["spec"]["template"]["spec"][
            "containers"
        ][0]
        return container["args"] == original and container["image"].endswith(":test")

    eventually(repaired, what="the hand edit to be undone")


def test_invalid_spec_gets_degraded_condition_and_event_and_no_children(kube: Kube, namespace: str) -> None:
    # Both sources: the CEL rule rejects this where it is evaluated; an API server that skips CEL stores it.
    create(kube, namespace, "bad", model={"hf": {"repo": "a/b"}, "pvc": {"claimName": "w"}})
    degraded = wait_condition(kube, namespace, "bad", "Degraded", "True", "InvalidSpec")
    assert "exactly one source" in degraded["message"]
    assert condition(llmd(kube, namespace, "bad"), "Ready")["reason"] == "InvalidSpec"
    assert llmd(kube, namespace, "bad")["status"]["phase"] == "Degraded"
    event = eventually(
        lambda: [e for e in events(kube, namespace, "bad") if e["reason"] == "InvalidSpec"], what="an Event"
    )
    assert event[0]["type"] == "Warning" and "exactly one source" in event[0]["message"]
    assert kube.get("apps/v1", "Deployment", namespace, "bad") is None
    assert kube.get("v1", "Service", namespace, "bad") is None


def test_missing_token_secret_degrades_until_it_appears(kube: Kube, namespace: str) -> None:
    create(
        kube,
        namespace,
        "gated",
        model={"hf": {"repo": "meta-llama/Llama-3.1-8B-Instruct"}, "tokenSecretRef": {"name": "hf-token"}},
    )
    degraded = wait_condition(kube, namespace, "gated", "Degraded", "True", "SecretNotFound")
    assert "hf-token" in degraded["message"]
    assert [e["type"] for e in events(kube, namespace, "gated") if e["reason"] == "SecretNotFound"] == [
        "Warning"
    ]
    assert kube.get("apps/v1", "Deployment", namespace, "gated") is None
    assert kube.get("v1", "PersistentVolumeClaim", namespace, "gated-model-cache") is None

    secret = {"metadata": {"name": "hf-token"}, "data": {"HF_TOKEN": base64.b64encode(b"hf_x").decode()}}
    kube.core.create_namespaced_secret(namespace, secret)
    dep = child(kube, "apps/v1", "Deployment", namespace, "gated")  # picked up by the periodic resync
    env = dep["spec"]["template"]["spec"]["initContainers"][0]["env"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}} in env
    wait_condition(kube, namespace, "gated", "Degraded", "False")


def test_a_missing_mirror_ca_bundle_degrades_until_it_appears(kube: Kube, namespace: str) -> None:
    create(kube, namespace, "mirror", model={"hf": {"repo": "org/m", "endpoint": "https://mirror.local",
                                                    "caBundle": {"configMapName": "corp-ca"}}})  # fmt: skip
    cond = wait_condition(kube, namespace, "mirror", "Degraded", "True", "CaBundleNotFound")
    assert f"ConfigMap {namespace}/corp-ca does not exist" in cond["message"]
    assert kube.get("apps/v1", "Deployment", namespace, "mirror") is None
    kube.core.create_namespaced_config_map(namespace, {"metadata": {"name": "corp-ca"}, "data": {"ca.crt": "PEM"}})
    deployment = child(kube, "apps/v1", "Deployment", namespace, "mirror")  # the resync finds it
    env = deployment["spec"]["template"]["spec"]["initContainers"][0]["env"]
    assert {"name": "HF_ENDPOINT", "value": "https://mirror.local"} in env


def test_unknown_gpu_resource_degrades_without_children(kube: Kube, namespace: str) -> None:
    create(kube, namespace, "tpu", resources={"gpu": {"count": 1, "resourceName": "example.com/tpu"}})
    degraded = wait_condition(kube, namespace, "tpu", "Degraded", "True", "UnknownGPUResource")
    assert "example.com/tpu" in degraded["message"]
    assert kube.get("apps/v1", "Deployment", namespace, "tpu") is None
    create(
        kube, namespace, "gpu", resources={"gpu": {"count": 2}}
    )  # the fixture's node offers nvidia.com/gpu
    child(kube, "apps/v1", "Deployment", namespace, "gpu")


@pytest.mark.parametrize(
    ("exit_code", "reason"),
    [(3, "ModelAccessDenied"), (4, "ModelNotFound"), (5, "DownloadNetworkError"), (6, "CacheVolumeError")],
)
def test_download_failures_surface_as_condition_reasons(
    kube: Kube, namespace: str, exit_code: int, reason: str
) -> None:
    create(kube, namespace, "dl")
    child(kube, "apps/v1", "Deployment", namespace, "dl")
    failed = {
        "phase": "Pending",
        "initContainerStatuses": [
            {
                "name": "model-download",
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": exit_code}},
            }
        ],
    }
    set_pod(kube, namespace, pod("dl-1", "dl", MODEL, failed))
    degraded = wait_condition(kube, namespace, "dl", "Degraded", "True", reason)
    assert f"exited with code {exit_code}" in degraded["message"]
    assert condition(llmd(kube, namespace, "dl"), "ModelCached")["reason"] == reason
    assert [e["type"] for e in events(kube, namespace, "dl") if e["reason"] == reason] == ["Warning"]


def test_image_pull_and_scheduling_failures_surface(kube: Kube, namespace: str) -> None:
    create(kube, namespace, "pull")
    child(kube, "apps/v1", "Deployment", namespace, "pull")
    pulling = {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "server",
                "image": "ghcr.io/fleetlm/fleetlm:nope",
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}},
            }
        ],
    }
    set_pod(kube, namespace, pod("pull-1", "pull", MODEL, pulling))
    degraded = wait_condition(kube, namespace, "pull", "Degraded", "True", "ImagePullFailed")
    assert "fleetlm:nope" in degraded["message"]

    unschedulable = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes: Insufficient nvidia.com/gpu",
            }
        ],
    }
    kube.delete("v1", "Pod", namespace, "pull-1")
    set_pod(kube, namespace, pod("pull-2", "pull", MODEL, unschedulable))
    degraded = wait_condition(kube, namespace, "pull", "Degraded", "True", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in degraded["message"]


def test_service_monitor_skipped_with_event_until_its_crd_exists(
    kube: Kube, namespace: str, apiserver: BackgroundApiServer
) -> None:
    create(kube, namespace, "mon", monitoring={"serviceMonitor": True, "serviceMonitorLabels": {"release": "kps"}})
    child(kube, "apps/v1", "Deployment", namespace, "mon")
    skipped = eventually(
        lambda: [e for e in events(kube, namespace, "mon") if e["reason"] == "ServiceMonitorSkipped"],
        what="an Event",
    )
    assert "prometheus-operator" in skipped[0]["message"]
    assert kube.get("monitoring.coreos.com/v1", "ServiceMonitor", namespace, "mon") is None
    apiserver.serve_service_monitors(True)
    try:
        monitor = child(kube, "monitoring.coreos.com/v1", "ServiceMonitor", namespace, "mon")
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
        assert monitor["metadata"]["labels"]["release"] == "kps"  # kube-prometheus-stack selects by it
    finally:
        apiserver.serve_service_monitors(False)


def test_children_are_written_with_server_side_apply(
    kube: Kube, namespace: str, apiserver: BackgroundApiServer
) -> None:
    create(kube, namespace, "ssa")
    child(kube, "policy/v1", "PodDisruptionBudget", namespace, "ssa")
    writes = [
        r
        for r in list(apiserver.emulator._requests)
        if r.method == "PATCH" and r.namespace == namespace and r.resource.plural != PLURAL
    ]
    assert writes
    for request in writes:
        assert request.headers["Content-Type"] == "application/apply-patch+yaml"
        assert (
            request.params["fieldManager"] == "fleetlm-operator" and request.params["force"].lower() == "true"
        )  # the API server parses bools leniently
    assert any(r.params.get("dryRun") == "All" for r in writes), (
        "a new spec is dry-run before anything is stored"
    )


def test_operator_serves_health_and_its_own_metrics(
    operator: OperatorConfig, kube: Kube, namespace: str
) -> None:
    create(kube, namespace, "metered")
    child(kube, "apps/v1", "Deployment", namespace, "metered")
    eventually(lambda: llmd(kube, namespace, "metered").get("status"), what="a status")
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.health_port}/healthz", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'fleetlm_operator_reconciles_total{result="ok",trigger="spec"}' in text
    assert "fleetlm_operator_reconcile_duration_seconds_bucket" in text
    assert "fleetlm_operator_reconcile_errors_total" in text
    assert RESYNC_SECONDS > 0


LLAMA_8B_CONFIG = json.dumps({
    "model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "hidden_size": 4096, "torch_dtype": "bfloat16",
}).encode()  # fmt: skip


@pytest.fixture(scope="module")
def hub():
    from tests.hub_server import FakeHub

    with FakeHub() as fake:
        yield fake


def _init_args(kube: Kube, namespace: str, name: str) -> dict[str, str]:
    dep = kube.get("apps/v1", "Deployment", namespace, name)
    args = dep["spec"]["template"]["spec"]["initContainers"][0]["args"] if dep else []
    return dict(zip(args[::2], args[1::2], strict=False))


def test_a_branch_is_pinned_to_its_commit_reported_when_it_moves_and_moved_on_request(hub, kube: Kube, namespace: str) -> None:
    first = hub.add_repo("org/pinned", {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"x" * 64})
    create(kube, namespace, "pin", model={"hf": {"repo": "org/pinned", "revision": "main", "endpoint": hub.url}})
    eventually(lambda: _init_args(kube, namespace, "pin").get("--revision") == first, what="the pinned commit")
    assert _init_args(kube, namespace, "pin")["--dest"] == f"/models/hf/org--pinned/{first}"
    cond = wait_condition(kube, namespace, "pin", "RevisionPinned", "True", "Pinned")
    assert first in cond["message"]
    status = llmd(kube, namespace, "pin")["status"]
    assert (status["resolvedRevision"], status["resolvedFrom"], status["model"]) == (first, "main", f"hf://org/pinned@{first}")

    # The branch moves: reported, the pods stay.
    second = hub.add_repo("org/pinned", {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"y" * 64})
    cond = wait_condition(kube, namespace, "pin", "RevisionPinned", "True", "BranchMoved")
    assert second in cond["message"] and first in cond["message"]
    assert _init_args(kube, namespace, "pin")["--revision"] == first
    assert any(e["reason"] == "BranchMoved" and e["type"] == "Warning" for e in events(kube, namespace, "pin"))

    # Asked to, it moves the pin.
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "pin", {"metadata": {"annotations": {"fleetlm.dev/repin": "2026-12-02"}}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    eventually(lambda: _init_args(kube, namespace, "pin").get("--revision") == second, what="the new pin")
    wait_condition(kube, namespace, "pin", "RevisionPinned", "True", "Pinned")
    assert llmd(kube, namespace, "pin")["status"]["repinRequest"] == "2026-12-02"


def test_an_unreachable_hub_leaves_the_revision_unpinned_and_says_why(kube: Kube, namespace: str) -> None:
    create(kube, namespace, "nohub")  # the operator's --hf-endpoint refuses connections
    cond = wait_condition(kube, namespace, "nohub", "RevisionPinned", "False", "ResolveFailed")
    assert "api/models/HuggingFaceTB/SmolLM2-135M-Instruct" in cond["message"]
    assert _init_args(kube, namespace, "nohub")["--revision"] == "main"


def test_a_model_that_cannot_fit_its_gpu_is_refused_before_any_pod(hub, kube: Kube, namespace: str) -> None:
    hub.add_repo("org/eight-b", {"config.json": LLAMA_8B_CONFIG, "model.safetensors": b"\0" * 1024})
    gpu = {"gpu": {"count": 1, "product": "NVIDIA-L4", "memory": "24Gi"}}
    model = {"hf": {"repo": "org/eight-b", "endpoint": hub.url}}
    # 1 KiB of weights, but 128 KiB of KV cache a token: 90% of 24 GiB less 1 GiB holds 168,755 tokens,
    # not one sequence of 262,144.
    create(kube, namespace, "huge", model=model, resources=gpu, engine={"maxSeqLen": 262144})
    cond = wait_condition(kube, namespace, "huge", "Degraded", "True", "DoesNotFit")
    assert "128 KiB/token" in cond["message"] and "less than one engine.maxSeqLen (262144) sequence" in cond["message"]
    capacity = llmd(kube, namespace, "huge")["status"]["capacity"]
    assert capacity["fits"] is False and capacity["maxContextTokens"] == 168_755
    assert capacity["maxConcurrentSequences"] == 0
    assert kube.get("apps/v1", "Deployment", namespace, "huge") is None


def test_a_model_that_fits_reports_its_capacity(hub, kube: Kube, namespace: str) -> None:
    hub.add_repo("org/eight-b-fits", {"config.json": LLAMA_8B_CONFIG, "model.safetensors": b"\0" * 1024})
    model = {"hf": {"repo": "org/eight-b-fits", "endpoint": hub.url}}
    gpu = {"gpu": {"count": 1, "product": "NVIDIA-A100-SXM4-80GB"}}
    create(kube, namespace, "fits", model=model, resources=gpu, engine={"maxSeqLen": 8192, "maxBatchSize": 16})
    child(kube, "apps/v1", "Deployment", namespace, "fits")
    capacity = eventually(lambda: llmd(kube, namespace, "fits").get("status", {}).get("capacity"), what="status.capacity")
    assert capacity["fits"] is True and capacity["maxConcurrentSequences"] == 16
    assert capacity["gpuMemoryBytes"] == 81920 * 2**20 and capacity["kvBytesPerToken"] == 131_072


def _progress_log(done: int, total: int) -> str:
    """What the downloader writes while it runs: its real progress line, through the real JSON formatter."""
    import io
    import logging

    from serving.download import progress
    from serving.logs import JsonFormatter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("fleetlm.download")
    logger.addHandler(handler)
    level, interval = logger.level, progress.PROGRESS_INTERVAL_S
    logger.setLevel(logging.INFO)
    progress.PROGRESS_INTERVAL_S = 0.0
    try:
        whole = progress.ModelProgress(total)
        whole.started -= 10  # ten seconds in
        whole.add(done)
    finally:
        progress.PROGRESS_INTERVAL_S = interval
        logger.setLevel(level)
        logger.removeHandler(handler)
    return '{"ts": "x", "level": "info", "logger": "fleetlm.download", "msg": "file started", "file": "a"}\n' + out.getvalue()


def test_the_cold_start_timeline_follows_the_newest_pod(apiserver: BackgroundApiServer, kube: Kube, namespace: str) -> None:
    create(kube, namespace, "cold")
    child(kube, "apps/v1", "Deployment", namespace, "cold")
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-02T10:00:00Z"}
    downloading = {
        "phase": "Pending",
        "conditions": [scheduled],
        "initContainerStatuses": [{"name": "model-download", "state": {"running": {"startedAt": "2026-12-02T10:00:30Z"}}}],
    }
    set_pod(kube, namespace, pod("cold-1", "cold", MODEL, downloading))
    apiserver.set_pod_log(namespace, "cold-1", "model-download", _progress_log(250_000_000, 1_000_000_000))

    def startup() -> dict[str, Any] | None:
        found = llmd(kube, namespace, "cold").get("status", {}).get("startup")
        return found if found and found.get("download") else None

    seen = eventually(startup, what="status.startup with download progress")
    assert seen["pod"] == "cold-1" and seen["phase"] == "Downloading"
    assert (seen["scheduledAt"], seen["imagePulledAt"]) == ("2026-12-02T10:00:00Z", "2026-12-02T10:00:30Z")
    download = seen["download"]
    assert (download["downloadedBytes"], download["totalBytes"], download["percent"]) == (250_000_000, 1_000_000_000, 25.0)
    assert 25 <= download["etaSeconds"] <= 35  # 750 MB to go at 25 MB/s

    ready = {
        "phase": "Running",
        "conditions": [scheduled, {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-02T10:03:10Z"}],
        "initContainerStatuses": [{"name": "model-download", "state": {"terminated": {
            "exitCode": 0, "startedAt": "2026-12-02T10:00:30Z", "finishedAt": "2026-12-02T10:02:00Z"}}}],
        "containerStatuses": [{"name": "server", "ready": True, "state": {"running": {"startedAt": "2026-12-02T10:02:01Z"}}}],
    }  # fmt: skip
    set_pod(kube, namespace, pod("cold-1", "cold", MODEL, ready))
    done = eventually(
        lambda: (s := llmd(kube, namespace, "cold")["status"].get("startup", {})).get("phase") == "Ready" and s,
        what="the timeline to reach Ready",
    )
    assert done == {
        "pod": "cold-1", "phase": "Ready", "scheduledAt": "2026-12-02T10:00:00Z", "imagePulledAt": "2026-12-02T10:00:30Z",
        "downloadedAt": "2026-12-02T10:02:00Z", "serverStartedAt": "2026-12-02T10:02:01Z", "readyAt": "2026-12-02T10:03:10Z",
    }  # fmt: skip
