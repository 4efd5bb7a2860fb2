"""The operator's typed spec carries exactly the CRD's defaults."""

from __future__ import annotations

import pytest
from llm_operator.spec import parse_spec

from tests.operator.crd_schema import apply_defaults, schema

# Every optional object present but empty, so that nested defaults show on both sides.
SPARSE = {
    "model": {"hf": {"repo": "org/name"}, "tokenSecretRef": {"name": "t"}},
    "engine": {"apiKeySecretRef": {"name": "k"}},
    "autoscaling": {"maxReplicas": 3},
    "resources": {"gpu": {}},
    "scheduling": {},
}
SPARSE_PVC = {"model": {"pvc": {"claimName": "weights"}}}


def test_defaults_match_the_crd() -> None:
    spec_schema = schema()["properties"]["spec"]
    for sparse in (SPARSE, SPARSE_PVC):
        crd_defaulted = apply_defaults(spec_schema, sparse)
        ours = parse_spec(sparse).model_dump(by_alias=True, exclude_none=True, exclude_defaults=False)
        assert _without_empty(ours) == _without_empty(crd_defaulted)


def _without_empty(value: object) -> object:
    # The model keeps empty collections where the API server stores nothing; they mean the same.
    if isinstance(value, dict):
        pruned = {k: _without_empty(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in ({}, [], ())}
    if isinstance(value, (list, tuple)):
        return [_without_empty(v) for v in value]
    return value


def test_parse_reports_every_broken_rule_with_its_path() -> None:
    from llm_operator.spec import InvalidSpec

    try:
        parse_spec({"model": {"hf": {"repo": "a/b"}}, "engine": {"dtype": "int3"}, "replicas": "many"})
    except InvalidSpec as error:
        message = str(error)
    else:
        raise AssertionError("accepted an invalid spec")
    assert "engine.dtype" in message and "replicas" in message


@pytest.mark.parametrize(("field", "value", "says"), [
    (("resources", "cpu"), "1e.5", "not a Kubernetes quantity"),  # the CRD's pattern lets it through
    (("resources", "memory"), "-2Gi", "negative"),
    (("resources", "gpu", "memory"), "80 GB", "not a Kubernetes quantity"),
    (("cache", "size"), "lots", "not a Kubernetes quantity"),
])  # fmt: skip
def test_a_quantity_the_client_cannot_parse_is_an_invalid_spec(field, value, says) -> None:
    from llm_operator.spec import InvalidSpec

    raw: dict = {"model": {"hf": {"repo": "a/b"}}}
    node = raw
    for key in field[:-1]:
        node = node.setdefault(key, {})
    node[field[-1]] = value
    with pytest.raises(InvalidSpec, match=says) as error:
        parse_spec(raw)
    assert ".".join(field) in str(error.value)


def test_quantities_in_every_form_kubernetes_writes_them_parse() -> None:
    spec = parse_spec({"model": {"hf": {"repo": "a/b"}}, "resources": {"cpu": "1500m", "memory": 2147483648,
                       "gpu": {"memory": "80Gi"}}, "cache": {"size": "1e11"}})  # fmt: skip
    assert (spec.resources.cpu, spec.resources.memory, spec.cache.size) == ("1500m", 2147483648, "1e11")
