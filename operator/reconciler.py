"""Reconcile one LLMDeployment: validate, check, apply the children, observe them, publish status and Events.

All I/O goes through `Kube`; deciding what to build and what the status says is in pure modules (children,
deployment, diagnosis, status). One reconciliation of an object runs at a time (a lock per object), since
kopf calls in for the resource, its children, its pods and the periodic resync on different tasks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException
from llm_operator import metrics, naming, startup
from llm_operator.capacity import Capacity, fit
from llm_operator.children import (
    claim_conflicts,
    claim_grows,
    desired_children,
    manages_cache,
    referenced_claims,
)
from llm_operator.config import OperatorConfig
from llm_operator.deployment import desired_replicas
from llm_operator.diagnosis import Problem, diagnose, unscheduled
from llm_operator.drift import drifted
from llm_operator.hub import Resolver
from llm_operator.kube import Kube, api_error_message
from llm_operator.naming import HubPin
from llm_operator.pinning import PinState, pin_revision
from llm_operator.preflight import preflight
from llm_operator.spec import InvalidSpec, LLMDeploymentSpec, check_name, parse_spec
from llm_operator.status import Observation, compute_status, transitions

logger = logging.getLogger("fleetlm.operator")

# Every kind the operator may have created, for pruning what a spec no longer asks for.
CHILD_KINDS = (
    ("v1", "PersistentVolumeClaim"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
)
MONITORING = ("monitoring.coreos.com", "v1", "servicemonitors")
APPLY_ATTEMPTS = 3
LOG_TAIL_LINES = 20  # the downloader logs a progress line every 10 s among a few per-file lines
STATUS_ATTEMPTS = 5
# Refusals a retry cannot fix: the spec (or the operator's RBAC) must change first.
REFUSALS = {400: "ChildRejected", 404: "ChildRejected", 422: "ChildRejected", 403: "OperatorForbidden"}


class TransientError(Exception):
    """The API failed in a way worth retrying later (server errors, network, conflicts that kept coming)."""


@dataclass(frozen=True, slots=True)
class ChildChange:
    """A watch event on a child: `live` is None when it was deleted."""

    kind: str
    name: str
    live: dict[str, Any] | None


@dataclass(slots=True)
class Ownership:
    """Which children of one LLMDeployment are its own, as far as the operator has seen. An object of a
    child's kind and name without an ownerReference to it (made by hand or by another tool, or orphaned
    by --cascade=orphan) is a conflict: a forced server-side apply would silently take it over, so it is
    left alone. A child once seen as ours stays ours until a watch event says otherwise, so a child is
    read only the first time (and while it conflicts)."""

    ours: set[tuple[str, str]] = field(default_factory=set)
    conflicts: dict[tuple[str, str], Problem] = field(default_factory=dict)
    # The generation whose children were all applied (by this operator process). Until then a child's
    # watch event applies the whole set again, not that child: a spec the API refused must not reach
    # the cluster one repaired child at a time (status's observedGeneration says it was seen, not applied).
    applied: int | None = None

    def observe(self, change: ChildChange, owner: dict[str, Any]) -> None:
        """A watch event on a child (matched by our labels, which anyone can copy)."""
        key = (change.kind, change.name)
        if change.live is None:
            self.ours.discard(key)
        elif naming.owned_by(change.live, owner["uid"]):
            self.ours.add(key)
            self.conflicts.pop(key, None)
        else:
            self.ours.discard(key)
            self.conflicts[key] = _conflict(owner["namespace"], *key)


def _terminating_claim(body: dict[str, Any], live_claim: dict[str, Any] | None) -> Problem | None:
    """Our cache claim is being deleted (to be recreated: the remedy for a claim that cannot change).
    Kubernetes keeps a claim while pods mount it (pvc-protection), and pods of a deleted claim cannot
    start: the serving pods are stopped so that it can go, and the claim and the pods come back once
    it is gone."""
    if live_claim is None or not live_claim["metadata"].get("deletionTimestamp"):
        return None
    if not naming.owned_by(live_claim, body["metadata"]["uid"]):
        return None
    return Problem(
        "CacheClaimTerminating",
        f"PersistentVolumeClaim {live_claim['metadata']['name']} is being deleted: the serving pods are stopped "
        "so that Kubernetes can remove it (it keeps a claim while pods mount it); once it is gone the operator "
        "recreates it, the model is downloaded again and the pods start",
    )


def _stopped(deployment: dict[str, Any]) -> dict[str, Any]:
    return {**deployment, "spec": {**deployment["spec"], "replicas": 0}}


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        resolver: Resolver | None = None,
    ):
        self.kube = kube
        self.config = config
        self.resolver = resolver or Resolver(recheck_s=config.revision_recheck_seconds)
        self.now = now
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._owners: dict[tuple[str, str], Ownership] = {}
        self._guard = threading.Lock()
        self._instance = os.environ.get("POD_NAME") or socket.gethostname()

    def reconcile(
        self,
        namespace: str,
        name: str,
        *,
        trigger: str,
        apply_all: bool = False,
        change: ChildChange | None = None,
    ) -> None:
        """apply_all: apply every child (spec change, resume, resync); change: repair that child if it
        drifted; neither: refresh the status only. Raises TransientError when worth retrying."""
        started = time.monotonic()
        try:
            with self._lock(namespace, name):
                result = self._reconcile(namespace, name, trigger, apply_all, change)
        except ApiException as error:
            metrics.ERRORS.labels(trigger, f"http_{error.status}").inc()
            raise TransientError(f"API error {error.status}: {api_error_message(error)}") from error
        except urllib3.exceptions.HTTPError as error:
            metrics.ERRORS.labels(trigger, "network").inc()
            raise TransientError(f"API unreachable: {error}") from error
        except TransientError:
            metrics.ERRORS.labels(trigger, "conflict").inc()
            raise
        else:
            metrics.RECONCILES.labels(trigger, result).inc()
        finally:
            metrics.DURATION.labels(trigger).observe(time.monotonic() - started)

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._locks.pop((namespace, name), None)
            self._owners.pop((namespace, name), None)
        for gauge in (metrics.READY_REPLICAS, metrics.DESIRED_REPLICAS, metrics.DEGRADED):
            with contextlib.suppress(KeyError):  # never exported
                gauge.remove(namespace, name)

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def _reconcile(
        self, namespace: str, name: str, trigger: str, apply_all: bool, change: ChildChange | None
    ) -> str:
        body = self.kube.get(naming.API_VERSION, naming.KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return "gone"  # the garbage collector removes the children through their ownerReferences
        generation = body["metadata"].get("generation", 1)
        first_time = generation != (body.get("status") or {}).get("observedGeneration")
        try:
            spec, blocker, notes, pin, capacity = self._plan_and_apply(body, generation, first_time, apply_all, change)
        except (ApiException, urllib3.exceptions.HTTPError, TransientError):
            raise  # the API's trouble, not the resource's: retried
        except Exception as error:  # noqa: BLE001 - a bug or an input no rule foresaw must still be reported
            logger.exception(f"{namespace}/{name}: reconciling failed")
            metrics.ERRORS.labels(trigger, "internal").inc()
            spec, notes, pin, capacity = None, (), None, None
            blocker = Problem("InternalError", f"the operator failed to reconcile this resource: {type(error).__name__}: {error}")
        if blocker is not None:
            logger.info(
                f"{namespace}/{name} not applied: {blocker.message}",
                extra={"reason": blocker.reason, "trigger": trigger},
            )
        self._publish(body, spec, blocker, generation, notes, pin, capacity)
        return "degraded" if blocker or notes else "ok"

    def _plan_and_apply(
        self, body: dict[str, Any], generation: int, first_time: bool, apply_all: bool, change: ChildChange | None
    ) -> tuple[LLMDeploymentSpec | None, Problem | None, tuple[Problem, ...], PinState | None, Capacity | None]:
        """Parse the spec, check it, pin the model, plan its fit, and apply the children (all of them, or
        the one that changed): what the status then reports."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        spec: LLMDeploymentSpec | None = None
        notes: tuple[Problem, ...] = ()
        pin: PinState | None = None
        capacity: Capacity | None = None
        try:
            spec = parse_spec(body.get("spec") or {})
            bad_name = check_name(name)
            if bad_name is not None:
                raise InvalidSpec(bad_name)
        except InvalidSpec as error:
            spec = None
            blocker: Problem | None = Problem("InvalidSpec", str(error))
        else:
            blocker = preflight(self.kube, namespace, spec, require_gpu_nodes=self.config.require_gpu_nodes)
        if spec is not None and blocker is None:
            pin = pin_revision(self.kube, self.resolver, body, spec, self.config.hf_endpoint)
            if pin is not None and pin.facts is not None:
                capacity = fit(spec, pin.facts, dict(self.config.gpu_memory))
                if capacity is not None and not capacity.fits:
                    blocker = Problem("DoesNotFit", f"the model {capacity.message}")
        if spec is not None and blocker is None:
            hub = pin.hub if pin is not None else HubPin(self.config.hf_endpoint)
            live_claim = None
            if manages_cache(spec):
                live_claim = self.kube.get("v1", "PersistentVolumeClaim", namespace, naming.cache_claim_name(name))
            terminating = _terminating_claim(body, live_claim)
            if change is not None and (change.kind, change.name) == ("PersistentVolumeClaim", naming.cache_claim_name(name)):
                # The cache claim going (kubectl delete pvc) or gone: the Deployment's replicas change with it.
                apply_all = apply_all or terminating is not None or change.live is None
            expandable = self._expandable(spec, live_claim)
            desired = self._servable(
                body,
                desired_children(body, spec, self._default_image(spec), live_claim, hub, expandable),
                first_time,
            )
            if terminating is not None:
                desired = [_stopped(c) if c["kind"] == "Deployment" else c for c in desired]
            ownership = self._ownership(namespace, name)
            unapplied = ownership.applied != generation
            if apply_all or unapplied:
                self._check_ownership(body, desired, live_claim, ownership)
            elif change is not None and (change.kind, change.name) in {_key(c) for c in desired}:
                ownership.observe(change, body["metadata"])
            desired = [c for c in desired if _key(c) not in ownership.conflicts]
            if ("PersistentVolumeClaim", naming.cache_claim_name(name)) in ownership.conflicts:
                live_claim = None  # not ours: nothing to say about what it cannot change
            notes = tuple(ownership.conflicts.values()) + tuple(claim_conflicts(spec, live_claim, expandable))
            notes += (terminating,) if terminating is not None else ()
            if apply_all or unapplied:
                blocker = self._apply_all(body, spec, desired, dry_run_first=unapplied)
                if blocker is None:
                    ownership.ours |= {_key(c) for c in desired}
                    ownership.applied = generation
            elif change is not None:
                blocker = self._repair(desired, change)
        return spec, blocker, notes, pin, capacity

    def _ownership(self, namespace: str, name: str) -> Ownership:
        with self._guard:
            return self._owners.setdefault((namespace, name), Ownership())

    def _check_ownership(
        self, body: dict[str, Any], desired: list[dict[str, Any]], live_claim: dict[str, Any] | None, ownership: Ownership
    ) -> None:
        """Before everything is applied: read each child not yet known to be ours (the cache claim is read
        already), and record a conflict for one that exists without our ownerReference."""
        meta = body["metadata"]
        ownership.conflicts.clear()
        for child in desired:
            key = _key(child)
            if key in ownership.ours:
                continue
            live = live_claim if child["kind"] == "PersistentVolumeClaim" else self._read(child)
            if live is not None and naming.owned_by(live, meta["uid"]):
                ownership.ours.add(key)
            elif live is not None:
                ownership.conflicts[key] = _conflict(meta["namespace"], *key)

    def _read(self, child: dict[str, Any]) -> dict[str, Any] | None:
        meta = child["metadata"]
        try:
            return self.kube.get(child["apiVersion"], child["kind"], meta["namespace"], meta["name"])
        except ApiException as error:
            if error.status != 403:
                raise
            logger.warning(f"{child['kind']} {meta['namespace']}/{meta['name']} not read (forbidden): applied unchecked")
            return None

    def _expandable(self, spec: LLMDeploymentSpec, live_claim: dict[str, Any] | None) -> bool:
        """Whether the cache claim may grow as the spec asks: its StorageClass sets allowVolumeExpansion.
        Read only when the spec asks for more; a claim without a class, a class that does not exist or
        one the operator may not read counts as expandable, and the API has the last word."""
        if live_claim is None or not claim_grows(spec, live_claim):
            return True
        class_name = live_claim["spec"].get("storageClassName")
        if not class_name:
            return True
        try:
            storage_class = self.kube.get("storage.k8s.io/v1", "StorageClass", None, class_name)
        except ApiException as error:
            if error.status != 403:
                raise
            logger.warning(f"StorageClass {class_name} not read (forbidden to the operator): assuming it allows expansion")
            return True
        return storage_class is None or storage_class.get("allowVolumeExpansion") is True

    def _default_image(self, spec: LLMDeploymentSpec) -> str:
        if spec.resources.requested_gpu is None and self.config.default_cpu_image:
            return self.config.default_cpu_image
        return self.config.default_image

    def _servable(
        self, body: dict[str, Any], desired: list[dict[str, Any]], announce: bool
    ) -> list[dict[str, Any]]:
        """Drop a ServiceMonitor when the cluster has no prometheus-operator (and say so, once per spec)."""
        if not any(c["kind"] == "ServiceMonitor" for c in desired) or self.kube.serves(*MONITORING):
            return desired
        if announce:
            self._event(
                body,
                "Warning",
                "ServiceMonitorSkipped",
                "monitoring.serviceMonitor is set, but the cluster does not serve monitoring.coreos.com/v1 "
                "ServiceMonitors (prometheus-operator is not installed); no ServiceMonitor was created",
            )
        return [c for c in desired if c["kind"] != "ServiceMonitor"]

    def _apply_all(
        self, body: dict[str, Any], spec: LLMDeploymentSpec, desired: list[dict[str, Any]], *, dry_run_first: bool
    ) -> Problem | None:
        child: dict[str, Any] = {}
        try:
            # A server-side dry run of the whole set first: a child the API refuses then leaves nothing
            # half-created (admission and validation run, nothing is stored).
            if dry_run_first:
                for child in desired:
                    self.kube.apply(child, dry_run=True)
            for child in desired:
                self._apply(child)
        except ApiException as error:
            return _refusal(child, error)
        self._prune(body, desired, referenced_claims(spec))
        return None

    def _repair(self, desired: list[dict[str, Any]], change: ChildChange) -> Problem | None:
        child = next(
            (c for c in desired if (c["kind"], c["metadata"]["name"]) == (change.kind, change.name)), None
        )
        if child is None or not drifted(child, change.live):
            return None
        logger.info(
            f"restoring {change.kind} {child['metadata']['namespace']}/{change.name}",
            extra={"deleted": change.live is None},
        )
        try:
            self._apply(child)
        except ApiException as error:
            return _refusal(child, error)
        return None

    def _apply(self, child: dict[str, Any]) -> None:
        for attempt in range(APPLY_ATTEMPTS):
            try:
                self.kube.apply(child)
                return
            except ApiException as error:
                if error.status != 409 or attempt == APPLY_ATTEMPTS - 1:
                    raise
                time.sleep(0.1 * 2**attempt)

    def _prune(self, body: dict[str, Any], desired: list[dict[str, Any]], claims: set[str]) -> None:
        """Delete the children this resource owns that the spec no longer wants, but for a claim the spec
        now names as it is (cache.existingClaim or model.pvc pointed at the operator's own cache claim, the
        way to keep a cache): that one is released, its ownerReference dropped, so that neither this
        prune nor the garbage collector after the LLMDeployment deletes the cache it names."""
        meta = body["metadata"]
        keep = {(c["kind"], c["metadata"]["name"]) for c in desired}
        selector = f"{naming.INSTANCE_LABEL}={meta['name']}"
        for api_version, kind in CHILD_KINDS:
            if kind == "ServiceMonitor" and not self.kube.serves(*MONITORING):
                continue
            for live in self.kube.list(api_version, kind, meta["namespace"], selector):
                owners = live["metadata"].get("ownerReferences", [])
                mine = any(ref.get("uid") == meta["uid"] for ref in owners)
                if mine and kind == "PersistentVolumeClaim" and live["metadata"]["name"] in claims:
                    self._release(live, meta["uid"])
                elif mine and (kind, live["metadata"]["name"]) not in keep:
                    logger.info(
                        f"deleting {kind} {meta['namespace']}/{live['metadata']['name']}: no longer in the spec"
                    )
                    self.kube.delete(api_version, kind, meta["namespace"], live["metadata"]["name"])

    def _release(self, live: dict[str, Any], uid: str) -> None:
        meta = live["metadata"]
        others = [ref for ref in meta.get("ownerReferences", []) if ref.get("uid") != uid]
        logger.info(f"releasing PersistentVolumeClaim {meta['namespace']}/{meta['name']}: the spec names it as it is")
        # resourceVersion: a claim changed since the list is left for the next reconcile to look at again.
        patch = {"metadata": {"ownerReferences": others or None, "resourceVersion": meta["resourceVersion"]}}
        self.kube.merge_patch("v1", "PersistentVolumeClaim", meta["namespace"], meta["name"], patch)

    def _publish(
        self,
        body: dict[str, Any],
        spec: LLMDeploymentSpec | None,
        blocker: Problem | None,
        generation: int,
        notes: tuple[Problem, ...] = (),
        pin: PinState | None = None,
        capacity: Capacity | None = None,
    ) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        deployment = self.kube.get("apps/v1", "Deployment", namespace, name)
        pods = self.kube.list("v1", "Pod", namespace, naming.selector_string(name))
        owner = naming.Owner.of(body)
        model = naming.model_uri(spec, pin.hub.commit if pin else None) if spec else ""
        claim = None  # read only to explain a pod the scheduler cannot place
        if spec is not None and manages_cache(spec) and any(unscheduled(p) is not None for p in pods):
            claim = self.kube.get("v1", "PersistentVolumeClaim", namespace, naming.cache_claim_name(name))
        seen = Observation(
            generation=generation,
            model=model,
            endpoint=naming.endpoint(owner, spec) if spec else "",
            selector=naming.selector_string(name),
            from_volume=spec is not None and spec.model.pvc is not None,
            desired_replicas=desired_replicas(spec) if spec else 0,
            deployment=deployment,
            report=diagnose(pods, deployment, model, claim),
            blocker=blocker,
            notes=notes,
            pin=pin,
            capacity=capacity.status() if capacity is not None else None,
            startup=self._startup(namespace, pods, model),
        )
        for _ in range(STATUS_ATTEMPTS):
            old = body.get("status") or {}
            new = compute_status(old, seen, self.now().strftime("%Y-%m-%dT%H:%M:%SZ"))
            _export(namespace, name, new, seen.desired_replicas)
            if new == old:
                return
            try:
                self.kube.patch_status(body, new)
            except ApiException as error:
                if error.status != 409:
                    raise
                fresh = self.kube.get(naming.API_VERSION, naming.KIND, namespace, name)
                if fresh is None:
                    return
                body = fresh
                continue
            for change in transitions(old.get("conditions", []), new["conditions"]):
                self._event(body, change.type, change.reason, change.message)
            return
        raise TransientError(f"the status of {namespace}/{name} kept changing under the operator")

    def _startup(self, namespace: str, pods: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
        """The newest pod of the current model's cold-start timeline (status.startup)."""
        current = [p for p in pods if naming.runs_model(p, model)]
        pod = startup.newest_pod(current)
        if pod is None:
            return None
        log_tail = None
        if (container := startup.downloading(pod)) is not None:
            try:
                log_tail = self.kube.pod_log(namespace, pod["metadata"]["name"], container, LOG_TAIL_LINES)
            except ApiException as error:  # pods/log forbidden, or not yet readable: times only
                logger.debug(f"no download progress from the log: {api_error_message(error)}")
        return startup.timeline(pod, log_tail)

    def _event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        now = self.now().strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": naming.API_VERSION,
                "kind": naming.KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": naming.MANAGED_BY},
            "reportingComponent": "fleetlm.dev/operator",
            "reportingInstance": self._instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.kube.create_event(meta["namespace"], event)
        except ApiException as error:  # Events are for humans; losing one must not fail the reconciliation
            logger.warning(f"could not post Event {reason}: {api_error_message(error)}")


def _export(namespace: str, name: str, status: dict[str, Any], desired: int) -> None:
    """The observed state as the operator's per-LLMDeployment gauges."""
    degraded = any(c["type"] == "Degraded" and c["status"] == "True" for c in status.get("conditions", []))
    metrics.READY_REPLICAS.labels(namespace, name).set(status.get("readyReplicas", 0))
    metrics.DESIRED_REPLICAS.labels(namespace, name).set(desired)
    metrics.DEGRADED.labels(namespace, name).set(1 if degraded else 0)


def _key(child: dict[str, Any]) -> tuple[str, str]:
    return child["kind"], child["metadata"]["name"]


def _conflict(namespace: str, kind: str, name: str) -> Problem:
    return Problem(
        "ChildConflict",
        f"{kind} {namespace}/{name} already exists and does not belong to this LLMDeployment (no ownerReference "
        "to it), so the operator leaves it as it is and manages everything else: delete it "
        f"(kubectl delete {kind.lower()} -n {namespace} {name}) and the operator creates its own",
    )


def _refusal(child: dict[str, Any], error: ApiException) -> Problem:
    reason = REFUSALS.get(error.status)
    if reason is None:
        raise error
    meta = child["metadata"]
    return Problem(
        reason,
        f"the API refused {child['kind']} {meta['namespace']}/{meta['name']}: {api_error_message(error)}",
    )
