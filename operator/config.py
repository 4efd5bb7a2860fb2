"""Operator settings from flags, each with an environment variable (FLEETLM_OPERATOR_<FLAG>) for Helm."""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from kubernetes.utils.quantity import parse_quantity

ENV_PREFIX = "FLEETLM_OPERATOR_"


def default_image(variant: str = "") -> str:
    """The serving image of this release: the CUDA one, or with variant "cpu" the CPU-only one (no CUDA
    libraries: a fraction of the size, for pods without GPUs). The chart's defaults are the same."""
    try:
        tag = version("fleetlm")
    except PackageNotFoundError:
        tag = "latest"
    return f"ghcr.io/fleetlm/fleetlm:{tag}" + (f"-{variant}" if variant else "")


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    namespaces: tuple[str, ...]  # empty: every namespace
    default_image: str
    health_port: int
    metrics_port: int
    peering: str
    standalone: bool
    priority: int
    resync_seconds: float
    require_gpu_nodes: bool
    log_level: str
    hf_endpoint: str | None = None
    revision_recheck_seconds: float = 600.0
    default_cpu_image: str | None = None  # None: default_image for CPU pods too
    gpu_memory: tuple[tuple[str, int], ...] = ()  # (product, bytes) beside the fit check's own table

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> OperatorConfig:
    env = os.environ if env is None else env

    def default(flag: str, fallback: str) -> str:
        return env.get(ENV_PREFIX + flag.upper().replace("-", "_"), fallback)

    parser = argparse.ArgumentParser(prog="fleetlm-operator", description="Reconcile LLMDeployments.")
    parser.add_argument(
        "--namespaces",
        default=default("namespaces", ""),
        help="comma-separated namespaces to watch; empty (the default) watches all",
    )
    parser.add_argument(
        "--default-image",
        default=default("default-image", default_image()),
        help="serving image of GPU LLMDeployments that set no spec.image",
    )
    parser.add_argument(
        "--default-cpu-image",
        default=default("default-cpu-image", default_image("cpu")),
        help="serving image of CPU-only LLMDeployments that set no spec.image; empty: --default-image",
    )
    parser.add_argument(
        "--health-port", type=int, default=int(default("health-port", "8081")), help="0 disables /healthz"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=int(default("metrics-port", "8080")), help="0 disables /metrics"
    )
    parser.add_argument(
        "--peering", default=default("peering", "fleetlm-operator"), help="kopf peering object name"
    )
    parser.add_argument(
        "--standalone",
        action=argparse.BooleanOptionalAction,
        default=default("standalone", "false") == "true",
        help="run without peering (a single replica, or tests). Without this flag the operator joins kopf's "
        "peering object --peering so that one replica works and the others stand by; where the cluster lacks "
        "kopf's peering CRD or that object, it logs a warning saying so and runs standalone",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=int(default("priority", str(random.randint(0, 32767)))),
        help="peering priority; replicas need distinct ones, so the default is random: the highest one works, "
        "the others stand by",
    )
    parser.add_argument("--resync-seconds", type=float, default=float(default("resync-seconds", "60")))
    parser.add_argument(
        "--require-gpu-nodes",
        action=argparse.BooleanOptionalAction,
        default=default("require-gpu-nodes", "true") == "true",
        help="refuse GPU deployments no node can host (turn off with node autoscaling from zero)",
    )
    parser.add_argument(
        "--hf-endpoint",
        default=default("hf-endpoint", ""),
        help="Hugging Face Hub endpoint (a mirror) for LLMDeployments whose model.hf.endpoint is unset; "
        "empty (the default): https://huggingface.co",
    )
    parser.add_argument(
        "--revision-recheck-seconds",
        type=float,
        default=float(default("revision-recheck-seconds", "600")),
        help="how often a pinned branch or tag is looked up again, to report that it moved",
    )
    parser.add_argument(
        "--gpu-memory",
        default=default("gpu-memory", ""),
        help="GPU memory per product for the fit check, beside its own table: "
        "PRODUCT=QUANTITY[,...], e.g. NVIDIA-H100-80GB-HBM3=80Gi (products as the nvidia.com/gpu.product label)",
    )
    parser.add_argument(
        "--log-level", default=default("log-level", "info"), choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    gpu_memory = []
    for entry in filter(None, (e.strip() for e in args.gpu_memory.split(","))):
        product, sep, quantity = entry.partition("=")
        try:
            gpu_memory.append((product.strip(), int(parse_quantity(quantity.strip()))))
        except ValueError:
            parser.error(f"--gpu-memory: {entry!r} is not PRODUCT=QUANTITY (e.g. NVIDIA-L4=24Gi)")
        if not sep or not product.strip():
            parser.error(f"--gpu-memory: {entry!r} is not PRODUCT=QUANTITY (e.g. NVIDIA-L4=24Gi)")
    return OperatorConfig(
        namespaces=tuple(ns.strip() for ns in args.namespaces.split(",") if ns.strip()),
        default_image=args.default_image,
        health_port=args.health_port,
        metrics_port=args.metrics_port,
        peering=args.peering,
        standalone=args.standalone,
        priority=args.priority,
        resync_seconds=args.resync_seconds,
        require_gpu_nodes=args.require_gpu_nodes,
        log_level=args.log_level,
        hf_endpoint=args.hf_endpoint or None,
        revision_recheck_seconds=args.revision_recheck_seconds,
        default_cpu_image=args.default_cpu_image or None,
        gpu_memory=tuple(gpu_memory),
    )
