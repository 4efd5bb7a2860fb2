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


@pytest.mark.parametrize(("field", "value", "says"), [
    (("resources", "gpu", "product"), "NVIDIA-H100-80GB-HBM3-" + "x" * 42, "label value"),  # 64 characters
    (("resources", "gpu", "product"), "NVIDIA H100", "label value"),
    (("scheduling", "nodeSelector"), {"pool": "gpu nodes"}, "not a valid node label"),
    (("scheduling", "nodeSelector"), {"bad key": "gpu"}, "not a valid node label"),
    (("service", "annotations"), {"-starts-badly": "x"}, "not a valid annotation key"),
])  # fmt: skip
def test_what_becomes_a_label_or_annotation_of_a_child_follows_the_apis_rules(field, value, says) -> None:
    """A value the API server would refuse in the pod spec (nodeSelector, the GPU product's node label)
    or the Service is an InvalidSpec before anything is applied, not a ChildRejected dry run."""
    from llm_operator.spec import InvalidSpec

    raw: dict = {"model": {"hf": {"repo": "a/b"}}}
    node = raw
    for key in field[:-1]:
        node = node.setdefault(key, {})
    node[field[-1]] = value
    with pytest.raises(InvalidSpec, match=says) as error:
        parse_spec(raw)
    assert ".".join(field) in str(error.value)
    ok = parse_spec({"model": {"hf": {"repo": "a/b"}}, "resources": {"gpu": {"product": "NVIDIA-H100-80GB-HBM3"}},
                     "scheduling": {"nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}},
                     "service": {"annotations": {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"}}})  # fmt: skip
    assert ok.resources.gpu is not None and ok.resources.gpu.product == "NVIDIA-H100-80GB-HBM3"


def test_the_crd_checks_label_values_as_the_operator_does() -> None:
    from llm_operator.spec import LABEL_VALUE

    props = schema()["properties"]["spec"]["properties"]
    product = props["resources"]["properties"]["gpu"]["properties"]["product"]
    selector = props["scheduling"]["properties"]["nodeSelector"]["additionalProperties"]
    for rule in (product, selector):
        assert rule["pattern"] == LABEL_VALUE.pattern and rule["maxLength"] == 63


@pytest.mark.parametrize(("name", "valid"), [("llama", True), ("a" * 63, True), ("a" * 64, False), ("9lives", False),
                                             ("Llama", False), ("llama-", False), ("ll.ama", False)])  # fmt: skip
def test_the_name_rule_of_the_crds_cel_is_the_operators_too(name, valid) -> None:
    """For API servers that do not evaluate the CRD's CEL rules, the operator checks the name itself."""
    import re

    from llm_operator.spec import check_name

    cel = schema()["x-kubernetes-validations"][0]["rule"]
    pattern = re.search(r"matches\('([^']+)'\)", cel).group(1)
    assert (re.fullmatch(pattern, name) is not None and len(name) <= 63) == valid
    assert (check_name(name) is None) == valid
