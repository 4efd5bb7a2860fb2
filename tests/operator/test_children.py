"""The desired children: what each spec turns into, and that every manifest is valid Kubernetes."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from llm_operator.children import desired_children
from llm_operator.naming import HubPin
from llm_operator.spec import InvalidSpec, parse_spec

from tests.operator.builders import example, llmd

IMAGE = "ghcr.io/fleetlm/fleetlm:test"


def build(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    children = desired_children(body, parse_spec(body["spec"]), IMAGE)
    return {c["kind"]: c for c in children}


def container(children: dict[str, dict[str, Any]], name: str = "server") -> dict[str, Any]:
    pod = children["Deployment"]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def args(c: dict[str, Any]) -> dict[str, str]:
    flags = c["args"]
    return {flags[i]: flags[i + 1] for i in range(0, len(flags) - 1, 2) if flags[i].startswith("--")}


SPECS = {
    "cpu-demo": example("cpu-demo.yaml"),
    "gpu-8b": example("llama-3.1-8b-gpu.yaml"),
    "pvc": llmd(model={"pvc": {"claimName": "weights", "path": "llama/8b"}}, replicas=3),
    "cpu-autoscaling": llmd(autoscaling={"maxReplicas": 4, "metric": "cpu"}, resources={"cpu": "2"}),
    "queue-autoscaling": llmd(autoscaling={"minReplicas": 2, "maxReplicas": 6, "metric": "queueSize"}),
    "everything": llmd(
        model={
            "hf": {"repo": "org/m", "revision": "refs/pr/1"},
            "tokenizer": "org/tok",
            "tokenSecretRef": {"name": "hf"},
            "adapters": [{"name": "sql", "repo": "org/sql-lora"}, {"name": "tone", "repo": "org/tone-lora", "revision": "v2"}],
        },
        engine={
            "apiKeySecretRef": {"name": "keys"},
            "extraArgs": ["--chat-template", "/tmp/t.jinja"],
            "env": [
                {"name": "HF_HOME", "value": "/tmp/other"},
                {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
        },
        resources={"gpu": {"count": 2, "product": "NVIDIA-H100-80GB-HBM3"}, "cpu": 8, "memory": "64Gi"},
        scheduling={
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "priorityClassName": "inference",
            "runtimeClassName": "nvidia",
        },
        cache={"existingClaim": "shared-models"},
        imagePullPolicy="Always",
        imagePullSecrets=[{"name": "regcred"}],
        service={"type": "LoadBalancer", "port": 8000, "annotations": {"a": "b"}},
        monitoring={"serviceMonitor": True, "interval": "15s"},
    ),
}


@pytest.mark.parametrize("version", ["1.29", "1.37"])
@pytest.mark.parametrize("case", SPECS)
def test_every_child_is_a_valid_kubernetes_object(case: str, version: str) -> None:
    for child in build(SPECS[case]).values():
        if child["kind"] == "ServiceMonitor":
            continue  # a CRD kind: kubernetes-validate knows built-in schemas only (shape asserted below)
        kubernetes_validate.validate(child, desired_version=version, strict=True)


@pytest.mark.parametrize("case", SPECS)
def test_every_child_is_owned_and_labelled(case: str) -> None:
    for child in build(SPECS[case]).values():
        meta = child["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "fleetlm-operator"
        (ref,) = meta["ownerReferences"]
        assert ref["kind"] == "LLMDeployment" and ref["uid"].startswith("uid-")
        assert ref["controller"] is True and ref["blockOwnerDeletion"] is True


def test_hf_model_downloads_once_into_the_cache_and_serves_from_it() -> None:
    children = build(SPECS["cpu-demo"])
    assert set(children) == {"PersistentVolumeClaim", "Service", "Deployment", "PodDisruptionBudget"}
    download = container(children, "model-download")
    assert download["command"] == ["python", "-m", "serving", "download"]
    dest = "/models/hf/HuggingFaceTB--SmolLM2-135M-Instruct/main"
    assert args(download) == {
        "--model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--revision": "main",
        "--dest": dest,
        "--cache-root": "/models/hf",  # the claim is this resource's own: models it no longer serves may go
    }
    server = container(children)
    assert server["command"] == ["python", "-m", "serving"]
    flags = args(server)
    assert flags["--model-path"] == dest
    assert flags["--served-model-name"] == "smollm2"
    assert flags["--device"] == "cpu"
    assert (flags["--dtype"], flags["--max-batch-size"], flags["--port"]) == ("float32", "8", "8080")
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]
    assert {"name": "models", "mountPath": "/models"} in download["volumeMounts"]
    volumes = {v["name"]: v for v in children["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "smollm2-demo-model-cache"}
    claim = children["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "smollm2-demo-model-cache"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}


def test_pod_is_hardened_and_probes_spare_a_loading_model() -> None:
    children = build(SPECS["cpu-demo"])
    deploy = children["Deployment"]["spec"]
    pod = deploy["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"] + pod["initContainers"]:
        sec = c["securityContext"]
        assert sec["readOnlyRootFilesystem"] and sec["capabilities"] == {"drop": ["ALL"]}
        assert not sec["allowPrivilegeEscalation"]
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        assert {"name": "HF_HOME", "value": "/tmp/hf-home"} in c["env"]
        # Triton's kernel cache, and any other home-relative write, lands in /tmp, not the read-only /.
        assert {"name": "HOME", "value": "/tmp"} in c["env"] and {"name": "TRITON_HOME", "value": "/tmp"} in c["env"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Mi"}
    server = container(children)
    startup = server["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # the spec's startup budget
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    liveness = server["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 120
    assert pod["terminationGracePeriodSeconds"] > 30  # the drain timeout fits in the grace period


@pytest.mark.parametrize("drain", [0, 30, 300])
def test_a_stopping_pod_leaves_the_service_before_it_drains_and_the_grace_period_covers_both(drain: int) -> None:
    """SIGTERM waits for the preStop hook, and the grace period counts from the hook: it must hold the
    hook, --drain-timeout and the server's shutdown after it (up to 5 s flushing cancelled streams)."""
    children = build(llmd(engine={"drainTimeoutSeconds": drain}))
    pod = children["Deployment"]["spec"]["template"]["spec"]
    server = container(children)
    pre_stop = server["lifecycle"]["preStop"]
    assert pre_stop == {"exec": {"command": ["sleep", "5"]}}  # exec: the sleep action needs Kubernetes 1.30
    assert args(server)["--drain-timeout"] == str(drain)
    assert pod["terminationGracePeriodSeconds"] >= 5 + drain + 5 + 1
    assert "lifecycle" not in container(children, "model-download")
    kubernetes_validate.validate(children["Deployment"], desired_version="1.29", strict=True)


def test_gpu_deployment_requests_gpus_and_reaches_gpu_nodes() -> None:
    children = build(SPECS["everything"])
    pod = children["Deployment"]["spec"]["template"]["spec"]
    server = container(children)
    assert server["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"},
    }
    assert args(server)["--device"] == "cuda"
    assert pod["nodeSelector"] == {"pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["priorityClassName"] == "inference" and pod["runtimeClassName"] == "nvidia"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert "affinity" in pod


def test_secrets_reach_only_the_containers_that_need_them() -> None:
    children = build(SPECS["everything"])
    download, server = container(children, "model-download"), container(children)
    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}}
    assert token in download["env"]
    assert token in server["env"]  # the tokenizer is fetched from the Hub by the server
    assert {
        "name": "LLM_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "keys", "key": "api-key"}},
    } in server["env"]
    assert not any(e["name"] == "LLM_API_KEY" for e in download["env"])
    plain = container(build(llmd(model={"hf": {"repo": "o/m"}, "tokenSecretRef": {"name": "hf"}})))
    assert not any(e["name"] == "HF_TOKEN" for e in plain["env"])


def test_user_env_overrides_ours_without_duplicate_names() -> None:
    env = container(build(SPECS["everything"]))["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names))
    assert {"name": "HF_HOME", "value": "/tmp/other"} in env


def test_user_env_reaches_the_downloader_too() -> None:
    # A cluster's egress proxy: set in engine.env, it reached the server only, and the download failed.
    proxy = {"name": "HTTPS_PROXY", "value": "http://proxy:3128"}
    body = llmd(engine={"env": [proxy, {"name": "HF_HOME", "value": "/tmp/other"}]})
    download = container(build(body), "model-download")
    names = [e["name"] for e in download["env"]]
    assert proxy in download["env"] and {"name": "HF_HOME", "value": "/tmp/other"} in download["env"]
    assert len(names) == len(set(names))


def test_extra_args_and_tokenizer_reach_the_server() -> None:
    server = container(build(SPECS["everything"]))
    assert server["args"][-2:] == ["--chat-template", "/tmp/t.jinja"]
    assert args(server)["--tokenizer-path"] == "org/tok"
    assert args(server)["--model-path"] == "/models/hf/org--m/refs--pr--1"
    assert server["imagePullPolicy"] == "Always"


def test_existing_claim_is_used_not_created() -> None:
    children = build(SPECS["everything"])
    assert "PersistentVolumeClaim" not in children
    volumes = {v["name"]: v for v in children["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "shared-models"}
    assert "--cache-root" not in args(container(children, "model-download"))  # others' models may be on it


def test_pvc_model_is_served_read_only_in_place() -> None:
    children = build(SPECS["pvc"])
    assert set(children) == {"Service", "Deployment", "PodDisruptionBudget"}
    pod = children["Deployment"]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert args(container(children))["--model-path"] == "/models/llama/8b"
    assert args(container(children))["--served-model-name"] == "8b"


@pytest.mark.parametrize(
    ("spec", "mode"),
    [
        ({"replicas": 1}, "ReadWriteOnce"),
        ({"replicas": 2}, "ReadWriteMany"),
        ({"autoscaling": {"maxReplicas": 3}}, "ReadWriteMany"),
        ({"autoscaling": {"maxReplicas": 1}}, "ReadWriteOnce"),
        ({"replicas": 4, "cache": {"accessMode": "ReadWriteOnce"}}, "ReadWriteOnce"),
    ],
)
def test_cache_is_shared_read_write_many_when_replicas_can_exceed_one(
    spec: dict[str, Any], mode: str
) -> None:
    assert build(llmd(**spec))["PersistentVolumeClaim"]["spec"]["accessModes"] == [mode]


def _live_claim(mode: str, size: str = "2Gi", storage_class: str | None = "standard", phase: str = "Bound") -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": [mode], "resources": {"requests": {"storage": size}}, "volumeMode": "Filesystem"}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"metadata": {"name": "m-model-cache"}, "spec": spec, "status": {"phase": phase}}


@pytest.mark.parametrize(
    ("spec", "live", "expected"),
    [
        # An existing claim keeps its mode, whatever the replicas or the spec now ask...
        ({"replicas": 5, "cache": {"size": "2Gi"}}, _live_claim("ReadWriteOnce"),
         {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}, "storageClassName": "standard"}),
        ({"replicas": 1, "cache": {"accessMode": "ReadWriteOnce", "size": "2Gi"}}, _live_claim("ReadWriteMany"),
         {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "2Gi"}}, "storageClassName": "standard"}),
        # ...its storage class when the spec names another or none (the cluster default filled it in, or
        # the spec dropped it), and its size when the spec asks for less;
        ({"cache": {"size": "1Gi", "storageClassName": "fast"}}, _live_claim("ReadWriteOnce", "3Gi"),
         {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "3Gi"}}, "storageClassName": "standard"}),
        ({"cache": {"size": "2Gi"}}, _live_claim("ReadWriteOnce", storage_class="fast"),
         {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}, "storageClassName": "fast"}),
        # a claim without a class is not given one;
        ({"cache": {"size": "2Gi", "storageClassName": "fast"}}, _live_claim("ReadWriteOnce", storage_class=None),
         {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}),
        # a larger size is asked for (bound claims may grow)...
        ({"cache": {"size": "10Gi"}}, _live_claim("ReadWriteOnce", "2Gi"),
         {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}, "storageClassName": "standard"}),
        # ...but not yet of a claim still Pending, whose spec the API keeps wholly immutable until it binds.
        ({"cache": {"size": "10Gi"}}, _live_claim("ReadWriteOnce", "2Gi", phase="Pending"),
         {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}, "storageClassName": "standard"}),
    ],
)  # fmt: skip
def test_an_existing_cache_claim_keeps_what_a_claim_cannot_change(
    spec: dict[str, Any], live: dict[str, Any], expected: dict[str, Any]
) -> None:
    body = llmd(name="m", **spec)
    children = {c["kind"]: c for c in desired_children(body, parse_spec(body["spec"]), IMAGE, live)}
    assert children["PersistentVolumeClaim"]["spec"] == expected


def test_a_claim_that_cannot_expand_keeps_its_size_and_says_how_to_grow_it() -> None:
    from llm_operator.children import claim_conflicts, claim_grows

    body = llmd(name="m", cache={"size": "10Gi"})
    spec = parse_spec(body["spec"])
    live = _live_claim("ReadWriteOnce", "2Gi")
    assert claim_grows(spec, live) and not claim_grows(spec, None)
    assert not claim_grows(parse_spec(llmd(cache={"size": "2Gi"})["spec"]), live)
    children = {c["kind"]: c for c in desired_children(body, spec, IMAGE, live, expandable=False)}
    assert children["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    (problem,) = claim_conflicts(spec, live, expandable=False)
    assert problem.reason == "CacheClaimNotExpandable"
    assert "StorageClass standard does not set allowVolumeExpansion: true" in problem.message
    assert "kubectl delete pvc m-model-cache" in problem.message
    assert claim_conflicts(spec, live) == []  # an expandable claim just grows


def test_claim_conflicts_name_each_field_and_the_remedy() -> None:
    from llm_operator.children import claim_conflicts

    spec = parse_spec(llmd(cache={"accessMode": "ReadWriteMany", "size": "1Gi", "storageClassName": "fast"})["spec"])
    (problem,) = claim_conflicts(spec, _live_claim("ReadWriteOnce", "3Gi"))
    assert problem.reason == "CacheClaimImmutable"
    for part in (
        "cache.accessMode is ReadWriteMany but claim m-model-cache was created ReadWriteOnce",
        "cache.storageClassName is fast but claim m-model-cache uses standard",
        "cache.size is 1Gi but claim m-model-cache holds 3Gi",
        "kubectl delete pvc m-model-cache",
    ):
        assert part in problem.message
    assert claim_conflicts(parse_spec(llmd(replicas=4)["spec"]), _live_claim("ReadWriteOnce")) == []
    assert claim_conflicts(spec, None) == []


def test_replicas_of_a_read_write_once_cache_share_its_node_and_keep_the_users_affinity() -> None:
    user = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["llm"]}]}]}}}  # fmt: skip
    once = build(llmd(replicas=1, scheduling={"affinity": user}))
    affinity = once["Deployment"]["spec"]["template"]["spec"]["affinity"]
    assert affinity["nodeAffinity"] == user["nodeAffinity"]
    (term,) = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == once["Deployment"]["spec"]["selector"]["matchLabels"]
    assert "podAffinity" not in user  # the spec's own dict is not touched
    many = build(llmd(replicas=2))["Deployment"]["spec"]["template"]["spec"]
    assert "affinity" not in many  # ReadWriteMany: replicas spread freely
    volume = build(llmd(model={"pvc": {"claimName": "weights"}}, replicas=3))["Deployment"]["spec"]["template"]["spec"]
    assert "affinity" not in volume  # a read-only model volume is the user's to choose


SURGE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
ONE_AT_A_TIME = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}


@pytest.mark.parametrize(
    ("spec", "live_mode", "strategy"),
    [
        # Replicas held on a ReadWriteOnce claim's node: a surge pod would need room (a GPU) on that node.
        ({"resources": {"gpu": {"count": 1}}}, None, ONE_AT_A_TIME),
        ({"replicas": 1}, None, ONE_AT_A_TIME),
        ({"replicas": 3}, "ReadWriteOnce", ONE_AT_A_TIME),  # scaled up on a claim created ReadWriteOnce
        # Free to land anywhere: a new pod serves before an old one goes.
        ({"replicas": 2, "resources": {"gpu": {"count": 1}}}, None, SURGE),
        ({"autoscaling": {"maxReplicas": 3}}, None, SURGE),
        ({"cache": {"existingClaim": "shared"}}, None, SURGE),
        ({"model": {"pvc": {"claimName": "weights"}}}, None, SURGE),
    ],
)
def test_replicas_held_on_one_node_roll_out_one_at_a_time_the_rest_surge(
    spec: dict[str, Any], live_mode: str | None, strategy: dict[str, Any]
) -> None:
    body = llmd(name="m", **spec)
    live = _live_claim(live_mode) if live_mode else None
    deployment = next(c for c in desired_children(body, parse_spec(body["spec"]), IMAGE, live) if c["kind"] == "Deployment")
    assert deployment["spec"]["strategy"] == strategy
    kubernetes_validate.validate(deployment, desired_version="1.29", strict=True)


def test_autoscaler_scales_the_llmdeployment_on_active_requests() -> None:
    children = build(SPECS["gpu-8b"])
    hpa = children["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "fleetlm.dev/v1alpha1",
        "kind": "LLMDeployment",
        "name": "llama-3-1-8b",
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 4)
    assert hpa["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "llm_active_requests"},
                "target": {"type": "AverageValue", "averageValue": "24"},
            },
        }
    ]
    behavior = hpa["behavior"]
    assert (
        behavior["scaleUp"]["stabilizationWindowSeconds"]
        < behavior["scaleDown"]["stabilizationWindowSeconds"]
    )
    assert children["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_autoscaler_metric_choices_and_default_targets() -> None:
    queue = build(SPECS["queue-autoscaling"])["HorizontalPodAutoscaler"]["spec"]
    assert queue["metrics"][0]["pods"]["metric"]["name"] == "llm_queue_size"
    assert queue["metrics"][0]["pods"]["target"]["averageValue"] == "2"
    cpu = build(SPECS["cpu-autoscaling"])["HorizontalPodAutoscaler"]["spec"]
    assert cpu["metrics"] == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}},
        }
    ]
    default = build(llmd(autoscaling={"maxReplicas": 2}))["HorizontalPodAutoscaler"]["spec"]
    assert default["metrics"][0]["pods"]["target"]["averageValue"] == "12"  # 3/4 of maxBatchSize 16


@pytest.mark.parametrize(
    ("spec", "replicas"),
    [
        ({"replicas": 3}, 3),
        ({"replicas": 0}, 0),
        ({"replicas": 1, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}, 2),
        ({"replicas": 9, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}, 5),
        ({"replicas": 4, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}, 4),
    ],
)
def test_deployment_replicas_follow_spec_within_autoscaling_bounds(
    spec: dict[str, Any], replicas: int
) -> None:
    assert build(llmd(**spec))["Deployment"]["spec"]["replicas"] == replicas


def test_service_and_budget_select_the_serving_pods() -> None:
    children = build(SPECS["everything"])
    pod_labels = children["Deployment"]["spec"]["template"]["metadata"]["labels"]
    svc = children["Service"]
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert svc["metadata"]["annotations"] == {"a": "b"}
    for selector in (
        svc["spec"]["selector"],
        children["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    assert children["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    monitor = children["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]


def test_the_service_monitor_carries_the_labels_a_prometheus_selects_by_and_ours_win() -> None:
    monitoring = {"serviceMonitor": True, "serviceMonitorLabels": {"release": "kube-prometheus-stack",
                                                                   "app.kubernetes.io/managed-by": "someone"}}  # fmt: skip
    children = build(llmd(monitoring=monitoring))
    labels = children["ServiceMonitor"]["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus-stack"
    assert labels["app.kubernetes.io/managed-by"] == "fleetlm-operator"  # the operator finds its children by it
    assert "release" not in children["Service"]["metadata"]["labels"]  # the ServiceMonitor's only
    for key in ("-release", "a/b/c", "x" * 64, "Example.com/x"):
        with pytest.raises(InvalidSpec, match="not valid label keys"):
            parse_spec(llmd(monitoring={"serviceMonitor": True, "serviceMonitorLabels": {key: "v"}})["spec"])
    assert parse_spec(llmd(monitoring={"serviceMonitorLabels": {"example.com/team": "ml"}})["spec"])


def test_image_defaults_to_the_operators_and_spec_overrides_it() -> None:
    assert container(build(llmd()))["image"] == IMAGE
    assert container(build(llmd(image="registry.local/fleetlm:dev")))["image"] == "registry.local/fleetlm:dev"


@pytest.mark.parametrize(
    ("resources", "cpus"),
    [({"cpu": "2"}, "2"), ({"cpu": "4500m"}, "4.5"), ({"cpu": "500m"}, "0.5"), ({"cpu": 8, "gpu": {"count": 1}}, None), ({}, None)],
)
def test_cpu_pods_tell_the_server_their_cpu_request_and_never_pin_cores(resources, cpus) -> None:
    flags = args(container(build(llmd(resources=resources))))
    assert flags["--cpu-affinity"] == "none"  # a node's cores are shared with other pods
    assert flags.get("--cpus") == cpus
    assert "--num-threads" not in flags  # the server chooses them from the request and the model


def test_a_hub_mirror_and_its_ca_reach_the_downloader() -> None:
    spec = {"hf": {"repo": "org/m", "endpoint": "https://hub.mirror.local/", "caBundle": {"configMapName": "corp-ca"}}}
    children = build(llmd(model=spec))
    download = container(children, "model-download")
    env = {e["name"]: e.get("value") for e in download["env"]}
    assert env["HF_ENDPOINT"] == "https://hub.mirror.local"
    # Trusted beside the public roots, not instead of them (serving/trust.py)
    assert env["FLEETLM_EXTRA_CA_FILE"] == "/etc/fleetlm/hub-ca/ca.crt" and "SSL_CERT_FILE" not in env
    assert {"name": "hub-ca", "mountPath": "/etc/fleetlm/hub-ca", "readOnly": True} in download["volumeMounts"]
    volumes = {v["name"]: v for v in children["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hub-ca"]["configMap"] == {"name": "corp-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    server = container(children)
    assert "HF_ENDPOINT" not in {e["name"] for e in server["env"]}  # the server reads the volume, not the Hub
    kubernetes_validate.validate(children["Deployment"], desired_version="1.29", strict=True)


def test_the_operators_default_endpoint_applies_unless_the_spec_names_one() -> None:
    body = llmd()
    default = desired_children(body, parse_spec(body["spec"]), IMAGE, hub=HubPin(endpoint="http://mirror:8080"))
    dep = next(c for c in default if c["kind"] == "Deployment")
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert {"name": "HF_ENDPOINT", "value": "http://mirror:8080"} in init["env"]
    own = llmd(model={"hf": {"repo": "org/m", "endpoint": "https://other"}, "tokenizer": "org/tok"})
    children = {c["kind"]: c for c in desired_children(own, parse_spec(own["spec"]), IMAGE, hub=HubPin(endpoint="http://mirror:8080"))}
    for name in ("model-download", "server"):  # a Hub tokenizer is fetched by the server: it needs the mirror too
        assert {"name": "HF_ENDPOINT", "value": "https://other"} in container(children, name)["env"]
    secret = build(llmd(model={"hf": {"repo": "org/m", "caBundle": {"secretName": "ca", "key": "bundle.pem"}}}))
    volumes = {v["name"]: v for v in secret["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hub-ca"]["secret"] == {"secretName": "ca", "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}


def test_a_gguf_file_of_a_multi_quant_repo_reaches_the_downloader() -> None:
    """Repos such as bartowski's hold one GGUF per quantization: hf.ggufFile names the one to serve."""
    body = llmd(model={"hf": {"repo": "org/m-GGUF", "ggufFile": "m-Q8_0.gguf"}})
    download, server = container(build(body), "model-download"), container(build(body), "server")
    assert args(download)["--gguf-file"] == args(server)["--gguf-file"] == "m-Q8_0.gguf"  # the server serves that one
    assert "--gguf-file" not in args(container(build(llmd()), "model-download"))
    # Each GGUF file of a repo and revision has its own cache directory: two deployments sharing a claim,
    # one serving Q4_0/m.gguf and one Q8_0/m.gguf, deleted each other's file (the downloader keeps only its own).
    dirs = {
        args(container(build(llmd(model={"hf": {"repo": "org/m-GGUF", "ggufFile": f}})), "model-download"))["--dest"]
        for f in ("Q4_0/m.gguf", "Q8_0/m.gguf", None)
    }
    assert len(dirs) == 3 and len({d.count("/") for d in dirs}) == 1  # siblings: none inside another's directory
    for bad in ("../m.gguf", "/abs/m.gguf", "m.bin"):
        with pytest.raises(InvalidSpec, match="ggufFile"):
            parse_spec(llmd(model={"hf": {"repo": "org/m-GGUF", "ggufFile": bad}})["spec"])


def test_lora_adapters_are_fetched_into_the_cache_after_the_model_and_served_by_name() -> None:
    body = llmd(
        model={
            "hf": {"repo": "org/m", "endpoint": "https://hub.mirror.local", "caBundle": {"configMapName": "ca"}},
            "tokenSecretRef": {"name": "hf"},
            "adapters": [{"name": "sql", "repo": "org/sql-lora"}, {"name": "acme/tone", "repo": "org/tone-lora", "revision": "v2"}],
        }
    )
    children = build(body)
    pod = children["Deployment"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["model-download", "adapter-download-0", "adapter-download-1"]
    model, sql, tone = pod["initContainers"]
    assert args(sql) == {"--model": "org/sql-lora", "--revision": "main", "--dest": "/models/hf/org--sql-lora/main"}
    assert args(tone)["--dest"] == "/models/hf/org--tone-lora/v2" and "--cache-root" in args(model)  # adapters evict nothing
    for adapter in (sql, tone):  # the model's Hub access: mirror, CA, token
        env = {e["name"]: e for e in adapter["env"]}
        assert env["HF_ENDPOINT"]["value"] == "https://hub.mirror.local" and "HF_TOKEN" in env and "FLEETLM_EXTRA_CA_FILE" in env
        assert adapter["volumeMounts"] == model["volumeMounts"]
    flags = container(children)["args"]
    modules = flags[flags.index("--lora-modules") + 1 : flags.index("--lora-modules") + 3]
    assert modules == ["sql=/models/hf/org--sql-lora/main", "acme/tone=/models/hf/org--tone-lora/v2"]
    assert flags[flags.index("--max-loras") + 1] == "2"  # the spec's 32 at most: beyond the server's default 16
    assert "--lora-modules" not in container(build(llmd()))["args"]
    kubernetes_validate.validate(children["Deployment"], desired_version="1.29", strict=True)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ({"pvc": {"claimName": "w"}, "adapters": [{"name": "a", "repo": "org/a"}]}, "beside an hf model"),
        ({"hf": {"repo": "org/m"}, "adapters": [{"name": "a", "repo": "org/a"}, {"name": "a", "repo": "org/b"}]}, "given twice"),
        ({"hf": {"repo": "org/m"}, "adapters": [{"name": "org/m", "repo": "org/a"}]}, "served name"),
        ({"hf": {"repo": "org/m"}, "servedName": "m", "adapters": [{"name": "m", "repo": "org/a"}]}, "served name"),
    ],
)
def test_adapters_the_server_could_not_serve_are_an_invalid_spec(model: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidSpec, match=words):
        parse_spec(llmd(model=model)["spec"])


def test_empty_toleration_fields_are_left_out_as_the_api_stores_them() -> None:
    """effect "" (every effect) and key "" (every key): the API server drops empty strings, so sending them
    would read as drift on every watch event of the Deployment."""
    from llm_operator.drift import drifted

    def stored(value: Any) -> Any:  # what the API server keeps of it: omitempty drops empty strings
        if isinstance(value, dict):
            return {k: stored(v) for k, v in value.items() if v != ""}
        return [stored(v) for v in value] if isinstance(value, list) else value

    deployment = build(llmd(scheduling={"tolerations": [{"key": "", "operator": "Exists", "effect": ""}]}))["Deployment"]
    assert deployment["spec"]["template"]["spec"]["tolerations"] == [{"operator": "Exists"}]
    assert not drifted(deployment, stored(deployment))


def test_the_documented_inference_pool_selects_the_server_pods_on_the_server_port() -> None:
    """docs/operator.md's InferencePool (Gateway API Inference Extension): its selector picks exactly this
    LLMDeployment's server pods (not another's), and its target port is the port the server listens on."""
    import re
    from pathlib import Path

    import yaml

    from tests.operator.crd_schema import ROOT

    text = Path(ROOT, "docs", "operator.md").read_text()
    pool = yaml.safe_load(re.search(r"<!-- inferencepool-example -->\n```yaml\n(.*?)```", text, re.S).group(1))
    assert (pool["apiVersion"], pool["kind"]) == ("inference.networking.k8s.io/v1", "InferencePool")
    selector = pool["spec"]["selector"]["matchLabels"]
    (port,) = pool["spec"]["targetPorts"]
    assert pool["spec"]["extensionRef"]["name"]

    def pods_labels(name: str) -> dict[str, str]:
        return build(llmd(name=name))["Deployment"]["spec"]["template"]["metadata"]["labels"]

    assert selector.items() <= pods_labels(pool["metadata"]["name"]).items()
    assert not selector.items() <= pods_labels("another-model").items()
    server = container(build(llmd(name=pool["metadata"]["name"])))
    assert port["number"] == int(args(server)["--port"])
    assert port["number"] in {p["containerPort"] for p in server["ports"]}
