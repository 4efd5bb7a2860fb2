"""The CRD itself: a valid, structural apiextensions/v1 object with the subresources and columns users rely on."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.operator.crd_schema import crd, schema


@pytest.mark.parametrize("version", ["1.29", "1.37"])
def test_crd_is_a_valid_apiextensions_object(version: str) -> None:
    kubernetes_validate.validate(crd(), desired_version=version, strict=True)


def _nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in node.get("properties", {}).items():
        found += _nodes(child, f"{path}.{name}")
    if "items" in node:
        found += _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _nodes(node["additionalProperties"], f"{path}{{}}")
    return found


def test_schema_is_structural() -> None:
    # The API server refuses a non-structural schema: every node typed, unless int-or-string or opaque.
    for path, node in _nodes(schema()):
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "type" in node, f"{path} has no type"
        if node.get("x-kubernetes-list-type") == "map":
            assert set(node["x-kubernetes-list-map-keys"]) <= set(node["items"]["required"]), path


def test_every_default_is_valid_for_its_own_node() -> None:
    for path, node in _nodes(schema()):
        if "default" in node:
            assert not list(jsonschema.Draft7Validator(node).iter_errors(node["default"])), path


def test_subresources_make_scale_and_wait_work() -> None:
    version = crd()["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    conditions = schema()["properties"]["status"]["properties"]["conditions"]["items"]["properties"]
    assert {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"} <= set(
        conditions
    )
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Model": ".status.model",
        "Ready": ".status.readyReplicas",
        "Replicas": ".status.replicas",
        "Phase": ".status.phase",
        "Endpoint": ".status.endpoint",
        "Seqs": ".status.capacity.maxConcurrentSequences",  # -o wide
        "Revision": ".status.resolvedRevision",  # -o wide
        "Age": ".metadata.creationTimestamp",
    }
    assert crd()["spec"]["names"]["shortNames"] == ["llmd"]
