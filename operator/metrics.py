"""The operator's own Prometheus metrics (served by `--metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "fleetlm_operator_reconciles_total",
    "Reconciliations of an LLMDeployment, by what triggered them and how they ended.",
    ["trigger", "result"],
)
ERRORS = Counter(
    "fleetlm_operator_reconcile_errors_total",
    "Reconciliations that failed and will be retried, by error kind.",
    ["trigger", "error"],
)
DURATION = Histogram(
    "fleetlm_operator_reconcile_duration_seconds",
    "Wall time of one reconciliation, API calls included.",
    ["trigger"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
# Per LLMDeployment, as last observed (the PrometheusRule's "no ready replicas" alert reads these).
READY_REPLICAS = Gauge(
    "fleetlm_llmdeployment_ready_replicas", "Replicas passing /health.", ["namespace", "llmdeployment"]
)
DESIRED_REPLICAS = Gauge(
    "fleetlm_llmdeployment_desired_replicas", "Replicas the spec asks for.", ["namespace", "llmdeployment"]
)
DEGRADED = Gauge(
    "fleetlm_llmdeployment_degraded", "1 while the Degraded condition is True.", ["namespace", "llmdeployment"]
)
