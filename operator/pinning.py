"""Pinned revisions: a Hub branch or tag is resolved to its commit once, recorded in the status, and used by
every pod (download, cache directory, the model it serves) until the user asks to move it.

- The first reconciliation of a revision resolves it (hub.py) and pins the commit.
- Later ones keep the pin from the status; the branch is looked up again now and then, and when it has moved
  the RevisionPinned condition says so (reason BranchMoved, with both commits), without touching the pods.
- Annotating the LLMDeployment with fleetlm.dev/repin (any new value) moves the pin to the branch's commit
  now; changing spec.model.hf.revision pins anew.
- When the Hub cannot be reached, a kept pin stays; without one the pods use the revision as given and the
  condition says why (ResolveFailed), retried on later reconciliations.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from llm_operator.capacity import ModelFacts
from llm_operator.hub import COMMIT, HubError, Resolver
from llm_operator.kube import Kube
from llm_operator.naming import HubPin
from llm_operator.spec import LLMDeploymentSpec

REPIN_ANNOTATION = "fleetlm.dev/repin"


@dataclass(frozen=True, slots=True)
class PinState:
    hub: HubPin
    resolved_from: str | None = None  # the spec revision hub.commit was resolved from
    latest: str | None = None  # the revision's commit at the last lookup
    repin: str | None = None  # the repin annotation value this pin honours
    problem: str | None = None  # why the revision could not be resolved now
    facts: ModelFacts | None = None  # the pinned commit's config and weight size, for the fit check

    def status(self) -> dict[str, Any]:
        fields = {"resolvedRevision": self.hub.commit, "resolvedFrom": self.resolved_from, "repinRequest": self.repin}
        return {k: v for k, v in fields.items() if v is not None}

    def condition(self) -> tuple[str, str, str]:
        commit, asked = self.hub.commit, self.resolved_from
        if commit is None:
            return ("False", "ResolveFailed", f"serving the revision as given, unpinned: {self.problem}")
        if asked == commit:
            return ("True", "CommitGiven", f"spec.model.hf.revision is the commit {commit}")
        if self.latest is not None and self.latest != commit:
            return (
                "True",
                "BranchMoved",
                f"{asked} has moved to {self.latest}; the pods stay on {commit}. Annotate "
                f"{REPIN_ANNOTATION}=<any new value> to move them",
            )
        return ("True", "Pinned", f"{asked} is pinned to {commit}")


NOT_PINNED = ("True", "ServedFromVolume", "the model is read from its volume: nothing to pin")


def _value(kube: Kube, namespace: str, kind: str, name: str, key: str) -> str | None:
    """A key of a Secret (base64 in data) or a ConfigMap, or None."""
    found = kube.get("v1", kind, namespace, name) or {}
    if key in (found.get("stringData") or {}):
        return found["stringData"][key]
    raw = (found.get("data") or {}).get(key)
    if raw is None:
        return None
    if kind != "Secret":
        return raw if isinstance(raw, str) else None
    try:
        return base64.b64decode(raw, validate=True).decode()
    except (ValueError, TypeError) as error:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise HubError(f"Secret {namespace}/{name} key {key!r} is not UTF-8 text: {error}") from None


def _credentials(kube: Kube, namespace: str, spec: LLMDeploymentSpec) -> tuple[str | None, str | None]:
    """The model's Hub token and its mirror's CA bundle (PEM), as far as the spec names them."""
    hf, token, ca = spec.model.hf, None, None
    assert hf is not None
    if spec.model.token_secret_ref is not None:
        ref = spec.model.token_secret_ref
        token = _value(kube, namespace, "Secret", ref.name, ref.key)
    if hf.ca_bundle is not None:
        ca = _value(kube, namespace, *hf.ca_bundle.source, hf.ca_bundle.key)
    return token, ca


def pin_revision(
    kube: Kube, resolver: Resolver, body: dict[str, Any], spec: LLMDeploymentSpec, default_endpoint: str | None
) -> PinState | None:
    """The pin for an hf model (None for a pvc source)."""
    hf = spec.model.hf
    if hf is None:
        return None
    endpoint = hf.endpoint or default_endpoint
    status = body.get("status") or {}
    repin = (body["metadata"].get("annotations") or {}).get(REPIN_ANNOTATION)
    kept = status.get("resolvedRevision") if status.get("resolvedFrom") == hf.revision else None
    moving = kept is not None and repin is not None and repin != status.get("repinRequest")
    if moving:
        kept = None
    if COMMIT.match(hf.revision):
        kept = hf.revision
    namespace = body["metadata"]["namespace"]

    def credentials() -> tuple[str | None, str | None]:
        return _credentials(kube, namespace, spec)

    try:
        latest = resolver.resolve(hf.repo, hf.revision, endpoint, credentials, fresh=moving)
        commit = kept or latest.commit
        facts = latest.facts if latest.commit == commit else resolver.resolve(hf.repo, commit, endpoint, credentials).facts
    except HubError as error:
        return PinState(HubPin(endpoint, kept), hf.revision if kept else None, None, repin, str(error), None)
    return PinState(HubPin(endpoint, commit), hf.revision, latest.commit, repin, None, facts and facts.choosing(hf.gguf_file))
