"""`python -m llm_operator` / `fleetlm-operator`: run the operator (flags in llm_operator.config)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import kopf
from llm_operator import handlers, naming
from llm_operator.config import OperatorConfig, parse_args
from llm_operator.kube import Kube, connect
from llm_operator.reconciler import Reconciler
from prometheus_client import start_http_server

from serving.logs import setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_args(argv)
    setup_logging(config.log_level)
    run(config)


def run(
    config: OperatorConfig,
    *,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Run until stopped (SIGTERM, or `stop_flag` when embedded)."""
    reconciler = Reconciler(Kube(connect()), config)
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
    settings.persistence.finalizer = f"{naming.GROUP}/kopf-finalizer"
    # Watch only what the operator made, filtered by the API server (pods especially).
    for api_version, plural in (*handlers.CHILD_RESOURCES, ("v1", "pods")):
        settings.watching.label_selectors[api_version, plural] = (
            f"app.kubernetes.io/managed-by={naming.MANAGED_BY}"
        )
    return settings


if __name__ == "__main__":
    main()
