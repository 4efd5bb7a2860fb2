"""The chart's RBAC is exactly what the operator uses: the operator runs (as a process, as in its pod)
through a whole lifecycle against the test API, which records every request; each request becomes the
(API group, resource, verb) RBAC would check, and the chart's ClusterRoles must grant all of them and
nothing beyond a short list of verbs this run cannot exercise, each with its reason.

Admission checks count too: an object written with an ownerReference that sets blockOwnerDeletion needs
`update` on the owner's `finalizers` subresource where the OwnerReferencesPermissionEnforcement plugin
runs (OpenShift's default), which the test API does not enforce."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from llm_operator.kube import PLURALS, Kube

from tests.operator.apiserver import BackgroundApiServer
from tests.operator.conftest import NO_HUB, eventually, write_kubeconfig
from tests.operator.test_chart import _granted, render

TEST_AGENT = "fleetlm-rbac-test"
# Granted, but not exercised by this run, and why.
UNEXERCISED = {
    # Peering: the run is standalone (one operator); replicas of the chart's Deployment peer.
    ("kopf.dev", "kopfpeerings", "get"), ("kopf.dev", "kopfpeerings", "list"), ("kopf.dev", "kopfpeerings", "watch"),
    ("kopf.dev", "kopfpeerings", "patch"), ("kopf.dev", "clusterkopfpeerings", "get"),
    ("kopf.dev", "clusterkopfpeerings", "list"), ("kopf.dev", "clusterkopfpeerings", "watch"),
    ("kopf.dev", "clusterkopfpeerings", "patch"),
    # Serving listed namespaces (watchNamespaces), kopf watches namespaces; this run serves all of them.
    ("", "namespaces", "list"), ("", "namespaces", "watch"),
}  # fmt: skip


def _verb(request: Any) -> str:
    method = request.method.upper()
    if method == "GET":
        if request.name:
            return "get"
        return "watch" if request.params.get("watch") in ("true", "1", "True") else "list"
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete" if request.name else "deletecollection"}[method]


def _used(requests: list[Any]) -> set[tuple[str, str, str]]:
    used = set()
    for request in requests:
        if request.resource is None or request.resource.plural is None:
            continue  # API discovery: allowed to every account
        if request.headers.get("User-Agent", "").startswith(TEST_AGENT):
            continue  # the test's own calls
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        group = request.resource.group or ""
        used.add((group, resource, _verb(request)))
        if request.headers.get("Content-Type", "").startswith("application/apply-patch"):
            # Server-side apply creates what is missing, which the API server authorizes as create.
            used.add((group, resource, "create"))
        used |= _owner_finalizers(request.data)
    return used


def _owner_finalizers(body: Any) -> set[tuple[str, str, str]]:
    """What OwnerReferencesPermissionEnforcement checks of a write: update on <owner>/finalizers for each
    ownerReference that sets blockOwnerDeletion."""
    if not isinstance(body, dict):
        return set()
    refs = body.get("metadata", {}).get("ownerReferences") or []
    return {
        (ref["apiVersion"].rpartition("/")[0], f"{PLURALS[ref['kind']]}/finalizers", "update")
        for ref in refs
        if ref.get("blockOwnerDeletion")
    }


def _kube(kubeconfig: Path) -> Kube:
    api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    api.user_agent = TEST_AGENT
    return Kube(api)


@pytest.mark.timeout(180)
def test_the_chart_grants_exactly_what_the_operator_uses(tmp_path: Path) -> None:
    with BackgroundApiServer() as apiserver:
        apiserver.serve_service_monitors(True)
        config = write_kubeconfig(apiserver, tmp_path / "config")
        kube = _kube(config)
        ns = "ml"
        kube.core.create_node({"metadata": {"name": "n"}, "status": {"capacity": {"cpu": "8", "nvidia.com/gpu": "1"}}})
        kube.core.create_namespaced_config_map(ns, {"metadata": {"name": "ca"}, "data": {"ca.crt": "not a pem"}})
        kube.custom.create_cluster_custom_object("scheduling.k8s.io", "v1", "priorityclasses",
                                                 {"metadata": {"name": "llm"}, "value": 10})  # fmt: skip
        kube.custom.create_cluster_custom_object("storage.k8s.io", "v1", "storageclasses",
                                                 {"metadata": {"name": "fixed"}, "provisioner": "csi.example.com"})  # fmt: skip
        env = {**os.environ, "KUBECONFIG": str(config)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        flags = ["--standalone", "--resync-seconds", "1", "--health-port", "0", "--metrics-port", "0", "--hf-endpoint", NO_HUB]
        process = subprocess.Popen([sys.executable, "-m", "llm_operator", *flags], env=env, cwd=tmp_path,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            spec = {
                "model": {"hf": {"repo": "org/m", "caBundle": {"configMapName": "ca"}}, "tokenSecretRef": {"name": "hf"}},
                "resources": {"gpu": {"count": 1}},
                "scheduling": {"priorityClassName": "llm"},
                "autoscaling": {"maxReplicas": 3},
                "monitoring": {"serviceMonitor": True},
                "cache": {"storageClassName": "fixed", "size": "1Gi"},
            }
            body = {"apiVersion": "fleetlm.dev/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": "m", "namespace": ns}, "spec": spec}
            kube.custom.create_namespaced_custom_object("fleetlm.dev", "v1alpha1", ns, "llmdeployments", body)
            # Degraded (an Event) until the token's Secret exists.
            eventually(lambda: [e for e in kube.list("v1", "Event", ns) if e["reason"] == "SecretNotFound"], timeout=60, what="an Event")
            kube.core.create_namespaced_secret(ns, {"metadata": {"name": "hf"}, "stringData": {"HF_TOKEN": "t"}})
            eventually(lambda: kube.get("monitoring.coreos.com/v1", "ServiceMonitor", ns, "m"), timeout=60, what="every child")
            labels = {"app.kubernetes.io/name": "fleetlm", "app.kubernetes.io/managed-by": "fleetlm-operator", "fleetlm.dev/llmdeployment": "m"}
            kube.core.create_namespaced_pod(ns, {"metadata": {"name": "m-1", "labels": labels, "annotations": {"fleetlm.dev/model": "hf://org/m@main"}},
                                                 "spec": {"containers": [{"name": "server", "image": "x"}]}}, _preload_content=False)  # fmt: skip
            kube.core.patch_namespaced_pod_status("m-1", ns, {"status": {"initContainerStatuses": [
                {"name": "model-download", "state": {"running": {"startedAt": "2026-12-02T10:00:00Z"}}}]}}, _preload_content=False)  # fmt: skip
            apiserver.set_pod_log(ns, "m-1", "model-download", '{"msg": "download progress", "downloaded_bytes": 1, "total_bytes": 2}\n')
            eventually(lambda: (kube.get("fleetlm.dev/v1alpha1", "LLMDeployment", ns, "m").get("status", {}).get("startup") or {}).get("download"),
                       timeout=30, what="the download progress")  # fmt: skip
            kube.delete("v1", "Service", ns, "m")  # repaired
            eventually(lambda: kube.get("v1", "Service", ns, "m"), timeout=30, what="the Service back")
            kube.custom.patch_namespaced_custom_object("fleetlm.dev", "v1alpha1", ns, "llmdeployments", "m",
                                                       {"spec": {"autoscaling": None}},
                                                       _content_type="application/merge-patch+json")  # fmt: skip
            eventually(lambda: kube.get("autoscaling/v2", "HorizontalPodAutoscaler", ns, "m") is None, timeout=30, what="pruning")
            # Growing the cache reads its StorageClass, which cannot expand.
            kube.custom.patch_namespaced_custom_object("fleetlm.dev", "v1alpha1", ns, "llmdeployments", "m",
                                                       {"spec": {"cache": {"size": "2Gi"}}},
                                                       _content_type="application/merge-patch+json")  # fmt: skip
            eventually(lambda: [e for e in kube.list("v1", "Event", ns) if e["reason"] == "CacheClaimNotExpandable"],
                       timeout=30, what="the claim's StorageClass read")  # fmt: skip
            # Every child a spec can drop is pruned: the ServiceMonitor, and the cache claim for an existing one.
            kube.core.create_namespaced_persistent_volume_claim(ns, {"metadata": {"name": "shared"}, "spec": {
                "accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})  # fmt: skip
            kube.custom.patch_namespaced_custom_object("fleetlm.dev", "v1alpha1", ns, "llmdeployments", "m",
                                                       {"spec": {"monitoring": {"serviceMonitor": False},
                                                                 "cache": {"existingClaim": "shared", "storageClassName": None, "size": None}}},
                                                       _content_type="application/merge-patch+json")  # fmt: skip
            eventually(lambda: kube.get("monitoring.coreos.com/v1", "ServiceMonitor", ns, "m") is None
                       and kube.get("v1", "PersistentVolumeClaim", ns, "m-model-cache") is None, timeout=30, what="pruning")  # fmt: skip
        finally:
            process.terminate()
            process.wait(30)
        requests = list(apiserver.emulator._requests)
    used = _used(requests)
    assert ("fleetlm.dev", "llmdeployments/finalizers", "update") in used  # the children block their owner's deletion
    granted = _granted(render())
    assert used - granted == set(), "the operator calls what the chart does not grant"
    assert granted - used - UNEXERCISED == set(), "the chart grants what the operator never uses"
