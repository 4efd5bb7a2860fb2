"""status.startup: the cold start of the newest serving pod, phase by phase, so that "why is it not ready
yet" has an answer: scheduled -> image pulled -> model downloaded (bytes, total, ETA while it runs) ->
server started -> weights loaded and ready.

Times come from the pod's status (conditions and container states, as the kubelet reports them); download
progress from the latest "download progress" line of the init container's log (serving/download/progress.py),
read only while it runs.
"""

from __future__ import annotations

import json
from typing import Any

from llm_operator.deployment import DOWNLOAD_CONTAINER, SERVER_CONTAINER, is_download

PROGRESS_LINE = "download progress"


def newest_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return max(live, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]), default=None)


def download_progress(log_tail: str | None) -> dict[str, Any] | None:
    """The latest model-wide progress line of the downloader's JSON log, as status fields."""
    for line in reversed((log_tail or "").splitlines()):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == PROGRESS_LINE:
            found = {
                "downloadedBytes": entry.get("downloaded_bytes"),
                "totalBytes": entry.get("total_bytes"),
                "percent": entry.get("percent"),
                "etaSeconds": entry.get("eta_s"),
                "at": entry.get("ts"),
            }
            return {k: v for k, v in found.items() if v is not None}
    return None


def _condition_time(pod: dict[str, Any], kind: str) -> str | None:
    for cond in pod.get("status", {}).get("conditions", []):
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond.get("lastTransitionTime")
    return None


def _container(pod: dict[str, Any], field: str, name: str) -> dict[str, Any]:
    return next((c for c in pod.get("status", {}).get(field, []) if c.get("name") == name), {})


def _started(status: dict[str, Any]) -> str | None:
    state = status.get("state", {})
    return (state.get("running") or state.get("terminated") or {}).get("startedAt")


def timeline(pod: dict[str, Any], log_tail: str | None = None) -> dict[str, Any]:
    """The newest pod's phases: each one's time once reached, and the phase it is in now."""
    init = _container(pod, "initContainerStatuses", DOWNLOAD_CONTAINER)
    server = _container(pod, "containerStatuses", SERVER_CONTAINER)
    finished = init.get("state", {}).get("terminated") or {}
    steps = {
        "scheduledAt": _condition_time(pod, "PodScheduled"),
        # The first container starting is the image pulled (both containers run the serving image).
        "imagePulledAt": _started(init) or _started(server),
        "downloadedAt": finished.get("finishedAt") if finished.get("exitCode") == 0 else None,
        "serverStartedAt": _started(server),
        "readyAt": _condition_time(pod, "Ready"),
    }
    out: dict[str, Any] = {"pod": pod["metadata"]["name"], **{k: v for k, v in steps.items() if v}}
    if "readyAt" in out:
        phase = "Ready"
    elif "serverStartedAt" in out:
        phase = "LoadingWeights"
    elif downloading(pod) is not None:
        phase = "Downloading"
        progress = download_progress(log_tail)
        if progress:
            out["download"] = progress
    elif "scheduledAt" in out:
        phase = "PullingImage" if "imagePulledAt" not in out else "Starting"
    else:
        phase = "Scheduling"
    out["phase"] = phase
    return out


def downloading(pod: dict[str, Any]) -> str | None:
    """The init container fetching the pod's model or one of its LoRA adapters now, if any."""
    statuses = pod.get("status", {}).get("initContainerStatuses", [])
    return next((c["name"] for c in statuses if is_download(c.get("name")) and c.get("state", {}).get("running") is not None), None)
