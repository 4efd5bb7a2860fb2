"""`python -m llm_operator.shutdown`: scale the operator's own Deployment to zero and wait until its pods
are gone. The chart runs it as a pre-delete hook, so that `helm uninstall` deletes the operator's RBAC only
after every operator pod has stopped: a pod still shutting down would otherwise have its last peering
write refused (403) and log retries and errors for seconds.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

from kubernetes.client import AppsV1Api, CoreV1Api
from kubernetes.client.exceptions import ApiException
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_operator.shutdown", description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--deployment", required=True, help="the operator's Deployment")
    parser.add_argument("--selector", required=True, help="label selector of the operator's pods")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the pods to stop")
    args = parser.parse_args(argv)
    setup_logging("info")
    api = connect()
    scale_down(AppsV1Api(api), CoreV1Api(api), args.namespace, args.deployment, args.selector, args.timeout)
    # Success either way: a pod that outlives the timeout (logged above) must not block the uninstall.
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
