"""Checks against the cluster before anything is created: what the API accepts but the pods could never use.

Each failure is a Problem (a Degraded reason); the reconciler then leaves the children as they are rather than
create pods that would sit in CreateContainerConfigError or Pending forever. A check the operator is not
allowed to make (403) is skipped: RBAC is the installer's choice, and the pods surface the same errors later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException
from llm_operator.diagnosis import Problem
from llm_operator.kube import Kube
from llm_operator.spec import ApiKeySecretRef, LLMDeploymentSpec, TokenSecretRef

logger = logging.getLogger("fleetlm.operator")


def preflight(
    kube: Kube, namespace: str, spec: LLMDeploymentSpec, *, require_gpu_nodes: bool
) -> Problem | None:
    checks: list[tuple[Callable[..., Problem | None], tuple[Any, ...]]] = [
        (_secret_key, (kube, namespace, ref, what)) for ref, what in _secret_refs(spec)
    ]
    checks += [(_claims, (kube, namespace, spec)), (_priority_class, (kube, spec)), (_ca_bundle, (kube, namespace, spec))]
    if require_gpu_nodes:
        checks.append((_gpu_nodes, (kube, spec)))
    for check, args in checks:
        try:
            problem = check(*args)
        except ApiException as error:
            if error.status != 403:
                raise
            logger.warning(f"preflight check {check.__name__} skipped: forbidden to the operator")
            continue
        if problem is not None:
            return problem
    return None


def _secret_refs(spec: LLMDeploymentSpec) -> list[tuple[TokenSecretRef | ApiKeySecretRef, str]]:
    refs: list[tuple[TokenSecretRef | ApiKeySecretRef, str]] = []
    if spec.model.token_secret_ref is not None:
        refs.append((spec.model.token_secret_ref, "model.tokenSecretRef"))
    if spec.engine.api_key_secret_ref is not None:
        refs.append((spec.engine.api_key_secret_ref, "engine.apiKeySecretRef"))
    return refs


def _secret_key(
    kube: Kube, namespace: str, ref: TokenSecretRef | ApiKeySecretRef, what: str
) -> Problem | None:
    secret = kube.get("v1", "Secret", namespace, ref.name)
    if secret is None:
        return Problem("SecretNotFound", f"{what}: Secret {namespace}/{ref.name} does not exist")
    if ref.key not in (secret.get("data") or {}) and ref.key not in (secret.get("stringData") or {}):
        return Problem("SecretKeyNotFound", f"{what}: Secret {namespace}/{ref.name} has no key {ref.key!r}")
    return None


def _ca_bundle(kube: Kube, namespace: str, spec: LLMDeploymentSpec) -> Problem | None:
    """A mirror's CA bundle must exist with its key, or every pod would wait in ContainerCreating."""
    ca = spec.model.hf.ca_bundle if spec.model.hf is not None else None
    if ca is None:
        return None
    kind, name = ca.source
    found = kube.get("v1", kind, namespace, name)
    if found is None:
        return Problem("CaBundleNotFound", f"model.hf.caBundle: {kind} {namespace}/{name} does not exist")
    if ca.key not in (found.get("data") or {}) and ca.key not in (found.get("stringData") or {}):
        return Problem("CaBundleNotFound", f"model.hf.caBundle: {kind} {namespace}/{name} has no key {ca.key!r}")
    return None


def _claims(kube: Kube, namespace: str, spec: LLMDeploymentSpec) -> Problem | None:
    if (
        spec.model.pvc is not None
        and kube.get("v1", "PersistentVolumeClaim", namespace, spec.model.pvc.claim_name) is None
    ):
        return Problem(
            "ModelClaimNotFound",
            f"model.pvc: PersistentVolumeClaim {namespace}/{spec.model.pvc.claim_name} does not exist",
        )
    claim = spec.cache.existing_claim
    if (
        spec.model.hf is not None
        and claim
        and kube.get("v1", "PersistentVolumeClaim", namespace, claim) is None
    ):
        return Problem(
            "CacheClaimNotFound",
            f"cache.existingClaim: PersistentVolumeClaim {namespace}/{claim} does not exist",
        )
    return None


def _priority_class(kube: Kube, spec: LLMDeploymentSpec) -> Problem | None:
    name = spec.scheduling.priority_class_name
    if name and kube.get("scheduling.k8s.io/v1", "PriorityClass", None, name) is None:
        return Problem(
            "PriorityClassNotFound", f"scheduling.priorityClassName: PriorityClass {name} does not exist"
        )
    return None


def _gpu_nodes(kube: Kube, spec: LLMDeploymentSpec) -> Problem | None:
    gpu = spec.resources.requested_gpu
    if gpu is None:
        return None
    for node in kube.list("v1", "Node", None):
        if int(node.get("status", {}).get("capacity", {}).get(gpu.resource_name, 0)) >= gpu.count:
            return None
    return Problem(
        "UnknownGPUResource",
        f"no node offers {gpu.count} of resource {gpu.resource_name!r}: check resources.gpu.resourceName and the "
        "device plugin (with node autoscaling from zero, run the operator with --no-require-gpu-nodes)",
    )
