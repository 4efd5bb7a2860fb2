"""Thin, dict-in dict-out access to the Kubernetes API through the official client.

Children are written with server-side apply (one PATCH per child, field manager `fleetlm-operator`, forced):
the API server creates what is missing, takes back fields edited by hand, drops fields the operator stopped
setting, and persists nothing when nothing changed, so re-applying is cheap and raises no watch events.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import kubernetes
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

FIELD_MANAGER = "fleetlm-operator"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"

# Plural names of the kinds the operator touches; the core group goes through CoreV1Api's per-kind methods.
PLURALS = {
    "ClusterKopfPeering": "clusterkopfpeerings",
    "ConfigMap": "configmaps",
    "Deployment": "deployments",
    "KopfPeering": "kopfpeerings",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "LLMDeployment": "llmdeployments",
    "Node": "nodes",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Pod": "pods",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "PriorityClass": "priorityclasses",
    "Secret": "secrets",
    "Service": "services",
    "ServiceMonitor": "servicemonitors",
    "StorageClass": "storageclasses",
}


def connect() -> ApiClient:
    """In a pod: its service account. Elsewhere: $KUBECONFIG (read now, not at import) or ~/.kube/config."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config()
    else:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return ApiClient(kubernetes.client.Configuration.get_default_copy())


class Kube:
    def __init__(self, api: ApiClient) -> None:
        self.api = api
        self.core = CoreV1Api(api)
        self.custom = CustomObjectsApi(api)

    def apply(self, manifest: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        meta = manifest["metadata"]
        options: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": APPLY}
        if dry_run:
            options["dry_run"] = "All"
        return self._call(
            "patch",
            manifest["apiVersion"],
            manifest["kind"],
            meta["namespace"],
            meta["name"],
            body=manifest,
            **options,
        )

    def merge_patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._call("patch", api_version, kind, namespace, name, body=patch, _content_type=MERGE)

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self._call("read", api_version, kind, namespace, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        options = {"label_selector": label_selector} if label_selector else {}
        return self._call("list", api_version, kind, namespace, None, **options)["items"]

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            self._call("delete", api_version, kind, namespace, name)
        except ApiException as error:
            if error.status != 404:
                raise

    def patch_status(self, body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """Replace the status of an LLMDeployment, only if it is unchanged since `body` was read (else 409).
        A merge patch keeps keys it does not mention: those the new status dropped are sent as null."""
        group, version = body["apiVersion"].split("/")
        meta = body["metadata"]
        replacing = merge_patch(body.get("status") or {}, status)
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": replacing}
        return _json(
            self.custom.patch_namespaced_custom_object_status(
                group, version, meta["namespace"], "llmdeployments", meta["name"], patch,
                _content_type=MERGE, _preload_content=False,
            )
        )  # fmt: skip

    def pod_log(self, namespace: str, name: str, container: str, tail_lines: int) -> str:
        response = self.core.read_namespaced_pod_log(
            name, namespace, container=container, tail_lines=tail_lines, _preload_content=False
        )
        return response.data.decode("utf-8", errors="replace")

    def create_event(self, namespace: str, event: dict[str, Any]) -> None:
        self.core.create_namespaced_event(namespace, event, _preload_content=False)

    def serves(self, group: str, version: str, plural: str) -> bool:
        """Whether the API serves a resource (e.g. a CRD's kind) now."""
        try:
            resources = _json(self.custom.get_api_resources(group, version, _preload_content=False))
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return any(r["name"] == plural for r in resources.get("resources", []))

    def _call(
        self, verb: str, api_version: str, kind: str, namespace: str | None, name: str | None, **kwargs: Any
    ) -> Any:
        kwargs["_preload_content"] = False
        if _is_core(api_version):
            scope = "namespaced_" if namespace else ""
            method = getattr(self.core, f"{verb}_{scope}{_snake(kind)}")
            positional = [a for a in (name, namespace) if a is not None]
            return _json(method(*positional, **kwargs))
        group, version = api_version.split("/")
        plural = PLURALS[kind]
        if namespace:
            method = getattr(self.custom, f"{_custom_verb(verb)}_namespaced_custom_object")
            positional = [group, version, namespace, plural] + ([name] if name else [])
        else:
            method = getattr(self.custom, f"{_custom_verb(verb)}_cluster_custom_object")
            positional = [group, version, plural] + ([name] if name else [])
        return _json(method(*positional, **kwargs))


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: removed keys become null."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        patch[key] = merge_patch(before, value) if isinstance(value, dict) and isinstance(before, dict) else value
    return patch


def api_error_message(error: ApiException) -> str:
    """The API server's own explanation (a Status object's message), else the HTTP reason."""
    try:
        return json.loads(error.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"{error.status} {error.reason}"


def _json(response: Any) -> Any:
    return json.loads(response.data) if response.data else {}


def _is_core(api_version: str) -> bool:
    return "/" not in api_version


def _snake(kind: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


def _custom_verb(verb: str) -> str:
    return {"read": "get"}.get(verb, verb)
