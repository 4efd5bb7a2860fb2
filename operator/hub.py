"""The resolve step: what the operator asks the Hugging Face Hub (or its mirror) before any pod exists.

- a branch or tag resolved to its commit, so every replica downloads and serves the same weights;
- the model's config.json and the size of its weight files, for the fit check (capacity.py).

Plain HTTP with the standard library (the operator image carries no huggingface_hub): the Hub's
`/api/models/{repo}/revision/{rev}` and `/{repo}/resolve/{commit}/config.json`, honouring the endpoint, a
mirror's CA bundle and the model's token. Results are cached per process: a commit's facts never change, a
branch is looked up again after `recheck_s`, and a failure is retried after `retry_s`, so reconciliations do
not each wait on the network.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_operator.capacity import ModelFacts, positive_int

HUB = "https://huggingface.co"
TIMEOUT_S = 10.0
COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(Exception):
    """The Hub (or mirror) could not answer: the message says what was asked and what came back."""


@dataclass(frozen=True, slots=True)
class Resolution:
    commit: str
    facts: ModelFacts | None  # None when the repo has no readable config.json
    checked_at: float


def _size(sibling: dict[str, Any]) -> int:
    lfs = sibling.get("lfs")
    return positive_int(sibling, "size") or (positive_int(lfs, "size") if isinstance(lfs, dict) else None) or 0


def _siblings(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The repo's files as the Hub lists them; entries a mirror garbled (no file name) are left out."""
    listed = info.get("siblings")
    if not isinstance(listed, list):
        return []
    return [s for s in listed if isinstance(s, dict) and isinstance(s.get("rfilename"), str)]


# Trainer checkpoints keep these beside pytorch weights; the downloader does not fetch them.
_TRAINER_STATE = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"})


def _weight_bytes(siblings: list[dict[str, Any]]) -> int:
    """What the downloader fetches to serve (serving/download/model_files.select_files, which the operator
    cannot import): the top folder's safetensors but a consolidated copy beside them (Mistral's repos
    hold the weights twice: counting both refused Mistral-7B on a 24 GiB GPU), else its pytorch weights,
    else a GGUF file: the smallest, where the repo holds several and hf.ggufFile's choice is not known
    here (ModelFacts.choosing takes it)."""
    sizes = {s["rfilename"]: _size(s) for s in siblings}
    root = {name: size for name, size in sizes.items() if "/" not in name}
    safetensors = {name: size for name, size in root.items() if name.endswith(".safetensors")}
    if safetensors:
        kept = [size for name, size in safetensors.items() if not name.startswith("consolidated")]
        return sum(kept or safetensors.values())
    pytorch = [size for name, size in root.items() if name.endswith((".bin", ".pth")) and name not in _TRAINER_STATE]
    if pytorch:
        return sum(pytorch)
    return min((size for name, size in sizes.items() if name.endswith(".gguf")), default=0)


def _gguf_bytes(siblings: list[dict[str, Any]]) -> dict[str, int]:
    return {s["rfilename"]: _size(s) for s in siblings if s["rfilename"].endswith(".gguf")}


class Hub:
    """One endpoint's client (a mirror's CA bundle and a token are per call: they belong to the resource)."""

    def __init__(self, opener: Callable[..., Any] | None = None) -> None:
        self._open = opener or urllib.request.urlopen

    def get_json(self, url: str, token: str | None, ca_pem: str | None) -> Any:
        request = urllib.request.Request(url, headers={"User-Agent": "fleetlm-operator"})
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            context = ssl.create_default_context(cadata=ca_pem) if ca_pem else None
        except (ssl.SSLError, ValueError) as error:
            raise HubError(f"model.hf.caBundle is not a PEM certificate bundle: {error}") from error
        try:
            with self._open(request, timeout=TIMEOUT_S, context=context) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            hint = {401: " (a private or gated repo: set model.tokenSecretRef)", 404: " (no such repo or revision)"}
            raise HubError(f"{url}: HTTP {error.code}{hint.get(error.code, '')}") from error
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise HubError(f"{url}: {reason}") from error

    def resolve(
        self, repo: str, revision: str, endpoint: str | None, token: str | None = None, ca_pem: str | None = None
    ) -> Resolution:
        base = (endpoint or HUB).rstrip("/")
        quoted = urllib.parse.quote(revision, safe="")
        info = self.get_json(f"{base}/api/models/{repo}/revision/{quoted}?blobs=true", token, ca_pem)
        commit = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(commit, str) or not COMMIT.match(commit):
            raise HubError(f"{base}: the answer for {repo}@{revision} names no commit")
        facts = None
        siblings = _siblings(info)
        if any(s["rfilename"] == "config.json" for s in siblings):
            config = self.get_json(f"{base}/{repo}/resolve/{commit}/config.json", token, ca_pem)
            if isinstance(config, dict):
                facts = ModelFacts(config=config, weight_bytes=_weight_bytes(siblings), gguf_bytes=_gguf_bytes(siblings))
        return Resolution(commit, facts, time.monotonic())


class Resolver:
    """Hub answers, cached: by (endpoint, repo, revision) for `recheck_s` (branches move), failures for
    `retry_s`."""

    def __init__(self, hub: Hub | None = None, recheck_s: float = 600.0, retry_s: float = 60.0) -> None:
        self.hub = hub or Hub()
        self.recheck_s, self.retry_s = recheck_s, retry_s
        self._cache: dict[tuple[str | None, str, str], Resolution | tuple[HubError, float]] = {}
        self._lock = threading.Lock()

    def resolve(
        self,
        repo: str,
        revision: str,
        endpoint: str | None,
        credentials: Callable[[], tuple[str | None, str | None]] = lambda: (None, None),
        fresh: bool = False,
    ) -> Resolution:
        """Raises HubError (a cached one within retry_s). `credentials` (token, CA bundle) is called
        only when the Hub is asked: a cached answer reads no Secret."""
        key = (endpoint, repo, revision)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if not fresh and isinstance(hit, Resolution) and (COMMIT.match(revision) or now - hit.checked_at < self.recheck_s):
            return hit
        if not fresh and isinstance(hit, tuple) and now - hit[1] < self.retry_s:
            raise hit[0]
        try:
            result = self.hub.resolve(repo, revision, endpoint, *credentials())
        except HubError as error:
            with self._lock:
                self._cache[key] = (error, now)
            raise
        with self._lock:
            self._cache[key] = result
        return result
