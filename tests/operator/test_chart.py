"""The Helm chart, rendered by Helm's own engine (helm-python-sdk binds Helm's Go SDK; no helm binary)."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from llm_operator.config import parse_args

from tests.operator.crd_schema import CRD_PATH, ROOT

CHART = ROOT / "charts" / "fleetlm-operator"


def render(values: dict[str, Any] | None = None, release: str = "fleetlm-operator") -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values or {}, name=release, namespace="fleetlm-system", is_install=True)
    yamls = [text for path, text in manifests.items() if path.endswith(".yaml")]  # not NOTES.txt
    return [doc for text in yamls for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str, hooks: bool = False) -> list[dict[str, Any]]:
    """The documents of a kind; Helm hooks (made and deleted around an install or uninstall) only if asked."""
    return [d for d in docs if d["kind"] == kind and (hooks or "helm.sh/hook" not in d["metadata"].get("annotations", {}))]


def operator_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = by_kind(docs, "Deployment")
    return {
        e["name"]: e["value"]
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }


def test_chart_carries_the_crd_unchanged() -> None:
    assert (CHART / "crds" / CRD_PATH.name).read_bytes() == CRD_PATH.read_bytes(), (
        "run: cp crds/*.yaml charts/fleetlm-operator/crds/"
    )


@pytest.mark.parametrize("values", [None, {"watchNamespaces": ["ml"], "replicaCount": 1, "peering": {"enabled": False}}])
def test_chart_lints_clean(values: dict[str, Any] | None) -> None:
    result = helm.lint(str(CHART), values, strict=True)  # helm lint --strict
    assert result["errors"] == []
    assert not [m for m in result["messages"] if m["severity"] > 1], result["messages"]  # only INFO notes


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"watchNamespaces": ["ml", "research"], "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}},
        {"monitoring": {"dashboard": {"enabled": True}, "prometheusRule": {"enabled": True}}, "replicaCount": 1},
    ],
)
@pytest.mark.parametrize("version", ["1.29", "1.37"])
def test_rendered_objects_are_valid_kubernetes(values: dict[str, Any], version: str) -> None:
    docs = render(values)
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"} <= {
        d["kind"] for d in docs
    }
    with helm.Chart.load(str(CHART)) as chart:
        crds = [doc for crd in chart.crds for doc in yaml.safe_load_all(crd["data"]) if doc]
    assert {c["metadata"]["name"] for c in crds} == {
        "llmdeployments.fleetlm.dev",
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }
    for doc in docs + crds:
        if doc["apiVersion"].startswith(("kopf.dev/", "monitoring.coreos.com/")):
            continue  # custom kinds: kubernetes-validate knows the built-in schemas only
        kubernetes_validate.validate(doc, desired_version=version, strict=True)


def test_the_longest_release_name_gives_names_the_api_accepts() -> None:
    """Helm allows release names of 53 characters; every object name derived from one must still be a valid
    name for its kind (Services: a DNS-1035 label of at most 63)."""
    release = "a-very-long-release-name-for-the-team-llm-serving-xyz"[:53]  # without the chart name
    docs = render({"preDeleteHook": {"enabled": True}}, release=release)
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= (63 if doc["kind"] in {"Service", "Deployment", "ServiceAccount", "Job"} else 253), name
    services = [d["metadata"]["name"] for d in by_kind(docs, "Service")]
    assert len(set(services)) == len(services) and all(n.endswith("-metrics") for n in services)


def test_cluster_wide_install() -> None:
    docs = render()
    assert [b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")] == [
        "fleetlm-operator-cluster",
        "fleetlm-operator",
    ]
    assert by_kind(docs, "RoleBinding") == []
    assert [p["metadata"]["name"] for p in by_kind(docs, "ClusterKopfPeering")] == ["fleetlm-operator"]
    config = parse_args([], env=operator_env(docs))
    assert config.clusterwide and not config.standalone and config.peering == "fleetlm-operator"
    assert config.default_image == "ghcr.io/fleetlm/fleetlm:0.1.0"
    assert (config.resync_seconds, config.require_gpu_nodes, config.metrics_port, config.health_port) == (
        60,
        True,
        8080,
        8081,
    )
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/fleetlm/fleetlm-operator:0.1.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_namespaced_install_binds_and_peers_per_namespace() -> None:
    docs = render(
        {
            "watchNamespaces": ["ml", "research"],
            "servingImage": "registry.local/fleetlm:1",
            "requireGpuNodes": False,
        }
    )
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml", "research"]
    assert all(
        b["roleRef"]
        == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "fleetlm-operator"}
        for b in bindings
    )
    assert [b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")] == ["fleetlm-operator-cluster"]
    assert sorted(p["metadata"]["namespace"] for p in by_kind(docs, "KopfPeering")) == ["ml", "research"]
    config = parse_args([], env=operator_env(docs))
    assert config.namespaces == ("ml", "research")
    assert config.default_image == "registry.local/fleetlm:1" and config.require_gpu_nodes is False


def test_the_operators_service_monitor_carries_extra_labels_and_the_charts_win() -> None:
    labels = {"release": "kube-prometheus-stack", "app.kubernetes.io/name": "other"}
    docs = render({"metrics": {"serviceMonitor": {"enabled": True, "labels": labels}}})
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/name"] == "fleetlm-operator"
    (default,) = by_kind(render({"metrics": {"serviceMonitor": {"enabled": True}}}), "ServiceMonitor")
    assert "release" not in default["metadata"]["labels"]


def test_single_replica_without_peering() -> None:
    docs = render({"replicaCount": 1, "peering": {"enabled": False}})
    assert by_kind(docs, "ClusterKopfPeering") == []
    assert parse_args([], env=operator_env(docs)).standalone


def _granted(docs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for role in by_kind(docs, "ClusterRole")
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_is_least_privilege() -> None:
    """What the operator needs is derived from its calls in tests/operator/test_rbac.py; here, what it must
    never get."""
    granted = _granted(render())
    assert not {("", "secrets", v) for v in ("list", "watch", "create", "patch", "delete")} & granted
    # update only where admission asks for it: blockOwnerDeletion on the children (test_rbac.py).
    allowed = {("fleetlm.dev", "llmdeployments/finalizers", "update")}
    assert not {(g, r, v) for g, r, v in granted if v in ("update", "deletecollection", "*") or r == "*"} - allowed


def test_uninstall_stops_the_operator_before_its_rbac_goes() -> None:
    """A pre-delete hook (run before Helm deletes anything) scales the operator to zero and waits for
    its pods, with an account that may do only that; the hook's pods are not the operator's."""
    docs = render()
    hooks = [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"]
    assert hooks and all(by_kind(hooks, d["kind"], hooks=True) for d in hooks)
    assert sorted(d["kind"] for d in hooks) == ["ClusterRole", "ClusterRoleBinding", "Job", "Role", "RoleBinding", "ServiceAccount"]
    weights = {d["kind"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in hooks}
    assert weights["Job"] > max(weights[k] for k in ("Role", "RoleBinding", "ServiceAccount", "ClusterRole"))  # RBAC first
    (job,) = by_kind(hooks, "Job", hooks=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "llm_operator.shutdown"]
    assert "--release-finalizers" in container["args"]  # then the operator's finalizer comes off its LLMDeployments
    flags = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if "=" in a)
    (operator,) = by_kind(docs, "Deployment")
    assert flags["deployment"] == operator["metadata"]["name"] and flags["namespace"] == "fleetlm-system"
    selector = dict(pair.split("=") for pair in flags["selector"].split(","))
    assert selector == operator["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= job["spec"]["template"]["metadata"]["labels"].items()  # it does not wait for itself
    assert container["image"] == operator["spec"]["template"]["spec"]["containers"][0]["image"]
    (role,) = by_kind(hooks, "Role", hooks=True)
    assert role["rules"] == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": [flags["deployment"]], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    ]
    assert pod["serviceAccountName"] == by_kind(hooks, "ServiceAccount", hooks=True)[0]["metadata"]["name"]
    (finalizers,) = by_kind(hooks, "ClusterRole", hooks=True)
    assert finalizers["rules"] == [{"apiGroups": ["fleetlm.dev"], "resources": ["llmdeployments"], "verbs": ["get", "list", "patch"]}]
    (binding,) = by_kind(hooks, "ClusterRoleBinding", hooks=True)
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"] and binding["roleRef"]["name"] == finalizers["metadata"]["name"]
    # A namespaced install releases the finalizers of its namespaces only, with a Role in each.
    scoped = [d for d in render({"watchNamespaces": ["team-a", "team-b"]}) if d["metadata"].get("annotations", {}).get("helm.sh/hook")]
    assert not by_kind(scoped, "ClusterRole", hooks=True)
    assert {r["metadata"]["namespace"] for r in by_kind(scoped, "Role", hooks=True) if r["metadata"]["name"].endswith("-finalizers")} == {"team-a", "team-b"}
    (scoped_job,) = by_kind(scoped, "Job", hooks=True)
    assert [a for a in scoped_job["spec"]["template"]["spec"]["containers"][0]["args"] if "watch-namespace" in a] == [
        "--watch-namespace=team-a", "--watch-namespace=team-b"]  # fmt: skip
    assert not [d for d in render({"preDeleteHook": {"enabled": False}}) if d["kind"] == "Job"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": "two"}, "at '/replicaCount': got string, want integer"),
        ({"replicaCont": 2}, "additional properties 'replicaCont' not allowed"),  # a misspelt key
        ({"peering": {"enable": False}}, "additional properties 'enable' not allowed"),
        ({"logLevel": "verbose"}, "/logLevel"),
        ({"watchNamespaces": ["ML"]}, "/watchNamespaces/0"),
        ({"ports": {"metrics": 0}}, "/ports/metrics"),
        ({"metrics": {"serviceMonitor": {"labels": {"release": "a b"}}}}, "/metrics/serviceMonitor/labels/release"),
        ({"metrics": {"serviceMonitor": {"labels": {"-release": "x"}}}}, "invalid propertyName '-release'"),
    ],
)
def test_bad_values_are_refused_by_the_schema_with_the_path(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError) as error:
        render(values)
    assert message in str(error.value)


def test_every_default_value_is_in_the_schema() -> None:
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults) <= set(schema["properties"])
    for key, value in defaults.items():
        if isinstance(value, dict) and schema["properties"][key].get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"][key]["properties"]), key


MONITORING = {"monitoring": {"dashboard": {"enabled": True}, "prometheusRule": {"enabled": True}}}


def _exposed_metric_names() -> set[str]:
    """Every sample name the serving pod and the operator expose (counters with _total, histograms with
    _bucket/_sum/_count)."""
    import llm_operator.metrics  # noqa: F401 - registers the operator's metrics
    from prometheus_client import REGISTRY

    from serving.metrics import Metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    families = [*Metrics("m").registry.collect(), *REGISTRY.collect()]  # labelled ones may have no samples yet
    return {f.name + end for f in families for end in suffixes.get(f.type, ("",))}


def test_monitoring_is_installed_by_a_toggle_and_reads_only_metrics_that_exist() -> None:
    import json
    import re

    docs = render(MONITORING)
    (dashboard,) = by_kind(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dashboard["data"]["fleetlm.json"])
    (rule,) = by_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {"FleetLMNoReadyReplicas", "FleetLMDegraded", "FleetLMQueueGrowing", "FleetLMKVCacheFull",
                           "FleetLMSlowFirstToken"}  # fmt: skip
    assert "> 5" in alerts["FleetLMSlowFirstToken"]["expr"]  # the values' threshold
    assert "{{ $labels.namespace }}" in alerts["FleetLMNoReadyReplicas"]["annotations"]["summary"]
    adapter = yaml.safe_load((CHART / "prometheus-adapter-values.yaml").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]] + [a["expr"] for a in alerts.values()]
    exprs += [r["seriesQuery"] for r in adapter["rules"]["custom"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:llm|fleetlm)_[a-z_]+)\b", e)}
    assert used and used - _exposed_metric_names() == set()
    # The adapter serves exactly the metrics the operator's HPAs ask for.
    from llm_operator.children import METRIC_NAMES

    assert {r["name"]["as"] for r in adapter["rules"]["custom"]} == set(METRIC_NAMES.values())
    assert not {"ConfigMap", "PrometheusRule"} & {d["kind"] for d in render()}  # off by default
    assert helm.lint(str(CHART), MONITORING, strict=True)["errors"] == []
