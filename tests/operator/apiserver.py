"""kmock's KubernetesEmulator with the API-server behaviour the operator relies on, in a background thread.

kmock stores and merges JSON and nothing more. Added here, as the real API server does them: uid,
resourceVersion, generation, creationTimestamp and a created object's namespace; server-side apply that creates a missing object and
replaces the applied fields; dry runs that store nothing; status subresources (a status write touches only
status, a main-resource write never touches it); resourceVersion preconditions answered with 409; an object
being deleted that goes when a patch removes its last finalizer; equality label selectors on lists; a PersistentVolumeClaim's immutable spec (only a larger storage
request may change, and only once the claim is bound), refused with the API server's own 422 messages; the PersistentVolumeClaimResize
admission plugin (a larger request only where the claim's StorageClass sets allowVolumeExpansion, else
its 403; claims without a class are not checked, as this API has no default StorageClass); and a 403 for
the resources a test forbids (`forbid`), as RBAC would answer. Still absent: other validation,
defaulting, garbage collection, field ownership, admission and RBAC beyond those.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
from kmock._internal import dicts, enums, rendering
from kubernetes.utils.quantity import parse_quantity

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
RESOURCES = {
    "fleetlm.dev/v1alpha1/llmdeployments": ("LLMDeployment", True, ["status", "scale"]),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, []),
    "v1/namespaces": ("Namespace", False, []),
    "v1/nodes": ("Node", False, ["status"]),
    "v1/pods": ("Pod", True, ["status", "log"]),
    "v1/services": ("Service", True, ["status"]),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", True, ["status"]),
    "v1/secrets": ("Secret", True, []),
    "v1/configmaps": ("ConfigMap", True, []),
    "v1/events": ("Event", True, []),
    "apps/v1/deployments": ("Deployment", True, ["status", "scale"]),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", True, ["status"]),
    "autoscaling/v2/horizontalpodautoscalers": ("HorizontalPodAutoscaler", True, ["status"]),
    "scheduling.k8s.io/v1/priorityclasses": ("PriorityClass", False, []),
    "storage.k8s.io/v1/storageclasses": ("StorageClass", False, []),
}
SERVICE_MONITORS = "monitoring.coreos.com/v1/servicemonitors"


class ApiServer(kmock.KubernetesEmulator):
    _versions = itertools.count(1)
    # What containers have written, as the kubelet would serve it: (namespace, pod, container) -> text.
    pod_logs: dict[tuple[str, str, str], str] = {}
    # Resources (plurals) every request for which is refused with 403, as RBAC without a rule would.
    forbidden: set[str] = set()
    # kmock matches each request against its reactions by scanning every request it has recorded (a
    # view's __contains__ iterates the root), so each request costs more than the one before: late in a
    # session a reconciliation took seconds longer than early on. Matching needs only the requests in
    # flight; every request stays in _requests for the tests that read them.
    MATCHED_WINDOW = 256

    def __iter__(self) -> Iterator[rendering.Request]:
        yield from self._requests[-self.MATCHED_WINDOW :]

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.resource.plural in self.forbidden:
            raise kmock.KubernetesError(
                403, "Forbidden", f'{request.resource.plural} "{request.name or ""}" is forbidden: the test forbids it'
            )
        if request.resource is not None and request.resource.plural == "pods" and request.subresource == "log":
            key = (request.namespace or "", request.name or "", request.params.get("container", ""))
            if key not in self.pod_logs:
                raise kmock.KubernetesError(400, "BadRequest", f'container "{key[2]}" in pod "{key[1]}" is waiting to start')
            lines = self.pod_logs[key].splitlines(keepends=True)
            tail = int(request.params.get("tailLines", len(lines)))
            return aiohttp.web.Response(text="".join(lines[-tail:] if tail else []))
        if request.resource is not None and request.action == enums.action.CREATE:
            # In place: kmock routes only the very request objects it has recorded.
            request.data.setdefault("metadata", {}).update(self._stamped(request.data)["metadata"])
            if request.namespace:  # the API server fills in the namespace of the path
                request.data["metadata"]["namespace"] = request.namespace
        elif request.resource is not None and request.action == enums.action.UPDATE and request.name:
            return await self._patch(request)
        elif (
            request.resource is not None
            and request.action == enums.action.LIST
            and "labelSelector" in request.params
        ):
            wanted = dict(pair.split("=", 1) for pair in request.params["labelSelector"].split(","))
            response = await super()._handle(request)
            items = [
                o
                for o in _json(response)["items"]
                if wanted.items() <= o["metadata"].get("labels", {}).items()
            ]
            return aiohttp.web.json_response({"metadata": {}, "items": items})
        return await super()._handle(request)

    def _stamped(self, obj: dict[str, Any], **meta: Any) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {}).update(
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self._versions)),
            generation=1,
            creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **meta,
        )
        return obj

    async def _patch(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        key = (request.resource, request.namespace, request.name)
        is_apply = request.headers.get("Content-Type", "").startswith("application/apply-patch")
        dry_run = request.params.get("dryRun") == "All"
        patch = request.data
        async with self._lock:
            exists = key in self._objects and not self._objects[key].deleted
            if not exists and not is_apply:
                raise kmock.KubernetesObjectNotFoundError()
            if not exists:
                new = self._stamped(patch, namespace=request.namespace)
                new.pop("status", None)
                if not dry_run:
                    if key in self._objects:
                        self._objects[key].create(new)
                    else:
                        self._objects[key] = new
                    await self._buses[request.resource].put({"type": "ADDED", "object": new})
                return aiohttp.web.json_response(new, status=201)

            old = copy.deepcopy(self._objects[key].raw)
            expected = patch.get("metadata", {}).get("resourceVersion") if isinstance(patch, dict) else None
            if expected is not None and expected != old["metadata"]["resourceVersion"]:
                raise kmock.KubernetesError(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                )
            new = _patched(old, patch, is_apply, request.subresource == "status")
            if request.resource.plural == "persistentvolumeclaims":
                _check_claim_update(old, new)
                self._check_claim_resize(old, new)
            if new != old:
                new["metadata"]["resourceVersion"] = str(next(self._versions))
                if _body(new) != _body(old):
                    new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
                if not dry_run:
                    self._objects[key].create(new)
                    await self._buses[request.resource].put({"type": "MODIFIED", "object": new})
                    if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
                        self._objects[key].delete()  # its last finalizer removed: the object goes
                        await self._buses[request.resource].put({"type": "DELETED", "object": new})
            return aiohttp.web.json_response(new)


    def _check_claim_resize(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """As the PersistentVolumeClaimResize admission plugin (k8s.io/kubernetes plugin/pkg/admission/
        storage/persistentvolume/resize): a larger request needs a StorageClass with allowVolumeExpansion."""
        was, now = (o.get("spec", {}).get("resources", {}).get("requests", {}).get("storage") for o in (old, new))
        class_name = new.get("spec", {}).get("storageClassName")
        if not (was and now and class_name) or parse_quantity(now) <= parse_quantity(was):
            return
        classes = [
            o.raw for (resource, _, name), o in self._objects.items()
            if resource.plural == "storageclasses" and name == class_name and not o.deleted
        ]  # fmt: skip
        if not classes or classes[0].get("allowVolumeExpansion") is not True:
            raise kmock.KubernetesError(
                403,
                "Forbidden",
                f'persistentvolumeclaims "{old["metadata"]["name"]}" is forbidden: only dynamically provisioned pvc '
                "can be resized and the storageclass that provisions the pvc must support resize",
            )


class BackgroundApiServer:
    """The emulator on a local port, served from its own thread and event loop, so that the operator
    (another thread) and synchronous test code can both talk to it over HTTP."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundApiServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def set_pod_log(self, namespace: str, pod: str, container: str, text: str) -> None:
        self._loop.call_soon_threadsafe(self.emulator.pod_logs.__setitem__, (namespace, pod, container), text)

    def forbid(self, *plurals: str) -> None:
        """Refuse every request for these resources with 403 from now on (none: allow all again)."""
        async def change() -> None:
            self.emulator.forbidden = set(plurals)

        asyncio.run_coroutine_threadsafe(change(), self._loop).result(5)

    def serve_service_monitors(self, served: bool) -> None:
        def change() -> None:
            if served:
                self.emulator.resources[SERVICE_MONITORS] = kmock.ResourceInfo(
                    kind="ServiceMonitor", namespaced=True, verbs=VERBS
                )
            else:
                del self.emulator.resources[SERVICE_MONITORS]

        self._loop.call_soon_threadsafe(change)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with ApiServer() as emulator, kmock.Server(emulator) as server:
            for path, (kind, namespaced, subresources) in RESOURCES.items():
                emulator.resources[path] = kmock.ResourceInfo(
                    kind=kind, namespaced=namespaced, verbs=VERBS, subresources=subresources
                )
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()


def _patched(old: dict[str, Any], patch: Any, is_apply: bool, status_only: bool) -> dict[str, Any]:
    if isinstance(patch, list):
        try:
            new = jsonpatch.apply_patch(old, patch)
        except jsonpatch.JsonPatchTestFailed as error:  # what the API server answers to a failed "test" op
            raise kmock.KubernetesError(422, "Invalid", str(error)) from None
    elif is_apply:
        # The applied configuration is the full intent: top-level fields are replaced, metadata merged.
        new = {**old, **{k: v for k, v in patch.items() if k not in ("metadata", "status")}}
        meta = {
            k: v
            for k, v in patch.get("metadata", {}).items()
            if k not in ("resourceVersion", "uid", "generation")
        }
        new["metadata"] = {**old["metadata"], **meta}
    else:
        patch = {k: v for k, v in patch.items() if k != "metadata" or not status_only}
        patch.get("metadata", {}).pop("resourceVersion", None)
        new = dict(dicts.patch_dict(old, patch))
    # A status subresource write changes the status only; any other write never does.
    if status_only:
        return {**old, "status": new.get("status")}
    return (
        {**new, "status": old["status"]}
        if "status" in old
        else {k: v for k, v in new.items() if k != "status"}
    )


def _check_claim_update(old: dict[str, Any], new: dict[str, Any]) -> None:
    """As the API server validates a PVC update (k8s.io/kubernetes pkg/apis/core/validation,
    ValidatePersistentVolumeClaimUpdate): the spec is immutable except resources.requests (and
    volumeAttributesClassName) of a bound claim, and the storage request may only grow. A claim not yet
    bound (status.phase other than Bound) may not change at all."""
    name = old["metadata"]["name"]
    before, after = old.get("spec", {}), new.get("spec", {})
    bound = (old.get("status") or {}).get("phase") == "Bound"

    def without_requests(spec: dict[str, Any]) -> dict[str, Any]:
        if not bound:
            return spec
        rest = {k: v for k, v in spec.items() if k not in ("resources", "volumeAttributesClassName")}
        limits = spec.get("resources", {}).get("limits")
        return {**rest, "limits": limits}

    if without_requests(before) != without_requests(after):
        raise kmock.KubernetesError(
            422,
            "Invalid",
            f'PersistentVolumeClaim "{name}" is invalid: spec: Forbidden: spec is immutable after creation '
            "except resources.requests and volumeAttributesClassName for bound claims",
        )
    was = before.get("resources", {}).get("requests", {}).get("storage")
    now = after.get("resources", {}).get("requests", {}).get("storage")
    if was and now and parse_quantity(now) < parse_quantity(was):
        raise kmock.KubernetesError(
            422,
            "Invalid",
            f'PersistentVolumeClaim "{name}" is invalid: spec.resources.requests.storage: Forbidden: '
            "field can not be less than status.capacity",
        )


def _body(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _json(response: aiohttp.web.StreamResponse) -> Any:
    assert isinstance(response, aiohttp.web.Response) and response.body is not None
    return json.loads(response.body)
