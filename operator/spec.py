"""The LLMDeployment spec as typed data, with the CRD's defaults and cross-field rules.

The API server applies the CRD's defaults and validates the schema; the CEL rules (x-kubernetes-validations)
are enforced only on clusters that evaluate them. The operator checks the same rules here so a spec that got
past an older API server becomes a Degraded condition instead of half-built children. Defaults must equal the
CRD's: tests/operator/test_spec.py compares the two.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from kubernetes.utils.quantity import parse_quantity
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel


def _quantity(value: int | str) -> int | str:
    """A Kubernetes resource quantity the operator can compute with: the CRD's pattern lets through some
    strings (an exponent like `1e.5`) that the kubernetes client cannot parse, nor the API server in a
    Pod's resources; and a negative size or request means nothing."""
    try:
        parsed = parse_quantity(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 16Gi)") from None
    if parsed < 0:
        raise ValueError(f"{value!r} is negative")
    return value


Quantity = Annotated[int | str, AfterValidator(_quantity)]


class _Model(BaseModel):
    # extra="ignore" mirrors the API server, which prunes fields the schema does not declare.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore")


class CaBundleRef(_Model):
    """A CA bundle (PEM) in a ConfigMap or a Secret of the resource's namespace: a mirror's own CA."""

    config_map_name: str | None = None
    secret_name: str | None = None
    key: str = "ca.crt"

    @property
    def source(self) -> tuple[str, str]:
        """(kind, name) of the object holding the bundle."""
        if self.config_map_name is not None:
            return "ConfigMap", self.config_map_name
        assert self.secret_name is not None
        return "Secret", self.secret_name

    @model_validator(mode="after")
    def _one_source(self) -> CaBundleRef:
        if (self.config_map_name is None) == (self.secret_name is None):
            raise ValueError("caBundle needs exactly one of configMapName or secretName")
        return self


class HfSource(_Model):
    repo: str
    revision: str = "main"
    # A Hub mirror (HF_ENDPOINT), e.g. an in-cluster proxy for clusters that cannot reach the Hub;
    # the operator's --hf-endpoint when unset.
    endpoint: str | None = None
    ca_bundle: CaBundleRef | None = None
    # The GGUF file to serve of a repo that holds several quantizations (the downloader's --gguf-file).
    gguf_file: str | None = None

    @model_validator(mode="after")
    def _endpoint_is_a_url(self) -> HfSource:
        if self.endpoint is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.endpoint):
            raise ValueError(f"hf.endpoint must be an http(s) URL, got {self.endpoint!r}")
        if self.gguf_file is not None and (not self.gguf_file.endswith(".gguf") or self.gguf_file.startswith("/") or ".." in self.gguf_file.split("/")):
            raise ValueError(f"hf.ggufFile must be a .gguf file's path in the repo, got {self.gguf_file!r}")
        return self


class PvcSource(_Model):
    claim_name: str
    path: str = ""

    @model_validator(mode="after")
    def _stays_inside_claim(self) -> PvcSource:
        if self.path.startswith("/") or ".." in self.path.split("/"):
            raise ValueError("pvc.path is relative to the claim's root and cannot climb out of it")
        return self


class TokenSecretRef(_Model):
    name: str
    key: str = "HF_TOKEN"


class ApiKeySecretRef(_Model):
    name: str
    key: str = "api-key"


class AdapterSource(_Model):
    """A LoRA adapter served beside the model: a Hub repo the pod fetches into the cache volume."""

    name: str
    repo: str
    revision: str = "main"


class ModelSpec(_Model):
    hf: HfSource | None = None
    pvc: PvcSource | None = None
    served_name: str | None = None
    tokenizer: str | None = None
    token_secret_ref: TokenSecretRef | None = None
    adapters: tuple[AdapterSource, ...] = ()

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.hf is None) == (self.pvc is None):
            raise ValueError("model needs exactly one source: hf or pvc")
        if self.token_secret_ref is not None and self.hf is None:
            raise ValueError("tokenSecretRef applies to hf models only")
        if self.adapters and self.hf is None:
            raise ValueError("adapters come from the Hub beside an hf model")
        names = [a.name for a in self.adapters]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"adapters: the name {twice[0]!r} is given twice")
        served = self.served_name or (self.hf.repo if self.hf is not None else None)
        if served in names:
            raise ValueError(f"adapters: {served!r} is the model's served name")
        return self


class EnvVar(_Model):
    name: str
    value: str | None = None
    value_from: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_value(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("an env entry has either value or valueFrom")
        return self


class EngineSpec(_Model):
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: Literal["none", "q8_0", "q4_0"] = "none"
    max_batch_size: int = 16
    max_seq_len: int = 2048
    queue_capacity: int = 100
    drain_timeout_seconds: int = 30
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    api_key_secret_ref: ApiKeySecretRef | None = None
    extra_args: tuple[str, ...] = ()
    env: tuple[EnvVar, ...] = ()


class AutoscalingSpec(_Model):
    min_replicas: int = 1
    max_replicas: int
    metric: Literal["activeRequests", "queueSize", "cpu"] = "activeRequests"
    target: int | None = None
    behavior: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must not exceed autoscaling.maxReplicas")
        return self


# A label key as the API server validates it: an optional DNS-subdomain prefix (at most 253) and a name of
# at most 63; a label value: at most 63, alphanumeric at both ends; a DNS-1035 label (a Service's name).
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def _label_key(key: str) -> bool:
    return len(key) <= 317 and LABEL_KEY.fullmatch(key) is not None


def check_name(name: str) -> str | None:
    """What is wrong with an LLMDeployment's name (the CRD's CEL rule, for API servers without CEL)."""
    if DNS_1035.fullmatch(name):
        return None
    return f"metadata.name {name!r}: the name becomes a Service name: a DNS-1035 label (lower case, starts with a letter, at most 63 characters)"


class GpuSpec(_Model):
    count: int = 1
    resource_name: str = "nvidia.com/gpu"
    product: str | None = None
    memory: Quantity | None = None  # one GPU's memory, for the fit check; else the product's, from a table

    @field_validator("product")
    @classmethod
    def _product_is_a_label_value(cls, product: str | None) -> str | None:
        if product is not None and not LABEL_VALUE.fullmatch(product):
            raise ValueError(
                f"{product!r} is matched against the node label nvidia.com/gpu.product, so it must be a label value "
                "(at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric)"
            )
        return product


class ResourcesSpec(_Model):
    gpu: GpuSpec | None = None
    cpu: Quantity | None = None
    memory: Quantity | None = None
    shm_size: Quantity = "1Gi"

    @property
    def requested_gpu(self) -> GpuSpec | None:
        """The GPU request when the pods ask for at least one GPU; None for CPU pods (gpu unset or 0)."""
        return self.gpu if self.gpu is not None and self.gpu.count > 0 else None


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class SchedulingSpec(_Model):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None
    runtime_class_name: str | None = None

    @field_validator("node_selector")
    @classmethod
    def _node_labels(cls, selector: dict[str, str]) -> dict[str, str]:
        bad = [f"{k}={v}" for k, v in selector.items() if not _label_key(k) or not LABEL_VALUE.fullmatch(v)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: not a valid node label (key and value)")
        return selector


class CacheSpec(_Model):
    size: Quantity = "50Gi"
    storage_class_name: str | None = None
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] | None = None
    existing_claim: str | None = None

    @model_validator(mode="after")
    def _existing_as_is(self) -> CacheSpec:
        if self.existing_claim is not None and (self.storage_class_name or self.access_mode):
            raise ValueError(
                "cache.existingClaim is used as it is: storageClassName and accessMode do not apply"
            )
        return self


class ImagePullSecret(_Model):
    name: str


class ServiceSpec(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = 80
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("annotations")
    @classmethod
    def _annotation_keys(cls, annotations: dict[str, str]) -> dict[str, str]:
        bad = [k for k in annotations if not _label_key(k)]  # annotation keys follow the label key rules
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: not a valid annotation key")
        return annotations


class MonitoringSpec(_Model):
    service_monitor: bool = False
    interval: str = "30s"
    service_monitor_labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _label_keys(self) -> MonitoringSpec:
        # The CRD checks the values; a key the API server would refuse is caught here, before any apply.
        bad = [k for k in self.service_monitor_labels if not _label_key(k)]
        if bad:
            raise ValueError(f"serviceMonitorLabels: {', '.join(map(repr, bad))} are not valid label keys")
        return self


class StartupSpec(_Model):
    timeout_seconds: int = 1800


class LLMDeploymentSpec(_Model):
    model: ModelSpec
    engine: EngineSpec = Field(default_factory=EngineSpec)
    replicas: int = 1
    autoscaling: AutoscalingSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: tuple[ImagePullSecret, ...] = ()
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    startup: StartupSpec = Field(default_factory=StartupSpec)

    @model_validator(mode="after")
    def _cpu_metric_needs_request(self) -> LLMDeploymentSpec:
        if self.autoscaling is not None and self.autoscaling.metric == "cpu" and self.resources.cpu is None:
            raise ValueError(
                "autoscaling on cpu needs resources.cpu (utilization is measured against the request)"
            )
        return self


class InvalidSpec(ValueError):
    """The stored spec breaks a rule the CRD states; the message names every broken rule."""


def parse_spec(raw: dict[str, Any]) -> LLMDeploymentSpec:
    try:
        return LLMDeploymentSpec.model_validate(raw)
    except ValidationError as error:
        raise InvalidSpec("; ".join(_describe(e) for e in error.errors())) from None


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
