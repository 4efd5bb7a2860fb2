"""What the pods and the Deployment say about progress and failure, as condition reasons users can act on."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llm_operator import naming
from llm_operator.deployment import DOWNLOAD_CONTAINER, SERVER_CONTAINER, is_download


@dataclass(frozen=True, slots=True)
class Problem:
    reason: str
    message: str


# The downloader's exit codes (python -m serving download), as reasons and what to do about them.
DOWNLOAD_EXITS = {
    2: ("DownloaderUsageError", "the downloader rejected its arguments"),
    3: (
        "ModelAccessDenied",
        "the Hub refused access: check model.tokenSecretRef and that the token's account accepted the model's terms",
    ),
    4: (
        "ModelNotFound",
        "the repository or revision does not exist on the Hub (or is private and no token was given)",
    ),
    5: (
        "DownloadNetworkError",
        "the Hub could not be reached after retries: check egress from the namespace",
    ),
    6: (
        "CacheVolumeError",
        "writing to the model cache volume failed: it may be full (raise cache.size) or read-only",
    ),
}
IMAGE_PULL = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_ERRORS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


@dataclass(slots=True)
class PodReport:
    problems: list[Problem] = field(default_factory=list)
    downloading: bool = False
    loading: bool = False
    downloaded: bool = False  # a pod of the current model got past the download

    def add(self, problem: Problem) -> None:
        if problem not in self.problems:
            self.problems.append(problem)


def diagnose(
    pods: list[dict[str, Any]], deployment: dict[str, Any] | None, model_uri: str, claim: dict[str, Any] | None = None
) -> PodReport:
    """What the pods, their Deployment and the model cache claim (when the operator manages one) say is wrong."""
    report = PodReport()
    unplaced: list[tuple[str, str]] = []  # (pod, the scheduler's message)
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        current = naming.runs_model(pod, model_uri)
        _diagnose_pod(pod, current, report)
        if (message := unscheduled(pod)) is not None:
            unplaced.append((pod["metadata"]["name"], message))
    # A claim waiting for its first consumer is Pending whenever the pod is not placed, for any reason:
    # it is named only when the scheduler's message is about volumes.
    about_volumes = [(pod, message) for pod, message in unplaced if "volume" in message.lower()]
    if about_volumes and _pending(claim):
        assert claim is not None
        report.problems.insert(0, _claim_pending(claim, *about_volumes[0]))
    for cond in (deployment or {}).get("status", {}).get("conditions", []):
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            report.add(
                Problem(
                    "ProgressDeadlineExceeded", cond.get("message", "the rollout stopped making progress")
                )
            )
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            report.add(Problem("ReplicaFailure", cond.get("message", "pods could not be created")))
    return report


def _diagnose_pod(pod: dict[str, Any], current: bool, report: PodReport) -> None:
    name = pod["metadata"]["name"]
    status = pod.get("status", {})
    if (message := unscheduled(pod)) is not None:
        # Unschedulable: no node fits; SchedulerError: a node was chosen but binding failed (e.g. the
        # volume binder could not provision the cache claim on it).
        report.add(Problem("Unschedulable", f"pod {name}: {message}"))

    for cs in status.get("initContainerStatuses", []):
        if not is_download(cs.get("name")):
            continue
        state, last = cs.get("state", {}), cs.get("lastState", {})
        # States are keyed by presence: "running" may be an empty object.
        finished = state.get("terminated", last.get("terminated") if "waiting" in state else None)
        if "running" in state:
            report.downloading = report.downloading or current
        elif finished is not None and finished.get("exitCode") == 0:
            if cs.get("name") == DOWNLOAD_CONTAINER:  # the model's (its cache is what `downloaded` reports)
                report.downloaded = report.downloaded or current
        elif finished is not None:
            report.add(_download_failure(name, finished, cs["name"]))
        elif state.get("waiting", {}).get("reason") in IMAGE_PULL | CONFIG_ERRORS:
            report.add(_waiting_problem(name, cs, state["waiting"]))

    for cs in status.get("containerStatuses", []):
        if cs.get("name") != SERVER_CONTAINER:
            continue
        state = cs.get("state", {})
        if "running" in state or "terminated" in cs.get("lastState", {}):
            report.downloaded = report.downloaded or current  # the server only starts after the download
        if "running" in state and not cs.get("ready"):
            report.loading = report.loading or current
        waiting = state.get("waiting", {})
        if waiting.get("reason") in IMAGE_PULL | CONFIG_ERRORS:
            report.add(_waiting_problem(name, cs, waiting))
        elif waiting.get("reason") == "CrashLoopBackOff":
            report.add(_crash(name, cs))


def unscheduled(pod: dict[str, Any]) -> str | None:
    """The scheduler's message when it could not place the pod, else None; a gated pod (SchedulingGated)
    waits on purpose and is not reported."""
    for cond in pod.get("status", {}).get("conditions", []):
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") in {"Unschedulable", "SchedulerError"}
        ):
            return cond.get("message") or "no node fits"
    return None


def _pending(claim: dict[str, Any] | None) -> bool:
    return claim is not None and (claim.get("status") or {}).get("phase", "Pending") == "Pending"


def _claim_pending(claim: dict[str, Any], pod: str, message: str) -> Problem:
    spec = claim.get("spec") or {}
    modes = ", ".join(spec.get("accessModes") or []) or "no access mode"
    storage_class = spec.get("storageClassName") or "the cluster's default StorageClass"
    text = (
        f"the model cache claim {claim['metadata']['name']} ({modes}, {storage_class}) is not bound and "
        f"pod {pod} cannot be scheduled: {message}"
    )
    if "ReadWriteMany" in (spec.get("accessModes") or []):
        text += (
            ". A claim for more than one replica asks for ReadWriteMany, which many StorageClasses (local-path, "
            "AWS EBS, GCE PD, Azure Disk) do not offer: set cache.storageClassName to one that does (NFS, EFS, "
            "Filestore, Azure Files, CephFS), or cache.accessMode: ReadWriteOnce with the replicas on one node"
        )
    return Problem("CacheClaimPending", text)


def _download_failure(pod: str, terminated: dict[str, Any], container: str) -> Problem:
    code = terminated.get("exitCode")
    if terminated.get("reason") == "OOMKilled":
        return Problem("DownloadOutOfMemory", f"pod {pod}: the downloader ran out of memory")
    reason, advice = DOWNLOAD_EXITS.get(
        code, ("DownloadFailed", "the downloader failed unexpectedly: see its logs")
    )
    said = last_logged_error(terminated.get("message"))
    what = "model download" if container == DOWNLOAD_CONTAINER else f"LoRA adapter download ({container})"
    return Problem(reason, f"pod {pod}: {what} exited with code {code}: {advice}" + (f" (it said: {said})" if said else ""))


def last_logged_error(message: Any) -> str | None:
    """The last JSON log line's message in a container's termination message (its last log lines, with
    terminationMessagePolicy FallbackToLogsOnError): the program's own words on why it stopped, such as
    the downloader's "m-Q8_0.gguf not found in org/m (GGUF files: ...)"."""
    if not isinstance(message, str):
        return None
    for line in reversed(message.strip().splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "critical") and isinstance(entry.get("msg"), str):
            return entry["msg"][:500]
    return None


def _waiting_problem(pod: str, cs: dict[str, Any], waiting: dict[str, Any]) -> Problem:
    reason = "ImagePullFailed" if waiting["reason"] in IMAGE_PULL else "ContainerConfigError"
    detail = waiting.get("message") or waiting["reason"]
    return Problem(reason, f"pod {pod}, container {cs['name']} ({cs.get('image', '?')}): {detail}")


def _crash(pod: str, cs: dict[str, Any]) -> Problem:
    last = cs.get("lastState", {}).get("terminated", {})
    if last.get("reason") == "OOMKilled":
        return Problem(
            "OutOfMemory",
            f"pod {pod}: the server was killed for exceeding its memory limit; raise resources.memory",
        )
    said = last_logged_error(last.get("message"))
    return Problem(
        "CrashLoopBackOff",
        f"pod {pod}: the server keeps exiting (last exit code {last.get('exitCode', '?')})"
        + (f": {said}" if said else "; see its logs"),
    )
