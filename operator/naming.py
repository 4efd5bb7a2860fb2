"""Names, labels and references every child of an LLMDeployment shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_operator.spec import AdapterSource, LLMDeploymentSpec

GROUP = "fleetlm.dev"
VERSION = "v1alpha1"
PLURAL = "llmdeployments"
KIND = "LLMDeployment"
API_VERSION = f"{GROUP}/{VERSION}"
# kopf puts it on every LLMDeployment (its per-resource resync daemon needs one); the chart's pre-delete
# hook takes it off once the operator has stopped (llm_operator.shutdown).
FINALIZER = f"{GROUP}/kopf-finalizer"

MANAGED_BY = "fleetlm-operator"
INSTANCE_LABEL = "fleetlm.dev/llmdeployment"
MODEL_ANNOTATION = "fleetlm.dev/model"


@dataclass(frozen=True, slots=True)
class Owner:
    """The LLMDeployment a child belongs to."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, body: dict[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def selector_labels(name: str) -> dict[str, str]:
    # Immutable in a Deployment's selector: never add to these.
    return {"app.kubernetes.io/name": "fleetlm", INSTANCE_LABEL: name}


def labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "server",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(name).items())


def metadata(owner: Owner, name: str | None = None) -> dict[str, Any]:
    return {
        "name": name or owner.name,
        "namespace": owner.namespace,
        "labels": labels(owner.name),
        "ownerReferences": [owner_reference(owner)],
    }


def owner_reference(owner: Owner) -> dict[str, Any]:
    # controller + blockOwnerDeletion: the garbage collector removes children with the LLMDeployment, and a
    # foreground deletion waits for them.
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    """Whether an object carries an ownerReference to the LLMDeployment with this uid."""
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def cache_claim_name(owner_name: str) -> str:
    return f"{owner_name}-model-cache"


@dataclass(frozen=True, slots=True)
class HubPin:
    """How the pods reach the Hub: the endpoint (a mirror; None: the Hub), and the commit the spec's
    revision was resolved to (None: not resolved, the revision is used as given)."""

    endpoint: str | None = None
    commit: str | None = None


UNPINNED = HubPin()

def model_uri(spec: LLMDeploymentSpec, commit: str | None = None) -> str:
    """hf://repo@revision, with the resolved commit in place of a branch or tag once pinned."""
    if spec.model.hf is not None:
        return f"hf://{spec.model.hf.repo}@{commit or spec.model.hf.revision}"
    assert spec.model.pvc is not None
    return f"pvc://{spec.model.pvc.claim_name}/{spec.model.pvc.path}".rstrip("/")


def runs_model(pod: dict[str, Any], model: str) -> bool:
    """Whether a serving pod was made for `model` (its annotation, set from model_uri)."""
    return pod["metadata"].get("annotations", {}).get(MODEL_ANNOTATION) == model


def hf_cache_dir(spec: LLMDeploymentSpec, commit: str | None = None) -> str:
    """Where in the cache volume a Hub model lives: one directory per repo and revision (the pinned
    commit, once resolved), so deployments sharing a claim share downloads, and a new revision never
    overwrites the one still being served."""
    assert spec.model.hf is not None
    repo = spec.model.hf.repo.replace("/", "--")
    revision = (commit or spec.model.hf.revision).replace("/", "--")
    if spec.model.hf.gguf_file:
        # One directory per GGUF file too: the downloader keeps only the file it was asked for, so two
        # deployments of one repo's Q4 and Q8 on a shared claim deleted each other's.
        revision += "--" + spec.model.hf.gguf_file.replace("/", "--")
    return f"hf/{repo}/{revision}"


def adapter_cache_dir(adapter: AdapterSource) -> str:
    """Where in the cache volume a LoRA adapter lives: as a model does, one directory per repo and revision."""
    return f"hf/{adapter.repo.replace('/', '--')}/{adapter.revision.replace('/', '--')}"


def served_name(spec: LLMDeploymentSpec) -> str:
    if spec.model.served_name:
        return spec.model.served_name
    if spec.model.hf is not None:
        return spec.model.hf.repo
    assert spec.model.pvc is not None
    return spec.model.pvc.path.rstrip("/").rsplit("/", 1)[-1] or spec.model.pvc.claim_name


def endpoint(owner: Owner, spec: LLMDeploymentSpec) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc:{spec.service.port}/v1"
