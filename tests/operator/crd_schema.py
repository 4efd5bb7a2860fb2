"""Validate objects against the LLMDeployment CRD the way the API server does, offline.

In the API server's order: structural defaulting, then the OpenAPI schema (jsonschema evaluates the
openAPIV3Schema subset the CRD uses), unknown fields rejected as `kubectl apply` does by default (strict field
validation), then every x-kubernetes-validations CEL rule on each node that is present, with the node as
`self` (the `cel` package from PyPI, common-expression-language, evaluates them).
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import cel
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "llmdeployments.fleetlm.dev.yaml"


@cache
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(node_schema: dict[str, Any], value: Any) -> Any:
    """Fill absent properties that declare a default, recursively (defaults are themselves defaulted)."""
    if not isinstance(value, dict) or "properties" not in node_schema:
        return value
    out = dict(value)
    for name, prop in node_schema["properties"].items():
        if name not in out and "default" in prop:
            out[name] = copy.deepcopy(prop["default"])
        if name in out:
            out[name] = apply_defaults(prop, out[name])
    return out


def validate(obj: dict[str, Any]) -> list[str]:
    """Every reason the API server would reject `obj` (an LLMDeployment); empty when it is accepted."""
    root = schema()
    obj = apply_defaults(root, obj)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(obj)]
    errors += _unknown_fields(root, obj, "")
    errors += _duplicate_keys(root, obj, "")
    if not errors:  # like the API server, CEL runs on schema-valid objects only
        errors += _cel_errors(root, obj, "")
    return errors


@cache
def _validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(schema())


def _unknown_fields(node: dict[str, Any], value: Any, path: str) -> list[str]:
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict) and "properties" in node:
        errors = [f"{path}.{k}: unknown field" for k in value if k not in node["properties"]]
        for k, v in value.items():
            if k in node["properties"] and k != "metadata":
                errors += _unknown_fields(node["properties"][k], v, f"{path}.{k}")
        return errors
    if isinstance(value, list) and "items" in node:
        return [
            e for i, item in enumerate(value) for e in _unknown_fields(node["items"], item, f"{path}[{i}]")
        ]
    return []


def _duplicate_keys(node: dict[str, Any], value: Any, path: str) -> list[str]:
    """A list declared x-kubernetes-list-type: map holds one item per key (x-kubernetes-list-map-keys);
    the API server refuses a second ("Duplicate value")."""
    errors = []
    if isinstance(value, list):
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            seen: set[tuple[Any, ...]] = set()
            for i, item in enumerate(value):
                key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)
                if key in seen:
                    errors.append(f"{path}[{i}]: Duplicate value: {dict(zip(keys, key, strict=True))}")
                seen.add(key)
        if "items" in node:
            for i, item in enumerate(value):
                errors += _duplicate_keys(node["items"], item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            if k in node.get("properties", {}) and k != "metadata":
                errors += _duplicate_keys(node["properties"][k], v, f"{path}.{k}")
    return errors


def _cel_errors(node: dict[str, Any], value: Any, path: str) -> list[str]:
    errors = []
    for rule in node.get("x-kubernetes-validations", []):
        if not cel.evaluate(rule["rule"], {"self": value}):
            errors.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for k, v in value.items():
            if k in node.get("properties", {}):
                errors += _cel_errors(node["properties"][k], v, f"{path}.{k}")
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            errors += _cel_errors(node["items"], item, f"{path}[{i}]")
    return errors
