"""Example and hand-made LLMDeployments against the CRD's own schema and CEL rules (tests/operator/crd_schema)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from llm_operator.spec import InvalidSpec, parse_spec

from tests.operator.crd_schema import ROOT, schema, validate

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _llmds(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "LLMDeployment"]


def test_there_is_a_cpu_demo_and_a_gpu_example() -> None:
    specs = [d["spec"] for p in EXAMPLES for d in _llmds(p)]
    assert any("gpu" not in s.get("resources", {}) for s in specs)
    assert any(
        s.get("resources", {}).get("gpu", {}).get("count", 0) >= 1 and "autoscaling" in s for s in specs
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_accepted(path: Path) -> None:
    docs = _llmds(path)
    assert docs
    for doc in docs:
        assert validate(doc) == []
        parse_spec(doc["spec"])


GOOD = {
    "apiVersion": "fleetlm.dev/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "good"},
    "spec": {"model": {"hf": {"repo": "org/name"}}},
}


def _with(path: str, value: Any, base: dict[str, Any] = GOOD) -> dict[str, Any]:
    obj = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = obj
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return obj


def test_minimal_resource_is_accepted() -> None:
    assert validate(GOOD) == []


# (resource, a fragment of the expected error, whether a CEL rule (mirrored by the operator) catches it)
BAD = {
    "no source": (_with("spec.model", {"servedName": "x"}), "exactly one source", True),
    "two sources": (_with("spec.model.pvc", {"claimName": "weights"}), "exactly one source", True),
    "token for pvc": (
        _with("spec.model", {"pvc": {"claimName": "w"}, "tokenSecretRef": {"name": "t"}}),
        "tokenSecretRef applies to hf models only",
        True,
    ),
    "adapters for pvc": (
        _with("spec.model", {"pvc": {"claimName": "w"}, "adapters": [{"name": "a", "repo": "org/a"}]}),
        "adapters come from the Hub beside an hf model",
        True,
    ),
    "min above max": (
        _with("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}),
        "must not exceed",
        True,
    ),
    "cpu metric without request": (
        _with("spec.autoscaling", {"maxReplicas": 3, "metric": "cpu"}),
        "needs resources.cpu",
        True,
    ),
    "absolute pvc path": (
        _with("spec.model", {"pvc": {"claimName": "w", "path": "/etc"}}),
        "cannot climb",
        True,
    ),
    "pvc path escapes": (
        _with("spec.model", {"pvc": {"claimName": "w", "path": "a/../.."}}),
        "cannot climb",
        True,
    ),
    "existing claim with class": (
        _with("spec.cache", {"existingClaim": "shared", "storageClassName": "nfs"}),
        "used as it is",
        True,
    ),
    "env value and valueFrom": (
        _with("spec.engine", {"env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {}}}]}),
        "either value or valueFrom",
        True,
    ),
    "ca bundle from nowhere": (
        _with("spec.model", {"hf": {"repo": "org/name", "caBundle": {"key": "ca.pem"}}}),
        "exactly one of configMapName or secretName",
        True,
    ),
    "ca bundle from two places": (
        _with("spec.model", {"hf": {"repo": "org/name", "caBundle": {"configMapName": "a", "secretName": "b"}}}),
        "exactly one of configMapName or secretName",
        True,
    ),
    "endpoint not a url": (_with("spec.model", {"hf": {"repo": "org/name", "endpoint": "mirror.local"}}), "does not match", False),
    "name not a DNS label": (_with("metadata.name", "Llama_3"), "DNS-1035", False),
    "name too long": (_with("metadata.name", "a" * 64), "DNS-1035", False),
    "unknown dtype": (_with("spec.engine", {"dtype": "int3"}), "is not one of", False),
    "batch of zero": (_with("spec.engine", {"maxBatchSize": 0}), "less than the minimum", False),
    "negative replicas": (_with("spec.replicas", -1), "less than the minimum", False),
    "max replicas missing": (
        _with("spec.autoscaling", {"minReplicas": 1}),
        "'maxReplicas' is a required",
        False,
    ),
    "bad gpu resource name": (
        _with("spec.resources", {"gpu": {"resourceName": "gpu"}}),
        "does not match",
        False,
    ),
    "bad quantity": (_with("spec.resources", {"memory": "lots"}), "does not match", False),
    "bad repo id": (_with("spec.model", {"hf": {"repo": "a/b/c"}}), "does not match", False),
    "typo in a field": (_with("spec.replica", 2), "unknown field", False),
    "bad service monitor label": (
        _with("spec.monitoring", {"serviceMonitor": True, "serviceMonitorLabels": {"release": "kube prometheus"}}),
        "does not match",
        False,
    ),
    "no spec": ({k: v for k, v in GOOD.items() if k != "spec"}, "'spec' is a required", False),
    # Accepted here, the ServiceMonitor would be refused by prometheus-operator's CRD, and with it every child.
    "scrape interval prometheus-operator refuses": (_with("spec.monitoring", {"interval": "30s1m"}), "does not match", False),
    "scrape interval in seconds twice": (_with("spec.monitoring", {"interval": "1s1s"}), "does not match", False),
    "one pull secret twice": (
        _with("spec.imagePullSecrets", [{"name": "registry"}, {"name": "registry"}]),
        "Duplicate value",
        False,
    ),
    "one env variable twice": (
        _with("spec.engine", {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}),
        "Duplicate value",
        False,
    ),
}


@pytest.mark.parametrize("interval", ["30s", "1m30s", "500ms", "0", "1d", "2w", "1h5m"])
def test_scrape_intervals_prometheus_operator_takes_are_accepted(interval: str) -> None:
    assert validate(_with("spec.monitoring", {"serviceMonitor": True, "interval": interval})) == []


@pytest.mark.parametrize("name", BAD)
def test_bad_resources_are_rejected_with_a_clear_message(name: str) -> None:
    obj, fragment, _ = BAD[name]
    errors = validate(obj)
    assert any(fragment in e for e in errors), errors


@pytest.mark.parametrize("name", [n for n, (_, _, is_cel) in BAD.items() if is_cel])
def test_operator_mirrors_every_cel_rule(name: str) -> None:
    # Clusters that do not evaluate CEL store such specs; the operator must refuse them the same way.
    obj, fragment, _ = BAD[name]
    with pytest.raises(InvalidSpec, match=fragment):
        parse_spec(obj["spec"])


def test_every_cel_rule_has_a_bad_example() -> None:
    def messages(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [rule["message"] for rule in node.get("x-kubernetes-validations", [])]
            return own + [m for child in node.values() for m in messages(child)]
        return []

    fragments = [fragment for _, fragment, _ in BAD.values()]
    for message in messages(schema()):
        assert any(f in message for f in fragments), f"no bad example exercises: {message}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_the_examples_other_objects_are_valid_kubernetes(path: Path) -> None:
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") != "LLMDeployment":
            kubernetes_validate.validate(doc, desired_version="1.29", strict=True)
        if doc and doc.get("kind") == "Pod":  # Pod Security's "restricted" level, which namespaces may enforce
            pod = doc["spec"]
            assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for c in pod["containers"]:
                sec = c["securityContext"]
                assert sec["allowPrivilegeEscalation"] is False and sec["capabilities"] == {"drop": ["ALL"]}
            assert all(c["image"].endswith("-cpu") for c in pod["containers"]), "kind (e2e/kind.sh) loads the CPU image"
