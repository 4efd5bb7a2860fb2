"""Status from observations: pure functions over Deployment and Pod states as the API reports them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from llm_operator.diagnosis import Problem, diagnose
from llm_operator.status import Observation, compute_status, transitions

MODEL = "hf://org/m@main"
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def pod(status: dict[str, Any], model: str = MODEL, name: str = "p") -> dict[str, Any]:
    return {"metadata": {"name": name, "annotations": {"fleetlm.dev/model": model}}, "status": status}


def init(state: dict[str, Any], last: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"initContainerStatuses": [{"name": "model-download", "state": state, "lastState": last or {}}]}


def server(
    state: dict[str, Any], ready: bool = False, last: dict[str, Any] | None = None, image: str = "img"
) -> dict[str, Any]:
    return {
        "containerStatuses": [
            {"name": "server", "image": image, "ready": ready, "state": state, "lastState": last or {}}
        ]
    }


def deployment(
    replicas: int = 1,
    ready: int = 0,
    updated: int | None = None,
    generation: int = 1,
    observed: int = 1,
    conditions: list[Any] | None = None,
) -> dict[str, Any]:
    updated = ready if updated is None else updated
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "replicas": max(ready, updated),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "updatedReplicas": updated,
            "conditions": conditions or [],
        },
    }


def status(
    pods: list[dict[str, Any]],
    dep: dict[str, Any] | None = None,
    old: dict[str, Any] | None = None,
    now: str = T0,
    **seen: Any,
) -> dict[str, Any]:
    obs = Observation(
        generation=seen.pop("generation", 1),
        model=MODEL,
        endpoint="http://m.ns.svc:80/v1",
        selector="sel",
        from_volume=seen.pop("from_volume", False),
        desired_replicas=seen.pop("desired_replicas", 1),
        deployment=dep,
        report=diagnose(pods, dep, MODEL),
        blocker=seen.pop("blocker", None),
        pin=seen.pop("pin", None),
        capacity=seen.pop("capacity", None),
    )
    assert not seen, seen
    return compute_status(old or {}, obs, now)


def conds(s: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in s["conditions"]}


def test_nothing_yet_is_pending_and_progressing() -> None:
    s = status([], None)
    assert s["phase"] == "Pending"
    assert conds(s) == {
        "Ready": ("False", "RollingOut"),
        "Progressing": ("True", "RollingOut"),
        "Degraded": ("False", "AsExpected"),
        "ModelCached": ("False", "NotYetDownloaded"),
        "RevisionPinned": ("Unknown", "NotResolved"),
    }
    assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] == T0 for c in s["conditions"])


def test_download_then_load_then_serve() -> None:
    s = status([pod(init({"running": {}}))], deployment(ready=0))
    assert s["phase"] == "Downloading" and conds(s)["ModelCached"] == ("False", "Downloading")
    assert conds(s)["Progressing"] == ("True", "Downloading")

    loading = pod({**init({"terminated": {"exitCode": 0}}), **server({"running": {}})})
    s = status([loading], deployment(ready=0), old=s, now=T1)
    assert s["phase"] == "Loading" and conds(s)["Progressing"] == ("True", "LoadingModel")
    assert conds(s)["ModelCached"] == ("True", "Downloaded") and s["cachedModel"] == MODEL

    serving = pod({**init({"terminated": {"exitCode": 0}}), **server({"running": {}}, ready=True)})
    s = status([serving], deployment(ready=1), old=s, now=T1)
    assert s["phase"] == "Ready" and conds(s)["Ready"] == ("True", "Serving")
    assert conds(s)["Progressing"] == ("False", "RolloutComplete")
    assert (s["readyReplicas"], s["replicas"]) == (1, 1)


def test_cache_stays_known_when_pods_are_gone() -> None:
    s = status([], deployment(replicas=0), old={"cachedModel": MODEL}, desired_replicas=0)
    assert conds(s)["ModelCached"] == ("True", "Downloaded")
    assert s["phase"] == "ScaledToZero" and conds(s)["Ready"] == ("False", "ScaledToZero")
    other = status([], None, old={"cachedModel": "hf://org/m@old"})
    assert conds(other)["ModelCached"][0] == "False"


def test_rollout_of_a_new_generation_is_not_ready_until_updated() -> None:
    dep = deployment(replicas=2, ready=2, updated=1, generation=2, observed=2)
    s = status([], dep, generation=2)
    assert conds(s)["Ready"] == ("False", "RollingOut")
    assert s["phase"] == "Updating"  # old pods keep serving
    stale = deployment(replicas=1, ready=1, generation=3, observed=2)
    assert conds(status([], stale))["Ready"][0] == "False"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (2, "DownloaderUsageError"),
        (3, "ModelAccessDenied"),
        (4, "ModelNotFound"),
        (5, "DownloadNetworkError"),
        (6, "CacheVolumeError"),
        (1, "DownloadFailed"),
    ],
)
def test_download_exit_codes_become_reasons(code: int, reason: str) -> None:
    terminated = pod(init({"terminated": {"exitCode": code}}))
    crashlooping = pod(
        init({"waiting": {"reason": "CrashLoopBackOff"}}, last={"terminated": {"exitCode": code}})
    )
    for p in (terminated, crashlooping):
        s = status([p], deployment())
        assert conds(s)["Degraded"] == ("True", reason)
        assert conds(s)["ModelCached"] == ("False", reason)
        assert conds(s)["Ready"] == ("False", reason) and conds(s)["Progressing"] == ("False", reason)
        assert s["phase"] == "Degraded"


def test_a_failed_adapter_download_is_named_and_its_progress_is_the_startups() -> None:
    from llm_operator import startup

    model_done = {"name": "model-download", "state": {"terminated": {"exitCode": 0, "startedAt": "t1", "finishedAt": "t2"}}}
    failed = {"name": "adapter-download-1", "state": {"terminated": {"exitCode": 4}}, "lastState": {}}
    s = status([pod({"initContainerStatuses": [model_done, failed]})], deployment())
    degraded = next(c for c in s["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "ModelNotFound" and "LoRA adapter download (adapter-download-1)" in degraded["message"]
    running = {"name": "adapter-download-0", "state": {"running": {"startedAt": "t3"}}}
    fetching = pod({"initContainerStatuses": [model_done, running]})
    assert startup.downloading(fetching) == "adapter-download-0"
    timeline = startup.timeline(fetching)
    assert timeline["phase"] == "Downloading" and timeline["downloadedAt"] == "t2"  # the model's
    assert startup.downloading(pod({"initContainerStatuses": [model_done]})) is None


def test_a_failed_containers_last_logged_error_is_quoted() -> None:
    """The containers keep their last log lines as their termination message (FallbackToLogsOnError): the
    downloader's own reason (a ggufFile not in the repo, which exit 2 alone called "rejected arguments"),
    or the server's, is in the condition's message."""
    said = "m-Q8_0.gguf not found in org/m (GGUF files: m-Q4_0.gguf)"
    logs = '{"level": "info", "msg": "revision resolved"}\n' + json.dumps({"level": "error", "msg": said, "exit_code": 4}) + "\n"
    s = status([pod(init({"terminated": {"exitCode": 4, "message": logs}}))], deployment())
    degraded = next(c for c in s["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "ModelNotFound" and said in degraded["message"]
    crash = server({"waiting": {"reason": "CrashLoopBackOff"}}, last={"terminated": {"exitCode": 2, "message": "garbage\n" + json.dumps({"level": "error", "msg": "no tokenizer files"})}})
    degraded = next(c for c in status([pod(crash)], deployment())["conditions"] if c["type"] == "Degraded")
    assert "no tokenizer files" in degraded["message"]


@pytest.mark.parametrize(
    ("pod_status", "reason", "text"),
    [
        (
            server(
                {"waiting": {"reason": "ImagePullBackOff", "message": "manifest unknown"}},
                image="ghcr.io/x:nope",
            ),
            "ImagePullFailed",
            "ghcr.io/x:nope",
        ),
        (init({"waiting": {"reason": "ErrImagePull", "message": "denied"}}), "ImagePullFailed", "denied"),
        (
            server(
                {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "keys" not found'}}
            ),
            "ContainerConfigError",
            "keys",
        ),
        (
            server(
                {"waiting": {"reason": "CrashLoopBackOff"}},
                last={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
            ),
            "OutOfMemory",
            "memory",
        ),
        (
            server({"waiting": {"reason": "CrashLoopBackOff"}}, last={"terminated": {"exitCode": 1}}),
            "CrashLoopBackOff",
            "exit code 1",
        ),
        (
            {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "Insufficient nvidia.com/gpu",
                    }
                ]
            },
            "Unschedulable",
            "nvidia.com/gpu",
        ),
    ],
)
def test_pod_failures_become_reasons(pod_status: dict[str, Any], reason: str, text: str) -> None:
    s = status([pod(pod_status)], deployment())
    degraded = next(c for c in s["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", reason)
    assert text in degraded["message"]


def test_deployment_level_failures() -> None:
    stuck = deployment(
        conditions=[
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "too slow",
            }
        ]
    )
    assert conds(status([], stuck))["Degraded"] == ("True", "ProgressDeadlineExceeded")
    quota = deployment(
        conditions=[
            {
                "type": "ReplicaFailure",
                "status": "True",
                "reason": "FailedCreate",
                "message": "exceeded quota",
            }
        ]
    )
    assert conds(status([], quota))["Degraded"] == ("True", "ReplicaFailure")


def test_terminating_pods_and_pods_of_another_model_do_not_count_as_progress() -> None:
    old_model = pod(init({"running": {}}), model="hf://org/m@old")
    assert status([old_model], deployment())["phase"] == "Pending"
    leaving = pod(init({"terminated": {"exitCode": 3}}))
    leaving["metadata"]["deletionTimestamp"] = T0
    assert conds(status([leaving], deployment()))["Degraded"][0] == "False"


def test_a_blocker_degrades_and_keeps_old_pods_counted() -> None:
    s = status([], deployment(ready=1), blocker=Problem("SecretNotFound", "Secret ns/t does not exist"))
    assert conds(s)["Degraded"] == ("True", "SecretNotFound") and conds(s)["Ready"] == (
        "False",
        "SecretNotFound",
    )
    assert s["readyReplicas"] == 1 and s["phase"] == "Degraded"


def test_pvc_models_are_cached_by_definition() -> None:
    assert conds(status([], None, from_volume=True))["ModelCached"] == ("True", "ServedFromVolume")


def test_transition_time_moves_only_when_status_changes() -> None:
    first = status([], None, now=T0)
    again = status([], None, old=first, now=T1)
    assert again == first  # nothing changed: nothing to write
    ready = status([pod(server({"running": {}}, ready=True))], deployment(ready=1), old=first, now=T1)
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times == {"Ready": T1, "Progressing": T1, "Degraded": T0, "ModelCached": T1, "RevisionPinned": T0}


def test_events_on_new_problems_and_on_becoming_ready() -> None:
    healthy = status([], None)
    broken = status([pod(init({"terminated": {"exitCode": 4}}))], deployment(), old=healthy)
    changes = transitions(healthy["conditions"], broken["conditions"])
    assert [(t.type, t.reason) for t in changes] == [("Warning", "ModelNotFound")]
    assert transitions(broken["conditions"], broken["conditions"]) == []
    serving = status([pod(server({"running": {}}, ready=True))], deployment(ready=1), old=broken)
    assert {(t.type, t.reason) for t in transitions(broken["conditions"], serving["conditions"])} == {
        ("Normal", "Serving"),
        ("Normal", "Downloaded"),
    }


def test_the_pin_and_the_capacity_are_reported() -> None:
    from llm_operator.naming import HubPin
    from llm_operator.pinning import PinState

    a, b = "a" * 40, "b" * 40
    pinned = PinState(HubPin(None, a), "main", a, None, None, None)
    s = status([], None, pin=pinned, capacity={"maxConcurrentSequences": 4})
    assert (s["resolvedRevision"], s["resolvedFrom"]) == (a, "main") and "repinRequest" not in s
    assert conds(s)["RevisionPinned"] == ("True", "Pinned") and s["capacity"] == {"maxConcurrentSequences": 4}
    moved = status([], None, old=s, pin=PinState(HubPin(None, a), "main", b, "1", None, None))
    cond = next(c for c in moved["conditions"] if c["type"] == "RevisionPinned")
    assert (cond["status"], cond["reason"]) == ("True", "BranchMoved") and b in cond["message"] and a in cond["message"]
    assert "fleetlm.dev/repin" in cond["message"] and moved["repinRequest"] == "1"
    assert "capacity" not in moved  # a plan is only reported while it is known
    failed = status([], None, pin=PinState(HubPin(None, None), None, None, None, "http://hub: refused", None))
    assert conds(failed)["RevisionPinned"] == ("False", "ResolveFailed") and "resolvedRevision" not in failed
    volume = status([], None, from_volume=True)
    assert conds(volume)["RevisionPinned"] == ("True", "ServedFromVolume")


def test_the_startup_timeline_names_the_phase_a_pod_is_in() -> None:
    from llm_operator.startup import download_progress, newest_pod, timeline

    def at(**status: Any) -> dict[str, Any]:
        return {"metadata": {"name": "p", "creationTimestamp": "2026-12-02T10:00:00Z"}, "status": status}

    scheduled = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "t0"}]
    assert timeline(at())["phase"] == "Scheduling"
    assert timeline(at(conditions=scheduled))["phase"] == "PullingImage"
    waiting = [{"name": "model-download", "state": {"terminated": {"exitCode": 0, "startedAt": "t1", "finishedAt": "t2"}}}]
    loading = timeline(at(conditions=scheduled, initContainerStatuses=waiting,
                          containerStatuses=[{"name": "server", "state": {"running": {"startedAt": "t3"}}}]))  # fmt: skip
    assert loading == {"pod": "p", "phase": "LoadingWeights", "scheduledAt": "t0", "imagePulledAt": "t1",
                       "downloadedAt": "t2", "serverStartedAt": "t3"}  # fmt: skip
    assert download_progress('not json\n{"msg": "file progress"}') is None
    older = {"metadata": {"name": "a", "creationTimestamp": "2026-12-02T09:00:00Z"}}
    newer = {"metadata": {"name": "b", "creationTimestamp": "2026-12-02T11:00:00Z"}}
    gone = {"metadata": {"name": "c", "creationTimestamp": "2026-12-02T12:00:00Z", "deletionTimestamp": "x"}}
    assert newest_pod([older, newer, gone])["metadata"]["name"] == "b"


def unplaced(reason: str, message: str) -> dict[str, Any]:
    return pod({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": reason, "message": message}]})


def claim(modes: list[str], phase: str = "Pending", storage_class: str | None = "local-path") -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": modes, "resources": {"requests": {"storage": "50Gi"}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"metadata": {"name": "m-model-cache"}, "spec": spec, "status": {"phase": phase}}


def test_a_binding_failure_is_reported_like_no_node_fitting() -> None:
    # WaitForFirstConsumer: the scheduler picks a node, then the volume binder fails: reason SchedulerError.
    report = diagnose([unplaced("SchedulerError", 'running PreBind plugin "VolumeBinding": provisioning failed')], None, MODEL)
    assert [(p.reason, "VolumeBinding" in p.message) for p in report.problems] == [("Unschedulable", True)]
    gated = diagnose([unplaced("SchedulingGated", "Scheduling is blocked due to non-empty scheduling gates")], None, MODEL)
    assert gated.problems == []


def test_an_unbound_read_write_many_cache_claim_is_named_with_the_remedy() -> None:
    message = "0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims"
    report = diagnose([unplaced("Unschedulable", message)], None, MODEL, claim(["ReadWriteMany"]))
    first = report.problems[0]
    assert first.reason == "CacheClaimPending"
    assert "m-model-cache (ReadWriteMany, local-path) is not bound" in first.message and message in first.message
    assert "cache.accessMode: ReadWriteOnce" in first.message
    # A bound claim, or pods that are all placed, say nothing of the claim.
    assert [p.reason for p in diagnose([unplaced("Unschedulable", message)], None, MODEL, claim(["ReadWriteMany"], "Bound")).problems] == ["Unschedulable"]
    assert diagnose([pod({"phase": "Running"})], None, MODEL, claim(["ReadWriteOnce"])).problems == []
    rwo = diagnose([unplaced("Unschedulable", message)], None, MODEL, claim(["ReadWriteOnce"], storage_class=None)).problems[0]
    assert "ReadWriteOnce, the cluster's default StorageClass" in rwo.message and "accessMode" not in rwo.message
    # A claim waiting for its first consumer is Pending while the pod waits for a GPU: not the claim's fault.
    gpu = diagnose([unplaced("Unschedulable", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu")], None, MODEL, claim(["ReadWriteOnce"]))
    assert [p.reason for p in gpu.problems] == ["Unschedulable"]
    binding = "running PreBind plugin \"VolumeBinding\": binding volumes: provisioning failed: only supports ReadWriteOnce"
    assert diagnose([unplaced("SchedulerError", binding)], None, MODEL, claim(["ReadWriteMany"])).problems[0].reason == "CacheClaimPending"
