"""The LLMDeployment's status from what was observed: conditions for `kubectl wait`, phase and counts for humans.

Ready means the current spec is rolled out and every desired replica passes /health. Progressing means work
is under way (download, model load, rollout). Degraded means something needs a human, with the reason saying
what. ModelCached means the cache volume holds the current model completely, so new replicas skip the download.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm_operator.diagnosis import PodReport, Problem
from llm_operator.pinning import NOT_PINNED, PinState

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "ModelCached", "RevisionPinned")


@dataclass(frozen=True, slots=True)
class Observation:
    generation: int
    model: str
    endpoint: str
    selector: str
    from_volume: bool  # a pvc source: nothing to download
    desired_replicas: int
    deployment: dict[str, Any] | None
    report: PodReport
    blocker: Problem | None = None  # why the spec could not be applied, if it could not
    notes: tuple[Problem, ...] = ()  # what of the applied spec could not be honoured (e.g. an immutable claim)
    pin: PinState | None = None  # the Hub revision's pin (None: a pvc source, or the spec is not valid)
    capacity: dict[str, Any] | None = None  # the fit check's plan (status.capacity)
    startup: dict[str, Any] | None = None  # the newest pod's cold-start timeline (status.startup)


def compute_status(old: dict[str, Any], seen: Observation, now: str) -> dict[str, Any]:
    dep_status = (seen.deployment or {}).get("status", {})
    desired = (seen.deployment or {}).get("spec", {}).get("replicas", seen.desired_replicas)
    ready = dep_status.get("readyReplicas", 0)
    cached_model = seen.model if seen.report.downloaded else old.get("cachedModel")

    stalled = ([seen.blocker] if seen.blocker else []) + seen.report.problems  # nothing moves until fixed
    problems = stalled[:1] + list(seen.notes) + stalled[1:]
    rolled_out = seen.blocker is None and _rolled_out(seen.deployment, desired)
    activity = _activity(seen.report, rolled_out)

    if problems:
        degraded = ("True", problems[0].reason, "; ".join(p.message for p in problems))
    else:
        degraded = ("False", "AsExpected", "no problems observed")
    if desired == 0 and seen.blocker is None:
        ready_cond = ("False", "ScaledToZero", "spec.replicas is 0")
    elif rolled_out and ready >= desired:
        ready_cond = ("True", "Serving", f"{ready}/{desired} replicas serve {seen.model} at {seen.endpoint}")
    else:
        why = stalled[0].reason if stalled else activity
        ready_cond = ("False", why, f"{ready}/{desired} replicas ready")
    if stalled:
        progressing = ("False", stalled[0].reason, "stalled until the problem is fixed")
    elif rolled_out:
        progressing = ("False", "RolloutComplete", "the current spec is rolled out")
    else:
        progressing = ("True", activity, _activity_message(activity))
    if seen.from_volume:
        cached = ("True", "ServedFromVolume", f"{seen.model} is read in place from its volume")
    elif cached_model == seen.model:
        cached = ("True", "Downloaded", f"{seen.model} is in the cache volume")
    else:
        download_problem = next((p for p in seen.report.problems if p.reason in _DOWNLOAD_REASONS), None)
        if download_problem:
            cached = ("False", download_problem.reason, download_problem.message)
        elif seen.report.downloading:
            cached = ("False", "Downloading", f"downloading {seen.model}")
        else:
            cached = ("False", "NotYetDownloaded", f"{seen.model} will be downloaded by the first pod")

    if seen.pin is not None:
        pinned = seen.pin.condition()
    elif seen.from_volume:
        pinned = NOT_PINNED
    else:
        pinned = (old_condition(old, "RevisionPinned") or ("Unknown", "NotResolved", "the spec is not applied"))
    new = {
        "Ready": ready_cond,
        "Progressing": progressing,
        "Degraded": degraded,
        "ModelCached": cached,
        "RevisionPinned": pinned,
    }
    status = {
        "phase": _phase(problems, desired, ready_cond[0] == "True", ready, seen.report),
        "observedGeneration": seen.generation,
        "replicas": dep_status.get("replicas", 0),
        "readyReplicas": ready,
        "updatedReplicas": dep_status.get("updatedReplicas", 0),
        "selector": seen.selector,
        "endpoint": seen.endpoint,
        "model": seen.model,
        "conditions": merge_conditions(old.get("conditions", []), new, seen.generation, now),
    }
    if cached_model:
        status["cachedModel"] = cached_model
    if seen.pin is not None:
        status.update(seen.pin.status())
    elif not seen.from_volume:  # a spec that could not be read keeps what was pinned before
        status.update({k: old[k] for k in ("resolvedRevision", "resolvedFrom", "repinRequest") if k in old})
    capacity = seen.capacity if seen.capacity is not None else (old.get("capacity") if seen.pin is None else None)
    if capacity is not None:
        status["capacity"] = capacity
    if seen.startup is not None:
        status["startup"] = seen.startup
    return status


def old_condition(old: dict[str, Any], kind: str) -> tuple[str, str, str] | None:
    cond = next((c for c in old.get("conditions", []) if c.get("type") == kind), None)
    return (cond["status"], cond.get("reason", ""), cond.get("message", "")) if cond else None


def merge_conditions(
    old: list[dict[str, Any]], new: dict[str, tuple[str, str, str]], generation: int, now: str
) -> list[dict[str, Any]]:
    """Conditions in a stable order; lastTransitionTime moves only when a condition's status changes."""
    before = {c["type"]: c for c in old}
    merged = []
    for kind in CONDITION_TYPES:
        status, reason, message = new[kind]
        prior = before.get(kind)
        since = prior["lastTransitionTime"] if prior and prior.get("status") == status else now
        merged.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )
    return merged


@dataclass(frozen=True, slots=True)
class Transition:
    type: str  # Normal or Warning, as for Events
    reason: str
    message: str


def transitions(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[Transition]:
    """What is worth an Event: a new problem (or another one), becoming ready, the model landing in the cache."""
    before = {c["type"]: c for c in old}
    found = []
    for cond in new:
        prior = before.get(cond["type"], {})
        changed = prior.get("status") != cond["status"] or prior.get("reason") != cond["reason"]
        if not changed or cond["status"] != "True":
            continue
        if cond["type"] == "Degraded":
            found.append(Transition("Warning", cond["reason"], cond["message"]))
        elif cond["type"] in ("Ready", "ModelCached"):
            found.append(Transition("Normal", cond["reason"], cond["message"]))
        elif cond["type"] == "RevisionPinned" and cond["reason"] in ("Pinned", "BranchMoved"):
            found.append(Transition("Normal" if cond["reason"] == "Pinned" else "Warning", cond["reason"], cond["message"]))
    return found


_DOWNLOAD_REASONS = {
    "ModelAccessDenied",
    "ModelNotFound",
    "DownloadNetworkError",
    "CacheVolumeError",
    "DownloaderUsageError",
    "DownloadFailed",
    "DownloadOutOfMemory",
}


def _rolled_out(deployment: dict[str, Any] | None, desired: int) -> bool:
    if deployment is None:
        return False
    status = deployment.get("status", {})
    return (
        status.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 1)
        and status.get("updatedReplicas", 0) == desired
        and status.get("replicas", 0) == desired
        and status.get("availableReplicas", 0) >= desired
    )


def _activity(report: PodReport, rolled_out: bool) -> str:
    if rolled_out:
        return "RolloutComplete"
    if report.downloading:
        return "Downloading"
    if report.loading:
        return "LoadingModel"
    return "RollingOut"


def _activity_message(activity: str) -> str:
    return {
        "Downloading": "the model is being downloaded into the cache volume",
        "LoadingModel": "the server is loading the model",
        "RollingOut": "waiting for pods of the current spec",
    }[activity]


def _phase(problems: list[Problem], desired: int, is_ready: bool, ready: int, report: PodReport) -> str:
    if problems:
        return "Degraded"
    if desired == 0:
        return "ScaledToZero"
    if is_ready:
        return "Ready"
    if ready > 0:
        return "Updating"
    if report.downloading:
        return "Downloading"
    if report.loading:
        return "Loading"
    return "Pending"
