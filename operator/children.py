"""Everything an LLMDeployment owns, as manifests: a pure function of the resource and its spec."""

from __future__ import annotations

from typing import Any

from llm_operator import naming
from llm_operator.deployment import deployment
from llm_operator.naming import Owner
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


def desired_children(
    body: dict[str, Any], spec: LLMDeploymentSpec, default_image: str
) -> list[dict[str, Any]]:
    """In apply order: the cache claim before the pods that mount it, the Deployment before what refers to it."""
    owner = Owner.of(body)
    children = []
    if spec.model.hf is not None and spec.cache.existing_claim is None:
        children.append(cache_claim(owner, spec))
    children.append(service(owner, spec))
    children.append(deployment(owner, spec, spec.image or default_image))
    children.append(disruption_budget(owner))
    if spec.autoscaling is not None:
        children.append(autoscaler(owner, spec))
    if spec.monitoring.service_monitor:
        children.append(service_monitor(owner, spec))
    return children


def cache_access_mode(spec: LLMDeploymentSpec) -> str:
    if spec.cache.access_mode is not None:
        return spec.cache.access_mode
    most = spec.autoscaling.max_replicas if spec.autoscaling is not None else spec.replicas
    return "ReadWriteMany" if most > 1 else "ReadWriteOnce"


def cache_claim(owner: Owner, spec: LLMDeploymentSpec) -> dict[str, Any]:
    claim: dict[str, Any] = {
        "accessModes": [cache_access_mode(spec)],
        "resources": {"requests": {"storage": str(spec.cache.size)}},
    }
    if spec.cache.storage_class_name is not None:
        claim["storageClassName"] = spec.cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": naming.metadata(owner, naming.cache_claim_name(owner.name)),
        "spec": claim,
    }


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
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": naming.metadata(owner),
        "spec": {
            "selector": {"matchLabels": naming.selector_labels(owner.name)},
            "endpoints": [{"port": "http", "path": "/metrics", "interval": spec.monitoring.interval}],
        },
    }
