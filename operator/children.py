"""Everything an LLMDeployment owns, as manifests: a pure function of the resource and its spec."""

from __future__ import annotations

from typing import Any

from kubernetes.utils.quantity import parse_quantity
from llm_operator import naming
from llm_operator.deployment import deployment
from llm_operator.diagnosis import Problem
from llm_operator.naming import UNPINNED, HubPin, Owner
from llm_operator.spec import LLMDeploymentSpec

METRIC_NAMES = {"activeRequests": "llm_active_requests", "queueSize": "llm_queue_size"}

# Scale up within a minute of sustained load, down one pod at a time after ten quiet minutes: a cold start
# costs minutes, so capacity given back too eagerly is expensive to get back.
DEFAULT_BEHAVIOR = {
    "scaleUp": {
        "stabilizationWindowSeconds": 0,
        "selectPolicy": "Max",
        "policies": [
            {"type": "Pods", "value": 2, "periodSeconds": 60},
            {"type": "Percent", "value": 100, "periodSeconds": 60},
        ],
    },
    "scaleDown": {
        "stabilizationWindowSeconds": 600,
        "selectPolicy": "Min",
        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
    },
}


def manages_cache(spec: LLMDeploymentSpec) -> bool:
    """Whether the operator owns a cache claim for this spec (a Hub model, no existingClaim)."""
    return spec.model.hf is not None and spec.cache.existing_claim is None


def referenced_claims(spec: LLMDeploymentSpec) -> set[str]:
    """The claims the spec names, to be used as they are (never the operator's to delete)."""
    named = {spec.cache.existing_claim, spec.model.pvc.claim_name if spec.model.pvc is not None else None}
    return {name for name in named if name is not None}


def desired_children(
    body: dict[str, Any],
    spec: LLMDeploymentSpec,
    default_image: str,
    live_claim: dict[str, Any] | None = None,
    hub: HubPin = UNPINNED,
    expandable: bool = True,
) -> list[dict[str, Any]]:
    """In apply order: the cache claim before the pods that mount it, the Deployment before what refers to it.

    live_claim: the cache claim as it exists, whose immutable fields the desired one keeps.
    hub: the Hub endpoint (a mirror) for specs that name none, and the commit the revision is pinned to.
    expandable: whether the live claim may grow (see claim_grows)."""
    owner = Owner.of(body)
    children = []
    single_node = False
    if manages_cache(spec):
        claim = cache_claim(owner, spec, live_claim, expandable)
        single_node = claim["spec"]["accessModes"] == ["ReadWriteOnce"]
        children.append(claim)
    children.append(service(owner, spec))
    children.append(deployment(owner, spec, spec.image or default_image, colocate=single_node, hub=hub))
    children.append(disruption_budget(owner))
    if spec.autoscaling is not None:
        children.append(autoscaler(owner, spec))
    if spec.monitoring.service_monitor:
        children.append(service_monitor(owner, spec))
    return children


def cache_access_mode(spec: LLMDeploymentSpec) -> str:
    """The mode a new cache claim is created with: what the resource can ever need, as far as the spec
    says (cache.accessMode, else the autoscaler's upper bound or the replicas)."""
    if spec.cache.access_mode is not None:
        return spec.cache.access_mode
    most = spec.autoscaling.max_replicas if spec.autoscaling is not None else spec.replicas
    return "ReadWriteMany" if most > 1 else "ReadWriteOnce"


def cache_claim(
    owner: Owner, spec: LLMDeploymentSpec, live: dict[str, Any] | None = None, expandable: bool = True
) -> dict[str, Any]:
    """The cache PVC. A claim's spec is immutable after creation except for a larger storage request (and
    that only where its StorageClass allows volume expansion), so an existing claim keeps its access
    modes, storage class and (when the spec asks for less, or more of a claim that cannot grow) its size:
    the operator never asks the API for a change it must refuse (see claim_conflicts for what it tells
    the user instead)."""
    size = str(spec.cache.size)
    claim: dict[str, Any] = {"accessModes": [cache_access_mode(spec)], "resources": {"requests": {"storage": size}}}
    if spec.cache.storage_class_name is not None:
        claim["storageClassName"] = spec.cache.storage_class_name
    if live is not None:
        live_spec = live.get("spec", {})
        claim["accessModes"] = list(live_spec.get("accessModes") or claim["accessModes"])
        # The live class is sent back even when the spec no longer names one: server-side apply would
        # otherwise remove a field this manager owns, which the API refuses for a claim on every apply.
        claim.pop("storageClassName", None)
        if live_spec.get("storageClassName") is not None:
            claim["storageClassName"] = live_spec["storageClassName"]
        live_size = _claim_size(live)
        # The API resizes only a bound claim (a Pending one's spec is wholly immutable): growth waits for
        # the binding, which is a claim event the operator reconciles on.
        bound = (live.get("status") or {}).get("phase") == "Bound"
        if live_size is not None and (not expandable or not bound or parse_quantity(live_size) > parse_quantity(size)):
            claim["resources"]["requests"]["storage"] = live_size
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": naming.metadata(owner, naming.cache_claim_name(owner.name)),
        "spec": claim,
    }


def claim_grows(spec: LLMDeploymentSpec, live: dict[str, Any] | None) -> bool:
    """Whether the spec asks the existing cache claim for more storage: allowed only where the claim's
    StorageClass sets allowVolumeExpansion (the PersistentVolumeClaimResize admission plugin answers
    403 otherwise), so the reconciler reads the class first."""
    live_size = _claim_size(live) if live is not None and manages_cache(spec) else None
    return live_size is not None and parse_quantity(str(spec.cache.size)) > parse_quantity(live_size)


def _claim_size(claim: dict[str, Any]) -> str | None:
    return claim.get("spec", {}).get("resources", {}).get("requests", {}).get("storage")


def claim_conflicts(spec: LLMDeploymentSpec, live: dict[str, Any] | None, expandable: bool = True) -> list[Problem]:
    """What the spec asks of the existing cache claim that a claim cannot change, with the remedy.
    expandable: whether the claim may grow (see claim_grows)."""
    if live is None or not manages_cache(spec):
        return []
    name = live["metadata"]["name"]
    live_spec = live.get("spec", {})
    remedy = (
        f"a PersistentVolumeClaim cannot change this after creation: to get it, delete the claim "
        f"(kubectl delete pvc {name}; the serving pods stop until it is gone, then the operator recreates it, the "
        "model is downloaded again and the pods start), or point "
        "cache.existingClaim at a claim made as wanted"
    )
    found = []
    modes = live_spec.get("accessModes") or []
    if spec.cache.access_mode is not None and spec.cache.access_mode not in modes:
        found.append(
            f"cache.accessMode is {spec.cache.access_mode} but claim {name} was created {', '.join(modes) or 'without'}"
            + (" (replicas are kept on its one node)" if modes == ["ReadWriteOnce"] else "")
        )
    live_class = live_spec.get("storageClassName")
    if spec.cache.storage_class_name is not None and live_class not in (None, spec.cache.storage_class_name):
        found.append(f"cache.storageClassName is {spec.cache.storage_class_name} but claim {name} uses {live_class}")
    live_size = _claim_size(live)
    if live_size is not None and parse_quantity(live_size) > parse_quantity(str(spec.cache.size)):
        found.append(f"cache.size is {spec.cache.size} but claim {name} holds {live_size} (a claim only grows)")
    problems = [Problem("CacheClaimImmutable", "; ".join(found) + f": {remedy}")] if found else []
    if not expandable and claim_grows(spec, live):
        storage_class = live_class or "(none)"
        problems.append(
            Problem(
                "CacheClaimNotExpandable",
                f"cache.size is {spec.cache.size} but claim {name} holds {live_size} and cannot grow: its "
                f"StorageClass {storage_class} does not set allowVolumeExpansion: true. The claim keeps its size "
                "and everything else is applied; to grow it, allow expansion on the class (where its provisioner "
                f"supports it), or delete the claim (kubectl delete pvc {name}; the serving pods stop until it is gone, "
                "then it is recreated at the new size and the model downloaded again), or point cache.existingClaim "
                "at a larger claim",
            )
        )
    return problems


def service(owner: Owner, spec: LLMDeploymentSpec) -> dict[str, Any]:
    meta = naming.metadata(owner)
    if spec.service.annotations:
        meta["annotations"] = dict(spec.service.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": spec.service.type,
            "selector": naming.selector_labels(owner.name),
            "ports": [{"name": "http", "port": spec.service.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": naming.metadata(owner),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": naming.selector_labels(owner.name)},
            # A pod that never became ready (e.g. stuck downloading) must not block node drains.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def autoscaling_target(spec: LLMDeploymentSpec) -> int:
    assert spec.autoscaling is not None
    if spec.autoscaling.target is not None:
        return spec.autoscaling.target
    return {
        "activeRequests": max(1, spec.engine.max_batch_size * 3 // 4),
        "queueSize": 2,
        "cpu": 80,
    }[spec.autoscaling.metric]


def autoscaler(owner: Owner, spec: LLMDeploymentSpec) -> dict[str, Any]:
    scaling = spec.autoscaling
    assert scaling is not None
    target = autoscaling_target(spec)
    if scaling.metric == "cpu":
        metric = {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": target}},
        }
    else:
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": METRIC_NAMES[scaling.metric]},
                "target": {"type": "AverageValue", "averageValue": str(target)},
            },
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": naming.metadata(owner),
        "spec": {
            # The HPA scales the LLMDeployment itself (its scale subresource), not the Deployment: one
            # replica count, which `kubectl scale llmd` and the HPA both write and the operator carries over.
            "scaleTargetRef": {"apiVersion": naming.API_VERSION, "kind": naming.KIND, "name": owner.name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [metric],
            "behavior": scaling.behavior or DEFAULT_BEHAVIOR,
        },
    }


def service_monitor(owner: Owner, spec: LLMDeploymentSpec) -> dict[str, Any]:
    meta = naming.metadata(owner)
    # A Prometheus may select ServiceMonitors by label (kube-prometheus-stack: release=<its name>). Ours
    # win: the operator finds its children by them.
    meta["labels"] = {**spec.monitoring.service_monitor_labels, **meta["labels"]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": naming.selector_labels(owner.name)},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": spec.monitoring.interval}],
        },
    }
