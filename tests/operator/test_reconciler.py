"""Reconciler contracts with the API server that the handler-level flow does not pin down on its own:
conflicts, refusals, pruning, drift. Run without kopf, against an in-memory API of their own (the running
operator of the flow tests would otherwise reconcile these objects too)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from llm_operator import metrics
from llm_operator.config import parse_args
from llm_operator.drift import drifted
from llm_operator.kube import Kube
from llm_operator.reconciler import ChildChange, Reconciler, TransientError

from tests.operator.apiserver import BackgroundApiServer
from tests.operator.conftest import NO_HUB, private_api

GROUP, VERSION, PLURAL = "fleetlm.dev", "v1alpha1", "llmdeployments"
CONFIG = parse_args(["--standalone", "--default-image", "img:test", "--hf-endpoint", NO_HUB], env={})


apiserver, kube = private_api()


def create(kube: Kube, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"hf": {"repo": "org/model"}})
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return json.loads(
        kube.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, _preload_content=False
        ).data
    )


def condition(kube: Kube, namespace: str, name: str, kind: str) -> dict[str, Any]:
    body = kube.get(f"{GROUP}/{VERSION}", "LLMDeployment", namespace, name)
    assert body is not None
    return next(c for c in body["status"]["conditions"] if c["type"] == kind)


class RacingKube(Kube):
    """Another writer changes the LLMDeployment between the operator's read and its status write, once."""

    raced = False

    def patch_status(self, body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        if not self.raced:
            self.raced = True
            meta = body["metadata"]
            patch = {"metadata": {"annotations": {"someone": "else"}}}
            self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
                patch,
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
        return super().patch_status(body, status)


def test_status_write_conflict_is_retried_on_the_fresh_object(kube: Kube, namespace: str) -> None:
    create(kube, namespace, "race")
    racing = RacingKube(kube.api)
    Reconciler(racing, CONFIG).reconcile(namespace, "race", trigger="test", apply_all=True)
    assert racing.raced
    body = kube.get(f"{GROUP}/{VERSION}", "LLMDeployment", namespace, "race")
    assert body is not None and body["metadata"]["annotations"] == {"someone": "else"}
    assert body["status"]["observedGeneration"] == 1  # written after the 409, on top of the other change


class RefusingKube(Kube):
    """The API server refuses one kind, as admission or validation would (422 with a Status message)."""

    def apply(self, manifest: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        if manifest["kind"] == "PodDisruptionBudget":
            error = ApiException(status=422, reason="Unprocessable Entity")
            error.body = json.dumps(
                {"kind": "Status", "message": 'PodDisruptionBudget.policy "x" is invalid: spec: forbidden'}
            )
            raise error
        return super().apply(manifest, dry_run=dry_run)


def test_a_refused_child_degrades_and_nothing_is_half_created(kube: Kube, namespace: str) -> None:
    create(kube, namespace, "refused")
    Reconciler(RefusingKube(kube.api), CONFIG).reconcile(namespace, "refused", trigger="test", apply_all=True)
    degraded = condition(kube, namespace, "refused", "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ChildRejected")
    assert "spec: forbidden" in degraded["message"]
    # The dry run failed first, so not even the children before the refused one were stored.
    for api_version, kind, name in [
        ("v1", "PersistentVolumeClaim", "refused-model-cache"),
        ("v1", "Service", "refused"),
        ("apps/v1", "Deployment", "refused"),
    ]:
        assert kube.get(api_version, kind, namespace, name) is None


def test_prune_removes_only_what_this_resource_owns(kube: Kube, namespace: str) -> None:
    body = create(kube, namespace, "prune", autoscaling={"maxReplicas": 3})
    reconciler = Reconciler(kube, CONFIG)
    reconciler.reconcile(namespace, "prune", trigger="test", apply_all=True)
    assert kube.get("autoscaling/v2", "HorizontalPodAutoscaler", namespace, "prune") is not None
    foreign = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "lookalike",
            "namespace": namespace,
            "labels": {"fleetlm.dev/llmdeployment": "prune"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "other"}],
        },
        "spec": {"ports": [{"port": 1}]},
    }
    kube.apply(foreign)
    kube.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "prune",
        {"spec": {"autoscaling": None}},
        _content_type="application/merge-patch+json",
        _preload_content=False,
    )
    reconciler.reconcile(namespace, "prune", trigger="test", apply_all=True)
    assert kube.get("autoscaling/v2", "HorizontalPodAutoscaler", namespace, "prune") is None
    assert kube.get("v1", "Service", namespace, "lookalike") is not None
    assert (
        kube.get("v1", "Service", namespace, "prune")["metadata"]["ownerReferences"][0]["uid"]
        == body["metadata"]["uid"]
    )


class FailingKube(Kube):
    def list(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise ApiException(status=503, reason="Service Unavailable")


def test_api_outage_is_transient_and_counted(kube: Kube, namespace: str) -> None:
    create(kube, namespace, "outage")
    before = metrics.ERRORS.labels("test", "http_503")._value.get()
    with pytest.raises(TransientError, match="503"):
        Reconciler(FailingKube(kube.api), CONFIG).reconcile(
            namespace, "outage", trigger="test", apply_all=True
        )
    assert metrics.ERRORS.labels("test", "http_503")._value.get() == before + 1


def test_an_unforeseen_failure_is_reported_not_retried_forever(kube: Kube, namespace: str, monkeypatch) -> None:
    """A failure no rule foresaw (here injected: building the children raises) becomes a Degraded condition
    and an Event; kopf would otherwise retry the handler every minute forever with no status at all."""
    import llm_operator.reconciler as reconciler_module

    def broken(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise KeyError("resources")

    create(kube, namespace, "garbled")
    before = metrics.ERRORS.labels("test", "internal")._value.get()
    with monkeypatch.context() as patched:
        patched.setattr(reconciler_module, "desired_children", broken)
        Reconciler(kube, CONFIG).reconcile(namespace, "garbled", trigger="test", apply_all=True)
    degraded = condition(kube, namespace, "garbled", "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InternalError")
    assert "KeyError" in degraded["message"]
    assert [e["reason"] for e in kube.list("v1", "Event", namespace) if e["involvedObject"]["name"] == "garbled"] == [
        "InternalError"
    ]
    assert metrics.ERRORS.labels("test", "internal")._value.get() == before + 1
    # Once the input is sane again the same reconciler recovers.
    Reconciler(kube, CONFIG).reconcile(namespace, "garbled", trigger="test", apply_all=True)
    assert condition(kube, namespace, "garbled", "Degraded")["status"] == "False"


def test_a_deleted_resource_is_left_to_the_garbage_collector(kube: Kube, namespace: str) -> None:
    Reconciler(kube, CONFIG).reconcile(namespace, "never-existed", trigger="test", apply_all=True)
    assert kube.list("v1", "Service", namespace) == []


DESIRED = {
    "apiVersion": "v1",
    "kind": "PersistentVolumeClaim",
    "metadata": {"name": "c", "labels": {"a": "b"}},
    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1024Mi"}}},
}


def test_drift_ignores_server_additions_and_canonical_quantities() -> None:
    live = json.loads(json.dumps(DESIRED))
    live["metadata"].update(uid="u", resourceVersion="7", labels={"a": "b", "extra": "x"})
    live["spec"]["resources"]["requests"]["storage"] = "1Gi"
    live["spec"]["volumeMode"] = "Filesystem"
    live["status"] = {"phase": "Bound"}
    assert not drifted(DESIRED, live)


@pytest.mark.parametrize(
    "edit",
    [
        lambda o: o.update(spec={**o["spec"], "accessModes": ["ReadWriteMany"]}),
        lambda o: o["metadata"]["labels"].pop("a"),
        lambda o: o["spec"]["accessModes"].append("ReadOnlyMany"),
        lambda o: o["spec"]["resources"]["requests"].update(storage="2Gi"),
    ],
)
def test_drift_sees_changed_or_missing_declared_fields(edit: Any) -> None:
    live = json.loads(json.dumps(DESIRED))
    edit(live)
    assert drifted(DESIRED, live)
    assert drifted(DESIRED, None)


def test_status_patches_remove_what_the_new_status_dropped() -> None:
    from llm_operator.kube import merge_patch

    old = {"phase": "Pending", "startup": {"phase": "Downloading", "download": {"percent": 25.0}}, "capacity": {"fits": True}}
    new = {"phase": "Ready", "startup": {"phase": "Ready"}}
    assert merge_patch(old, new) == {"phase": "Ready", "startup": {"phase": "Ready", "download": None}, "capacity": None}


def test_each_llmdeployment_is_exported_for_the_alerts_and_forgotten_when_gone(kube: Kube, namespace: str) -> None:
    create(kube, namespace, "watched", replicas=3)
    reconciler = Reconciler(kube, CONFIG)
    reconciler.reconcile(namespace, "watched", trigger="test", apply_all=True)
    assert metrics.DESIRED_REPLICAS.labels(namespace, "watched")._value.get() == 3
    assert metrics.READY_REPLICAS.labels(namespace, "watched")._value.get() == 0
    assert metrics.DEGRADED.labels(namespace, "watched")._value.get() == 0
    reconciler.forget(namespace, "watched")
    exported = {s.labels.get("llmdeployment") for s in next(iter(metrics.DESIRED_REPLICAS.collect())).samples}
    assert "watched" not in exported


def patch_spec(kube: Kube, namespace: str, name: str, spec: dict[str, Any]) -> None:
    kube.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": spec},
        _content_type="application/merge-patch+json", _preload_content=False,
    )  # fmt: skip


def server_args(kube: Kube, namespace: str, name: str) -> list[str]:
    deployment = kube.get("apps/v1", "Deployment", namespace, name)
    assert deployment is not None
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_a_claims_storage_class_is_kept_when_the_spec_drops_or_changes_it(kube: Kube, namespace: str) -> None:
    """storageClassName is immutable: had the operator left it out, server-side apply would remove the
    field it owns, which the API (and this emulator) refuses with 422 on every apply, blocking every
    later spec change. It sends the live class back instead."""
    create(kube, namespace, "sc", cache={"storageClassName": "fast", "size": "2Gi"})
    reconciler = Reconciler(kube, CONFIG)
    reconciler.reconcile(namespace, "sc", trigger="test", apply_all=True)
    assert kube.get("v1", "PersistentVolumeClaim", namespace, "sc-model-cache")["spec"]["storageClassName"] == "fast"

    patch_spec(kube, namespace, "sc", {"cache": {"storageClassName": None}, "engine": {"maxBatchSize": 48}})
    reconciler.reconcile(namespace, "sc", trigger="test", apply_all=True)
    assert condition(kube, namespace, "sc", "Degraded")["status"] == "False"
    assert "48" in server_args(kube, namespace, "sc")
    assert kube.get("v1", "PersistentVolumeClaim", namespace, "sc-model-cache")["spec"]["storageClassName"] == "fast"

    # Another class is kept too, and said so; the rest of the spec still applies.
    patch_spec(kube, namespace, "sc", {"cache": {"storageClassName": "slow"}, "engine": {"maxBatchSize": 32}})
    reconciler.reconcile(namespace, "sc", trigger="test", apply_all=True)
    degraded = condition(kube, namespace, "sc", "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "CacheClaimImmutable")
    assert "cache.storageClassName is slow but claim sc-model-cache uses fast" in degraded["message"]
    assert "32" in server_args(kube, namespace, "sc")
    assert kube.get("v1", "PersistentVolumeClaim", namespace, "sc-model-cache")["spec"]["storageClassName"] == "fast"


def storage_class(kube: Kube, name: str, expandable: bool | None) -> None:
    body: dict[str, Any] = {"metadata": {"name": name}, "provisioner": "csi.example.com"}
    if expandable is not None:
        body["allowVolumeExpansion"] = expandable
    kube.custom.create_cluster_custom_object("storage.k8s.io", "v1", "storageclasses", body, _preload_content=False)


def bind_claim(kube: Kube, namespace: str, name: str) -> None:
    """What the PV controller does once a volume is provisioned for the cache claim."""
    kube.core.patch_namespaced_persistent_volume_claim_status(
        f"{name}-model-cache", namespace, {"status": {"phase": "Bound"}}, _preload_content=False
    )


def claim_size(kube: Kube, namespace: str, name: str) -> str:
    return kube.get("v1", "PersistentVolumeClaim", namespace, f"{name}-model-cache")["spec"]["resources"]["requests"]["storage"]


def test_a_cache_that_cannot_expand_keeps_its_size_says_so_and_applies_the_rest(kube: Kube, namespace: str) -> None:
    """Growing a claim whose StorageClass lacks allowVolumeExpansion is refused by admission (403, which
    this emulator answers as the PersistentVolumeClaimResize plugin does): the operator reads the class
    first, keeps the claim's size and applies the other children."""
    storage_class(kube, "fixed-size", expandable=None)
    create(kube, namespace, "grow", cache={"storageClassName": "fixed-size", "size": "2Gi"})
    reconciler = Reconciler(kube, CONFIG)
    reconciler.reconcile(namespace, "grow", trigger="test", apply_all=True)
    bind_claim(kube, namespace, "grow")
    patch_spec(kube, namespace, "grow", {"cache": {"size": "4Gi"}, "engine": {"maxBatchSize": 48}})
    reconciler.reconcile(namespace, "grow", trigger="test", apply_all=True)
    degraded = condition(kube, namespace, "grow", "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "CacheClaimNotExpandable")
    assert "StorageClass fixed-size does not set allowVolumeExpansion: true" in degraded["message"]
    assert "48" in server_args(kube, namespace, "grow") and claim_size(kube, namespace, "grow") == "2Gi"
    # Once the class allows it, the claim grows.
    kube.custom.patch_cluster_custom_object("storage.k8s.io", "v1", "storageclasses", "fixed-size",
                                            {"allowVolumeExpansion": True}, _content_type="application/merge-patch+json")  # fmt: skip
    reconciler.reconcile(namespace, "grow", trigger="test", apply_all=True)
    assert claim_size(kube, namespace, "grow") == "4Gi"
    assert condition(kube, namespace, "grow", "Degraded")["status"] == "False"


def test_a_storage_class_the_operator_may_not_read_leaves_the_decision_to_the_api(
    apiserver: BackgroundApiServer, kube: Kube, namespace: str
) -> None:
    storage_class(kube, "unreadable", expandable=False)
    create(kube, namespace, "blind", cache={"storageClassName": "unreadable", "size": "2Gi"})
    reconciler = Reconciler(kube, CONFIG)
    reconciler.reconcile(namespace, "blind", trigger="test", apply_all=True)
    bind_claim(kube, namespace, "blind")
    patch_spec(kube, namespace, "blind", {"cache": {"size": "4Gi"}})
    apiserver.forbid("storageclasses")
    try:
        reconciler.reconcile(namespace, "blind", trigger="test", apply_all=True)
    finally:
        apiserver.forbid()
    degraded = condition(kube, namespace, "blind", "Degraded")
    # As before the class was read: the larger request is sent and the API's own refusal reported.
    assert degraded["reason"] == "OperatorForbidden" and "must support resize" in degraded["message"]
    assert claim_size(kube, namespace, "blind") == "2Gi"


def test_an_object_of_a_childs_name_that_is_not_ours_is_left_alone_and_reported(kube: Kube, namespace: str) -> None:
    """A forced server-side apply would take over a Service someone else made (and repoint it at the
    serving pods): the operator applies every other child, reports the conflict, and takes the name
    only once the other object is gone."""
    theirs = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "taken", "namespace": namespace, "labels": {"team": "web"}},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 8000}]},
    }  # fmt: skip
    kube.core.create_namespaced_service(namespace, theirs, _preload_content=False)
    create(kube, namespace, "taken")
    reconciler = Reconciler(kube, CONFIG)
    reconciler.reconcile(namespace, "taken", trigger="test", apply_all=True)
    service = kube.get("v1", "Service", namespace, "taken")
    assert service["spec"]["selector"] == {"app": "web"} and service["metadata"]["labels"] == {"team": "web"}
    assert "ownerReferences" not in service["metadata"]
    assert kube.get("apps/v1", "Deployment", namespace, "taken") is not None  # the rest is applied
    assert kube.get("policy/v1", "PodDisruptionBudget", namespace, "taken") is not None
    degraded = condition(kube, namespace, "taken", "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ChildConflict")
    assert f"Service {namespace}/taken already exists and does not belong to this LLMDeployment" in degraded["message"]
    (event,) = [e for e in kube.list("v1", "Event", namespace) if e["reason"] == "ChildConflict"]
    assert event["type"] == "Warning" and event["involvedObject"]["name"] == "taken"
    # A repair triggered by the foreign object (it carries none of our labels, but it might) changes nothing.
    reconciler.reconcile(namespace, "taken", trigger="test", change=ChildChange("Service", "taken", service))
    assert kube.get("v1", "Service", namespace, "taken")["spec"]["selector"] == {"app": "web"}

    kube.delete("v1", "Service", namespace, "taken")
    reconciler.reconcile(namespace, "taken", trigger="test", apply_all=True)
    ours = kube.get("v1", "Service", namespace, "taken")
    body = kube.get(f"{GROUP}/{VERSION}", "LLMDeployment", namespace, "taken")
    assert ours["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    assert condition(kube, namespace, "taken", "Degraded")["status"] == "False"


def test_a_refused_spec_is_not_applied_later_one_repaired_child_at_a_time(kube: Kube, namespace: str) -> None:
    """After the dry run refused the spec, status has seen its generation; a child's watch event (the
    Deployment deleted) then repaired that one child with the refused spec, which cleared Degraded."""
    create(kube, namespace, "refused")
    reconciler = Reconciler(RefusingKube(kube.api), CONFIG)
    reconciler.reconcile(namespace, "refused", trigger="test", apply_all=True)
    assert condition(kube, namespace, "refused", "Degraded")["reason"] == "ChildRejected"
    assert kube.get("apps/v1", "Deployment", namespace, "refused") is None
    reconciler.reconcile(namespace, "refused", trigger="child", change=ChildChange("Deployment", "refused", None))
    assert kube.get("apps/v1", "Deployment", namespace, "refused") is None
    assert condition(kube, namespace, "refused", "Degraded")["reason"] == "ChildRejected"


def test_a_pending_claim_is_not_resized_until_it_binds(kube: Kube, namespace: str) -> None:
    """The API refuses any change to a claim that is not bound (422): a larger cache.size waits for the
    binding instead of blocking every child as ChildRejected."""
    storage_class(kube, "slow-binding", expandable=True)
    create(kube, namespace, "unbound", cache={"storageClassName": "slow-binding", "size": "2Gi"})
    reconciler = Reconciler(kube, CONFIG)
    reconciler.reconcile(namespace, "unbound", trigger="test", apply_all=True)
    patch_spec(kube, namespace, "unbound", {"cache": {"size": "4Gi"}, "engine": {"maxBatchSize": 48}})
    reconciler.reconcile(namespace, "unbound", trigger="test", apply_all=True)
    assert condition(kube, namespace, "unbound", "Degraded")["status"] == "False"
    assert "48" in server_args(kube, namespace, "unbound") and claim_size(kube, namespace, "unbound") == "2Gi"
    bind_claim(kube, namespace, "unbound")
    reconciler.reconcile(namespace, "unbound", trigger="test", apply_all=True)
    assert claim_size(kube, namespace, "unbound") == "4Gi"


def test_a_token_secret_that_is_not_text_is_reported(kube: Kube, namespace: str) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok", "namespace": namespace},
              "data": {"HF_TOKEN": "//79"}}  # fmt: skip  (base64 of 0xff 0xfe 0xfd)
    kube.apply(secret)
    create(kube, namespace, "binary-token", model={"hf": {"repo": "org/model"}, "tokenSecretRef": {"name": "tok"}})
    Reconciler(kube, CONFIG).reconcile(namespace, "binary-token", trigger="test", apply_all=True)
    body = kube.get(f"{GROUP}/{VERSION}", "LLMDeployment", namespace, "binary-token")
    assert body is not None
    messages = " ".join(c["message"] for c in body["status"]["conditions"])
    assert f"Secret {namespace}/tok key 'HF_TOKEN' is not UTF-8 text" in messages


def test_a_cache_claim_the_spec_then_names_as_it_is_is_released_not_deleted(kube: Kube, namespace: str) -> None:
    """cache.existingClaim pointed at the operator's own cache claim (the way to keep a cache beyond its
    LLMDeployment): the claim is no longer a desired child, but deleting it would take the cache the
    spec names (on a real cluster it would hang Terminating under pvc-protection while the old pods
    mount it, and new pods could not schedule). It loses its ownerReference instead, so the garbage
    collector leaves it too."""
    body = create(kube, namespace, "keep")
    reconciler = Reconciler(kube, CONFIG)
    reconciler.reconcile(namespace, "keep", trigger="test", apply_all=True)
    claim = kube.get("v1", "PersistentVolumeClaim", namespace, "keep-model-cache")
    assert [ref["uid"] for ref in claim["metadata"]["ownerReferences"]] == [body["metadata"]["uid"]]
    size = claim["spec"]["resources"]["requests"]["storage"]
    bind_claim(kube, namespace, "keep")

    patch_spec(kube, namespace, "keep", {"cache": {"existingClaim": "keep-model-cache"}})
    reconciler.reconcile(namespace, "keep", trigger="test", apply_all=True)

    claim = kube.get("v1", "PersistentVolumeClaim", namespace, "keep-model-cache")
    assert claim is not None and not claim["metadata"].get("ownerReferences")
    assert claim["spec"]["resources"]["requests"]["storage"] == size
    assert condition(kube, namespace, "keep", "Degraded")["status"] == "False"
    deployment = kube.get("apps/v1", "Deployment", namespace, "keep")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "keep-model-cache" for v in volumes.values())
    reconciler.reconcile(namespace, "keep", trigger="test", apply_all=True)  # released once; nothing more to do
    assert kube.get("v1", "PersistentVolumeClaim", namespace, "keep-model-cache") is not None


def test_a_deleted_cache_claim_stops_the_pods_until_it_is_gone_then_comes_back(kube: Kube, namespace: str) -> None:
    """`kubectl delete pvc` is the remedy for a claim that cannot change, but Kubernetes keeps a claim
    while pods mount it (the pvc-protection finalizer) and new pods of a deleted claim cannot start: the
    operator stops the serving pods, says why, and recreates the claim and the pods once it is gone."""
    create(kube, namespace, "recreate", replicas=2)
    reconciler = Reconciler(kube, CONFIG)
    reconciler.reconcile(namespace, "recreate", trigger="test", apply_all=True)
    claim_name = "recreate-model-cache"
    kube.merge_patch("v1", "PersistentVolumeClaim", namespace, claim_name, {"metadata": {"finalizers": ["kubernetes.io/pvc-protection"]}})
    kube.delete("v1", "PersistentVolumeClaim", namespace, claim_name)
    going = kube.get("v1", "PersistentVolumeClaim", namespace, claim_name)
    assert going is not None and going["metadata"].get("deletionTimestamp")

    reconciler.reconcile(namespace, "recreate", trigger="test", change=ChildChange("PersistentVolumeClaim", claim_name, going))

    assert kube.get("apps/v1", "Deployment", namespace, "recreate")["spec"]["replicas"] == 0
    degraded = condition(kube, namespace, "recreate", "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "CacheClaimTerminating"

    # The pods gone, the PVC protection controller lets the claim go.
    kube.merge_patch("v1", "PersistentVolumeClaim", namespace, claim_name, {"metadata": {"finalizers": None}})
    assert kube.get("v1", "PersistentVolumeClaim", namespace, claim_name) is None
    reconciler.reconcile(namespace, "recreate", trigger="test", change=ChildChange("PersistentVolumeClaim", claim_name, None))

    fresh = kube.get("v1", "PersistentVolumeClaim", namespace, claim_name)
    assert fresh is not None and not fresh["metadata"].get("deletionTimestamp")
    assert fresh["metadata"]["uid"] != going["metadata"]["uid"]
    assert kube.get("apps/v1", "Deployment", namespace, "recreate")["spec"]["replicas"] == 2
    assert condition(kube, namespace, "recreate", "Degraded")["status"] == "False"


def test_a_name_that_cannot_name_a_service_is_an_invalid_spec_without_cel(kube: Kube, namespace: str) -> None:
    """This API server, like one that does not evaluate the CRD's CEL rules, stores the name; the operator
    refuses it itself before applying anything, rather than leaving it to the Service's refusal."""
    create(kube, namespace, "9-lives")
    Reconciler(kube, CONFIG).reconcile(namespace, "9-lives", trigger="test", apply_all=True)
    degraded = condition(kube, namespace, "9-lives", "Degraded")
    assert degraded["reason"] == "InvalidSpec" and "DNS-1035" in degraded["message"]
    assert kube.get("apps/v1", "Deployment", namespace, "9-lives") is None
