"""`python -m llm_operator` / `fleetlm-operator`: run the operator (flags in llm_operator.config)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence

import kopf
from llm_operator import handlers, naming
from llm_operator.config import OperatorConfig, parse_args
from llm_operator.kube import Kube, connect
from llm_operator.reconciler import Reconciler
from prometheus_client import start_http_server

from serving.logs import setup_logging

log = logging.getLogger("fleetlm.operator")
PEERING_GROUP = ("kopf.dev", "v1")


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    setup_logging(config.log_level)
    run(config)


def missing_peering(kube: Kube, config: OperatorConfig) -> str | None:
    """Why kopf's peering cannot work here, or None: its CRD is not served, or the peering object the
    operator would join does not exist. kopf itself would wait for it, reconciling nothing, and say so only
    at debug level."""
    kind, plural = ("ClusterKopfPeering", "clusterkopfpeerings") if config.clusterwide else ("KopfPeering", "kopfpeerings")
    if not kube.serves(*PEERING_GROUP, plural):
        return f"the cluster does not serve kopf.dev/v1 {plural} (kopf's peering CRD is not installed)"
    for namespace in config.namespaces or (None,):
        if kube.get("kopf.dev/v1", kind, namespace, config.peering) is None:
            where = f" in namespace {namespace}" if namespace else ""
            return f"there is no {kind} {config.peering!r}{where}"
    return None


def peering_mode(kube: Kube, config: OperatorConfig) -> OperatorConfig:
    """The config to run with: standalone, with a warning and the remedy, when peering cannot work."""
    if config.standalone:
        return config
    reason = missing_peering(kube, config)
    if reason is None:
        return config
    log.warning(
        f"peering is unavailable: {reason}; running standalone. Only one operator replica may run like this: "
        "for several, install the peering CRD and object (the Helm chart does; or "
        "kubectl apply -f charts/fleetlm-operator/crds/kopf-peering.yaml and create the peering object), "
        "or pass --standalone to say that one replica is intended",
        extra={"peering": config.peering},
    )
    return dataclasses.replace(config, standalone=True)


def run(
    config: OperatorConfig,
    *,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Run until stopped (SIGTERM, or `stop_flag` when embedded)."""
    kube = Kube(connect())
    config = peering_mode(kube, config)
    # Once, here: kopf's per-object log records carry its settings, which the JSON formatter leaves out.
    log.info("operator starting", extra={"config": dataclasses.asdict(config)})
    reconciler = Reconciler(kube, config)
    metrics_server = start_http_server(config.metrics_port)[0] if config.metrics_port else None
    try:
        kopf.run(
            settings=operator_settings(),
            memo=kopf.Memo(reconciler=reconciler, config=config),
            clusterwide=config.clusterwide,
            namespaces=config.namespaces,
            standalone=config.standalone,
            priority=config.priority,
            peering_name=None if config.standalone else config.peering,
            liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()


def operator_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # The reconciler posts Events on condition changes; kopf's own would repeat every log line.
    settings.posting.enabled = False
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=naming.GROUP, key="last-handled-spec"
    )
    settings.persistence.finalizer = naming.FINALIZER
    # Watch only what the operator made, filtered by the API server (pods especially).
    for api_version, plural in (*handlers.CHILD_RESOURCES, ("v1", "pods")):
        settings.watching.label_selectors[api_version, plural] = (
            f"app.kubernetes.io/managed-by={naming.MANAGED_BY}"
        )
    return settings


if __name__ == "__main__":
    main()
