"""kopf wiring: which events reach the reconciler, and how.

- The LLMDeployment's spec (create, update, operator restart): apply every child.
- A child changed or was deleted: repair it if it drifted from the spec, then refresh the status.
- A serving pod changed: refresh the status (download progress, pull errors, scheduling).
- Every `--resync-seconds`: apply every child again (catches what no event reports, e.g. a Secret that
  appeared) and refresh the status.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import kubernetes
from llm_operator import naming
from llm_operator.reconciler import ChildChange, Reconciler, TransientError

MANAGED = {"app.kubernetes.io/managed-by": naming.MANAGED_BY}
CHILD_RESOURCES = (
    ("v1", "persistentvolumeclaims"),
    ("v1", "services"),
    ("apps/v1", "deployments"),
    ("policy/v1", "poddisruptionbudgets"),
    ("autoscaling/v2", "horizontalpodautoscalers"),
    ("monitoring.coreos.com/v1", "servicemonitors"),
)
RETRY_DELAY_S = 10


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf uses the credentials the kubernetes client was configured with (kube.connect), so both talk to
    the same cluster as the same identity; rotated service-account tokens are re-read on each call."""
    config = kubernetes.client.Configuration.get_default_copy()
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


def _reconcile(memo: Any, namespace: str, name: str, **how: Any) -> None:
    reconciler: Reconciler = memo.reconciler
    try:
        reconciler.reconcile(namespace, name, **how)
    except TransientError as error:
        raise kopf.TemporaryError(str(error), delay=RETRY_DELAY_S) from error


@kopf.on.resume(naming.GROUP, naming.VERSION, naming.PLURAL)
@kopf.on.create(naming.GROUP, naming.VERSION, naming.PLURAL)
@kopf.on.update(naming.GROUP, naming.VERSION, naming.PLURAL, field="spec")
def spec_changed(namespace: str, name: str, memo: Any, **_: Any) -> None:
    _reconcile(memo, namespace, name, trigger="spec", apply_all=True)


@kopf.on.delete(naming.GROUP, naming.VERSION, naming.PLURAL, optional=True)
def deleted(namespace: str, name: str, memo: Any, **_: Any) -> None:
    # optional: this handler adds no finalizer of its own (the garbage collector deletes the children via their
    # ownerReferences); the resync daemon below does need kopf's, which the chart's pre-delete hook removes.
    memo.reconciler.forget(namespace, name)


def child_changed(event: dict[str, Any], body: Any, namespace: str, memo: Any, **_: Any) -> None:
    owner = body.get("metadata", {}).get("labels", {}).get(naming.INSTANCE_LABEL)
    if not owner:
        return
    live = None if event["type"] == "DELETED" else dict(body)
    change = ChildChange(kind=body["kind"], name=body["metadata"]["name"], live=live)
    _reconcile(memo, namespace, owner, trigger="child", change=change)


for _api_version, _plural in CHILD_RESOURCES:
    kopf.on.event(_api_version, _plural, labels=MANAGED, id=f"child-{_plural}")(child_changed)


@kopf.on.event("v1", "pods", labels=MANAGED)
def pod_changed(body: Any, namespace: str, memo: Any, **_: Any) -> None:
    owner = body.get("metadata", {}).get("labels", {}).get(naming.INSTANCE_LABEL)
    if owner:
        _reconcile(memo, namespace, owner, trigger="pod")


@kopf.daemon(naming.GROUP, naming.VERSION, naming.PLURAL, cancellation_timeout=5)
async def resync(
    namespace: str, name: str, memo: Any, stopped: kopf.DaemonStopped, logger: Any, **_: Any
) -> None:
    while not await stopped.wait(memo.config.resync_seconds):
        try:
            await asyncio.to_thread(
                memo.reconciler.reconcile, namespace, name, trigger="resync", apply_all=True
            )
        except TransientError as error:
            logger.warning(f"resync failed, next try in {memo.config.resync_seconds:g}s: {error}")
