"""LLMDeployment bodies for tests, shaped as the API server stores them (uid, namespace, generation)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tests.operator.crd_schema import ROOT


def llmd(name: str = "demo", namespace: str = "ml", **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"hf": {"repo": "org/model"}})
    return {
        "apiVersion": "fleetlm.dev/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1},
        "spec": copy.deepcopy(spec),
    }


def example(file: str) -> dict[str, Any]:
    body = yaml.safe_load(Path(ROOT, "examples", file).read_text())
    body["metadata"].update(namespace="ml", uid="uid-example", generation=1)
    return body
