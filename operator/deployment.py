"""The serving Deployment: the pod that downloads the model once and runs `python -m serving` on it.

What the pod relies on from the serving image (see docs/operator.md): `python -m serving` and
`python -m serving download` with the flags used below, HTTP on 8080 with GET /health (200 once loaded, 503
while loading or draining), a non-root user that can run as uid 1000, and no writes outside /tmp.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from kubernetes.utils.quantity import parse_quantity
from llm_operator import naming
from llm_operator.naming import UNPINNED, HubPin, Owner
from llm_operator.spec import LLMDeploymentSpec

HTTP_PORT = 8080
MODELS_DIR = "/models"
USER_ID = 1000
DOWNLOAD_CONTAINER = "model-download"
# The init container fetching spec.model.adapters[i] is ADAPTER_DOWNLOAD_PREFIX + i; it runs after the model's.
ADAPTER_DOWNLOAD_PREFIX = "adapter-download-"
SERVER_CONTAINER = "server"
STARTUP_PERIOD_S = 10
# On SIGTERM the server answers new requests 503 while the endpoints controller and kube-proxy remove the
# pod from the Service asynchronously: the hook holds SIGTERM back until they have (exec: coreutils'
# sleep, in every Debian-based image; the sleep action needs Kubernetes 1.30).
PRE_STOP_SLEEP_S = 5
# After --drain-timeout the server gives cancelled streams up to 5 s to flush, then stops the engine.
SHUTDOWN_SLACK_S = 10
HUB_CA_DIR = "/etc/fleetlm/hub-ca"

# Written only under /tmp: the root filesystem is read-only. uid 1000 has no passwd entry in most images,
# so its home would be /; Triton compiles and caches its kernels under TRITON_HOME (else the home). The
# serving image sets the same (images/serving/Dockerfile); here they also hold for other images.
BASE_ENV = [
    {"name": "HF_HOME", "value": "/tmp/hf-home"},
    {"name": "HOME", "value": "/tmp"},
    {"name": "TRITON_HOME", "value": "/tmp"},
    {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    # Hub files stored with Xet come through hf-xet, whose chunk cache (up to 10 GB in some builds) would fill
    # /tmp, an emptyDir on the node's disk, for nothing: each file is fetched once, into the model's volume.
    {"name": "HF_XET_CHUNK_CACHE_SIZE_BYTES", "value": "0"},
]

CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def desired_replicas(spec: LLMDeploymentSpec) -> int:
    """spec.replicas, held inside the autoscaler's bounds (the HPA writes spec.replicas via /scale)."""
    if spec.autoscaling is None:
        return spec.replicas
    return min(max(spec.replicas, spec.autoscaling.min_replicas), spec.autoscaling.max_replicas)


def rollout_strategy(colocate: bool) -> dict[str, Any]:
    """A new pod serves before an old one goes (no capacity dip), unless the replicas are held on the
    cache claim's node: there a surge pod must fit beside the old ones on that one node (one more GPU set),
    and where it cannot it stays Pending while the old pod never leaves. Those replace one pod at a time,
    the old one first."""
    if colocate:
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def deployment(
    owner: Owner, spec: LLMDeploymentSpec, image: str, colocate: bool = False, hub: HubPin = UNPINNED
) -> dict[str, Any]:
    """colocate: the cache claim is ReadWriteOnce, so every replica must run on the node that mounts it.
    hub: the Hub endpoint for specs that name none, and the commit the revision is pinned to."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": naming.metadata(owner),
        "spec": {
            "replicas": desired_replicas(spec),
            "selector": {"matchLabels": naming.selector_labels(owner.name)},
            "strategy": rollout_strategy(colocate),
            "revisionHistoryLimit": 3,
            # The deadline covers the download (init container) too, which the startup probe does not.
            "progressDeadlineSeconds": spec.startup.timeout_seconds + 3600,
            "template": pod_template(owner, spec, image, colocate, hub),
        },
    }


def pod_template(
    owner: Owner, spec: LLMDeploymentSpec, image: str, colocate: bool = False, hub: HubPin = UNPINNED
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        # Service links would inject variables such as LLM_PORT for a Service named "llm", which the
        # server reads as its own LLM_* settings.
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        # The grace period runs from the preStop hook on: the hook, the drain, then the shutdown.
        "terminationGracePeriodSeconds": PRE_STOP_SLEEP_S + spec.engine.drain_timeout_seconds + SHUTDOWN_SLACK_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "runAsGroup": USER_ID,
            "fsGroup": USER_ID,
            # A chown of a whole model cache on every mount would add minutes to each cold start.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_server(spec, image, hub)],
        "volumes": _volumes(owner, spec),
    }
    if spec.model.hf is not None:
        pod["initContainers"] = [_downloader(spec, image, hub)] + [
            _adapter_downloader(spec, image, hub, i) for i in range(len(spec.model.adapters))
        ]
    _schedule(pod, spec)
    if colocate:
        _colocate(pod, owner)
    return {
        "metadata": {
            "labels": naming.labels(owner.name),
            "annotations": {naming.MODEL_ANNOTATION: naming.model_uri(spec, hub.commit)},
        },
        "spec": pod,
    }


def model_path(spec: LLMDeploymentSpec, commit: str | None = None) -> str:
    if spec.model.hf is not None:
        return f"{MODELS_DIR}/{naming.hf_cache_dir(spec, commit)}"
    assert spec.model.pvc is not None
    return f"{MODELS_DIR}/{spec.model.pvc.path}".rstrip("/")


def _hub_access(spec: LLMDeploymentSpec, default_endpoint: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Env and volume mounts for a container that talks to the Hub: its endpoint (a mirror) and the
    mirror's CA bundle, trusted beside the public roots (FLEETLM_EXTRA_CA_FILE: serving/trust.py)."""
    hf = spec.model.hf
    if hf is None:
        return [], []
    env, mounts = [], []
    endpoint = hf.endpoint or default_endpoint
    if endpoint:
        env.append({"name": "HF_ENDPOINT", "value": endpoint.rstrip("/")})
    if hf.ca_bundle is not None:
        path = f"{HUB_CA_DIR}/{hf.ca_bundle.key}"
        env.append({"name": "FLEETLM_EXTRA_CA_FILE", "value": path})  # trusted beside the public roots (serving/trust.py)
        mounts.append({"name": "hub-ca", "mountPath": HUB_CA_DIR, "readOnly": True})
    return env, mounts


def _server(spec: LLMDeploymentSpec, image: str, hub: HubPin = UNPINNED) -> dict[str, Any]:
    engine = spec.engine
    args = [
        "--host", "0.0.0.0",
        "--port", str(HTTP_PORT),
        "--model-path", model_path(spec, hub.commit),
        "--served-model-name", naming.served_name(spec),
        "--device", _device(spec),
        "--dtype", engine.dtype,
        "--quantization", engine.quantization,
        "--max-batch-size", str(engine.max_batch_size),
        "--max-seq-len", str(engine.max_seq_len),
        "--queue-capacity", str(engine.queue_capacity),
        "--drain-timeout", str(engine.drain_timeout_seconds),
        "--log-level", engine.log_level,
    ]  # fmt: skip
    if spec.model.hf is not None and spec.model.hf.gguf_file:  # the one the downloader fetched, maybe in a subfolder
        args += ["--gguf-file", spec.model.hf.gguf_file]
    if spec.model.tokenizer:
        args += ["--tokenizer-path", spec.model.tokenizer]
    if spec.model.adapters:  # as many as the spec lists (extraArgs come later: a --max-loras there wins)
        args += ["--max-loras", str(len(spec.model.adapters))]
        args += ["--lora-modules", *(f"{a.name}={MODELS_DIR}/{naming.adapter_cache_dir(a)}" for a in spec.model.adapters)]
    # A pod shares its node's cores: pinning the engine to "its own" core would put every pod's
    # engine on the same one. And without a CPU limit the server would count the node's cores, so
    # a CPU pod tells it its request; the server sizes its engine threads from that and the model.
    args += ["--cpu-affinity", "none"]
    if _device(spec) == "cpu" and spec.resources.cpu is not None:
        args += ["--cpus", f"{float(parse_quantity(str(spec.resources.cpu))):g}"]
    args += list(engine.extra_args)

    env = list(BASE_ENV)
    if engine.api_key_secret_ref is not None:
        env.append(_secret_env("LLM_API_KEY", engine.api_key_secret_ref.name, engine.api_key_secret_ref.key))
    hub_mounts: list[dict[str, Any]] = []
    if spec.model.tokenizer:  # a tokenizer from the Hub is fetched by the server itself
        hub_env, hub_mounts = _hub_access(spec, hub.endpoint)
        env += hub_env
        if spec.model.token_secret_ref is not None:
            ref = spec.model.token_secret_ref
            env.append(_secret_env("HF_TOKEN", ref.name, ref.key))
    env = _merge_env(env, [e.model_dump(by_alias=True, exclude_none=True) for e in engine.env])

    health = {"httpGet": {"path": "/health", "port": "http"}}
    container: dict[str, Any] = {
        "name": SERVER_CONTAINER,
        "image": image,
        "command": ["python", "-m", "serving"],
        "args": args,
        "env": env,
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"}],
        # Loading a large model takes minutes: the startup probe holds off liveness until /health says
        # loaded, within the spec's budget; liveness is lenient so a busy server is not killed mid-batch.
        "startupProbe": {
            **health,
            "periodSeconds": STARTUP_PERIOD_S,
            "timeoutSeconds": 5,
            "failureThreshold": math.ceil(spec.startup.timeout_seconds / STARTUP_PERIOD_S),
        },
        "readinessProbe": {**health, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
        "livenessProbe": {**health, "periodSeconds": 30, "timeoutSeconds": 10, "failureThreshold": 5},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_SLEEP_S)]}}},
        "resources": _resources(spec),
        "securityContext": CONTAINER_SECURITY,
        # A failed container's last log lines become its termination message: the operator quotes them.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *hub_mounts,
        ],
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


def _adapter_downloader(spec: LLMDeploymentSpec, image: str, hub: HubPin, index: int) -> dict[str, Any]:
    """spec.model.adapters[index], fetched as the model is (endpoint, CA, token, env): an adapter's repo is
    a model repo's config and weights files. Never --cache-root: an adapter evicts nothing."""
    adapter = spec.model.adapters[index]
    container = _downloader(spec, image, hub)
    container["name"] = f"{ADAPTER_DOWNLOAD_PREFIX}{index}"
    container["args"] = ["--model", adapter.repo, "--revision", adapter.revision, "--dest", f"{MODELS_DIR}/{naming.adapter_cache_dir(adapter)}"]
    return container


def is_download(container_name: str | None) -> bool:
    """Whether an init container of a serving pod fetches from the Hub (the model or an adapter)."""
    return container_name == DOWNLOAD_CONTAINER or (container_name or "").startswith(ADAPTER_DOWNLOAD_PREFIX)


def _downloader(spec: LLMDeploymentSpec, image: str, hub: HubPin = UNPINNED) -> dict[str, Any]:
    hf = spec.model.hf
    assert hf is not None
    hub_env, hub_mounts = _hub_access(spec, hub.endpoint)
    env = list(BASE_ENV) + hub_env
    if spec.model.token_secret_ref is not None:
        env.append(_secret_env("HF_TOKEN", spec.model.token_secret_ref.name, spec.model.token_secret_ref.key))
    # engine.env too, last, as the server gets it: a cluster's HTTPS_PROXY / NO_PROXY or HF_HUB_* settings
    # reached only the server, and the download that needs them most failed ("check egress").
    env = _merge_env(env, [e.model_dump(by_alias=True, exclude_none=True) for e in spec.engine.env])
    container: dict[str, Any] = {
        "name": DOWNLOAD_CONTAINER,
        "image": image,
        "command": ["python", "-m", "serving", "download"],
        "args": [
            "--model", hf.repo, "--revision", hub.commit or hf.revision, "--dest", model_path(spec, hub.commit),
            *(["--gguf-file", hf.gguf_file] if hf.gguf_file else []),
            # A cache this resource owns holds only models it was pointed at before: where the volume lacks the
            # room for the new one, they are evicted, least recently used first. A claim given in
            # cache.existingClaim may be shared, so nothing of it is deleted.
            *([] if spec.cache.existing_claim else ["--cache-root", f"{MODELS_DIR}/hf"]),
        ],  # fmt: skip
        "env": env,
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        "securityContext": CONTAINER_SECURITY,
        # A failed container's last log lines become its termination message: the operator quotes them.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}, {"name": "tmp", "mountPath": "/tmp"}, *hub_mounts],
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


def _device(spec: LLMDeploymentSpec) -> str:
    gpu = spec.resources.requested_gpu
    if gpu is None:
        return "cpu"
    # ROCm builds of torch expose AMD GPUs as "cuda" too; other accelerators are left to the server.
    return "cuda" if gpu.resource_name in ("nvidia.com/gpu", "amd.com/gpu") else "auto"


def _resources(spec: LLMDeploymentSpec) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    res = spec.resources
    if res.cpu is not None:
        requests["cpu"] = str(res.cpu)  # no cpu limit: throttling stalls the token loop
    if res.memory is not None:
        requests["memory"] = limits["memory"] = str(res.memory)
    if res.requested_gpu is not None:
        limits[res.requested_gpu.resource_name] = str(res.requested_gpu.count)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _volumes(owner: Owner, spec: LLMDeploymentSpec) -> list[dict[str, Any]]:
    if spec.model.pvc is not None:
        models = {"claimName": spec.model.pvc.claim_name, "readOnly": True}
    else:
        models = {"claimName": spec.cache.existing_claim or naming.cache_claim_name(owner.name)}
    volumes = [
        {"name": "models", "persistentVolumeClaim": models},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": str(spec.resources.shm_size)}},
    ]
    ca = spec.model.hf.ca_bundle if spec.model.hf is not None else None
    if ca is not None:
        items = [{"key": ca.key, "path": ca.key}]
        source = (
            {"configMap": {"name": ca.config_map_name, "items": items}}
            if ca.config_map_name
            else {"secret": {"secretName": ca.secret_name, "items": items}}
        )
        volumes.append({"name": "hub-ca", **source})
    return volumes


def _schedule(pod: dict[str, Any], spec: LLMDeploymentSpec) -> None:
    sched = spec.scheduling
    node_selector = dict(sched.node_selector)
    # The API omits empty strings (effect "" means every effect): sent, they would read as drift forever.
    tolerations = [{k: v for k, v in t.model_dump(by_alias=True, exclude_none=True).items() if v != ""} for t in sched.tolerations]
    gpu = spec.resources.requested_gpu
    if gpu is not None:
        if gpu.product:
            node_selector["nvidia.com/gpu.product"] = gpu.product
        # GPU node pools are commonly tainted with their resource name.
        tolerations.append({"key": gpu.resource_name, "operator": "Exists", "effect": "NoSchedule"})
    if node_selector:
        pod["nodeSelector"] = node_selector
    if tolerations:
        pod["tolerations"] = tolerations
    if sched.affinity:
        pod["affinity"] = copy.deepcopy(sched.affinity)  # _colocate may add to it
    if sched.priority_class_name:
        pod["priorityClassName"] = sched.priority_class_name
    if sched.runtime_class_name:
        pod["runtimeClassName"] = sched.runtime_class_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]


def _colocate(pod: dict[str, Any], owner: Owner) -> None:
    """Replicas of a ReadWriteOnce cache share its node: a volume attached to one node cannot be mounted
    on another, so a replica scheduled elsewhere would hang in ContainerCreating. The first pod matches
    its own term, so it schedules anywhere; the rest follow it (and a rollout's new pod too)."""
    term = {
        "labelSelector": {"matchLabels": naming.selector_labels(owner.name)},
        "topologyKey": "kubernetes.io/hostname",
    }
    affinity = pod.setdefault("affinity", {})
    pod_affinity = affinity.setdefault("podAffinity", {})
    pod_affinity.setdefault("requiredDuringSchedulingIgnoredDuringExecution", []).append(term)


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _merge_env(ours: list[dict[str, Any]], users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # The user's entry wins; env is a list-map keyed by name, so a duplicate name would fail the apply.
    theirs = {e["name"] for e in users}
    return [e for e in ours if e["name"] not in theirs] + users
