"""`python -m llm_operator.shutdown`: scale the operator's own Deployment to zero and wait until its pods
are gone. The chart runs it as a pre-delete hook, so that `helm uninstall` deletes the operator's RBAC only
after every operator pod has stopped: a pod still shutting down would otherwise have its last peering
write refused (403) and log retries and errors for seconds.

With --release-finalizers it then takes the operator's finalizer off the LLMDeployments it served: kopf
puts one on each, and with no operator left to remove it, deleting an LLMDeployment (or its namespace)
after the uninstall would hang in Terminating. The resources themselves, and what they serve, stay.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

from kubernetes.client import AppsV1Api, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from llm_operator import naming
from llm_operator.kube import connect

from serving.logs import setup_logging

log = logging.getLogger("fleetlm.operator.shutdown")
POLL_S = 1.0


def scale_down(apps: AppsV1Api, core: CoreV1Api, namespace: str, deployment: str, selector: str, timeout: float) -> bool:
    """Scale to zero, then wait for the pods matching `selector` to go; False when the timeout passed first.
    A Deployment that is already gone is nothing to wait for."""
    try:
        apps.patch_namespaced_deployment(deployment, namespace, {"spec": {"replicas": 0}})
    except ApiException as error:
        if error.status != 404:
            raise
        log.info("the operator Deployment is already gone", extra={"deployment": deployment})
    deadline = time.monotonic() + timeout
    while True:
        pods = [p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector=selector).items]
        if not pods:
            log.info("the operator is stopped", extra={"deployment": deployment})
            return True
        if time.monotonic() >= deadline:
            log.warning("operator pods still running at the timeout", extra={"pods": pods, "timeout_s": timeout})
            return False
        time.sleep(POLL_S)


def release_finalizers(custom: CustomObjectsApi, namespaces: Sequence[str] = ()) -> int:
    """Take naming.FINALIZER off every LLMDeployment (of `namespaces`, else of every namespace), leaving any
    other finalizer; returns how many lost it. Each write carries the object's resourceVersion and is
    retried on a conflict, so a finalizer another controller adds meanwhile is kept."""
    released = 0
    for namespace in namespaces or [None]:
        listing = (
            custom.list_cluster_custom_object(naming.GROUP, naming.VERSION, naming.PLURAL)
            if namespace is None
            else custom.list_namespaced_custom_object(naming.GROUP, naming.VERSION, namespace, naming.PLURAL)
        )
        for item in listing.get("items", []):
            meta = item["metadata"]
            released += _release(custom, meta["namespace"], meta["name"], item)
    log.info("finalizers released", extra={"finalizer": naming.FINALIZER, "released": released})
    return released


def _release(custom: CustomObjectsApi, namespace: str, name: str, item: dict) -> int:
    for _ in range(5):
        meta = item["metadata"]
        finalizers = meta.get("finalizers") or []
        if naming.FINALIZER not in finalizers:
            return 0
        patch = {"metadata": {"finalizers": [f for f in finalizers if f != naming.FINALIZER], "resourceVersion": meta["resourceVersion"]}}
        try:
            custom.patch_namespaced_custom_object(
                naming.GROUP, naming.VERSION, namespace, naming.PLURAL, name, patch,
                _content_type="application/merge-patch+json",
            )  # fmt: skip
            return 1
        except ApiException as error:
            if error.status == 404:
                return 0
            if error.status != 409:
                raise
        item = custom.get_namespaced_custom_object(naming.GROUP, naming.VERSION, namespace, naming.PLURAL, name)
    log.warning("finalizer not released: the object kept changing", extra={"namespace": namespace, "name": name})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_operator.shutdown", description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--deployment", required=True, help="the operator's Deployment")
    parser.add_argument("--selector", required=True, help="label selector of the operator's pods")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the pods to stop")
    parser.add_argument(
        "--release-finalizers", action="store_true", help="then take the operator's finalizer off its LLMDeployments"
    )
    parser.add_argument(
        "--watch-namespace", action="append", default=[], help="the namespaces it served (repeat; none: all)"
    )
    args = parser.parse_args(argv)
    setup_logging("info")
    api = connect()
    stopped = scale_down(AppsV1Api(api), CoreV1Api(api), args.namespace, args.deployment, args.selector, args.timeout)
    if args.release_finalizers and not stopped:
        log.warning("finalizers left in place: an operator pod still running would put them back")
    elif args.release_finalizers:
        try:
            release_finalizers(CustomObjectsApi(api), args.watch_namespace)
        except ApiException as error:  # e.g. the CRD is gone: nothing holds a finalizer
            log.warning("finalizers not released", extra={"status": error.status, "reason": error.reason})
    # Success either way: a pod that outlives the timeout (logged above) must not block the uninstall.
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
