"""The Hugging Face Hub side of a download, through huggingface_hub: resolve a revision, fetch files.

Errors come out as `DownloadError`s with one clear message each. `HF_ENDPOINT` is read on every call (not
only when huggingface_hub is imported), so a mirror or a test's fake Hub can be chosen at run time.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import httpx, validate_repo_id  # httpx: httpx2 in huggingface_hub 2

from serving.download.errors import DownloadError, ExitCode
from serving.download.progress import ModelProgress, Transfer

logger = logging.getLogger("fleetlm.download")

# huggingface_hub's API client has no timeout of its own: a silent Hub would hang the init container.
LISTING_TIMEOUT_S = 30.0
# huggingface_hub >= 2 downloads into a process-unique temp file that no later run reuses (see
# `_download_to_tmp_and_move`); a killed download leaves it behind, so it is swept under the lock.
_ABANDONED_PARTIAL = re.compile(r"\.[0-9a-f]{8}\.incomplete$")


@dataclass(frozen=True, slots=True)
class RemoteRevision:
    commit: str
    sizes: dict[str, int | None]  # every file of the commit -> size in bytes


def check_repo_id(repo: str) -> None:
    try:
        validate_repo_id(repo)
    except HFValidationError as error:
        raise DownloadError(f"invalid repo id {repo!r}: {error}", ExitCode.USAGE) from error


def resolve(repo: str, revision: str, token: str | None) -> RemoteRevision:
    """The commit `revision` points to, with the repo's file listing at that commit."""
    with _translated_errors(repo, revision, token):
        info = HfApi(endpoint=_endpoint(), token=token).model_info(
            repo, revision=revision, files_metadata=True, timeout=LISTING_TIMEOUT_S
        )
    if info.sha is None:
        raise DownloadError(f"the Hub listed {repo} at {revision} without a commit sha", ExitCode.UNEXPECTED)
    return RemoteRevision(info.sha, {sibling.rfilename: sibling.size for sibling in info.siblings or []})


def fetch(
    repo: str, commit: str, path: str, dest: Path, token: str | None, size: int | None, whole: ModelProgress | None = None
) -> None:
    """Download `path` at `commit` into `dest`; a file already there from that commit is kept as is."""
    transfer = Transfer(path, size, whole=whole)
    logger.info("file started", extra={"file": path, "bytes": size})
    # hf-xet's chunk cache (up to 10 GB under HF_HOME in some builds) only helps a file fetched twice.
    os.environ.setdefault("HF_XET_CHUNK_CACHE_SIZE_BYTES", "0")
    with _translated_errors(repo, commit, token, path):
        hf_hub_download(
            repo,
            path,
            revision=commit,
            local_dir=dest,
            token=token,
            endpoint=_endpoint(),
            tqdm_class=progress_bar_class(transfer),
        )
    if transfer.received == 0 and size:
        # Kept from an earlier run (nothing was transferred): it counts toward the model all the same, or a
        # restarted download's progress never reached 100% (the operator shows it in status.startup).
        transfer.advance(size)
    transfer.finished()


def progress_bar_class(transfer: Transfer) -> type[_ProgressBar]:
    """A tqdm stand-in class for huggingface_hub, which instantiates it itself: the class carries `transfer`."""
    return type("FileProgressBar", (_ProgressBar,), {"transfer": transfer})


def remove_abandoned_partials(dest: Path) -> None:
    """Delete temp files of killed downloads; only call while holding the directory's lock."""
    download_dir = dest / ".cache" / "huggingface" / "download"
    for partial in download_dir.rglob("*.incomplete"):
        if _ABANDONED_PARTIAL.search(partial.name):
            logger.info("removing a killed download's partial file", extra={"path": str(partial)})
            partial.unlink(missing_ok=True)


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


# A Retry-After beyond this is not waited for: the init container fails and Kubernetes retries it.
MAX_RETRY_AFTER_S = 120.0


def _retry_after(value: str | None) -> float | None:
    """Retry-After's seconds (the delta-seconds form; an HTTP date is not waited for), at most MAX_RETRY_AFTER_S."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or not 0 <= seconds < float("inf"):
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


def _file_host(error: HfHubHTTPError) -> str | None:
    """The host that answered, where it is not the Hub's own (a CDN the Hub redirected to); else None."""
    try:
        url = httpx.URL(str(error.response.url))
    except Exception:  # noqa: BLE001 - an answer without a usable URL: take it for the Hub's
        return None
    hub = httpx.URL(_endpoint() or "https://huggingface.co")
    if not url.host or (url.host, url.port) == (hub.host, hub.port):
        return None
    return url.host if url.port is None else f"{url.host}:{url.port}"


class _ProgressBar:
    """Stands in for tqdm in huggingface_hub's http and xet download paths, with the methods they call.

    Defining `update_transfer` makes the xet path report into this one bar (as in snapshot_download),
    so bytes are counted once; `update` carries bytes written to the file, negative when a resume restarts.
    """

    transfer: Transfer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.total = kwargs.get("total")
        self.n = kwargs.get("initial", 0)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def update(self, n: int | float | None = 1) -> None:
        self.n += int(n or 0)
        self.transfer.advance(int(n or 0))

    def update_transfer(self, n: int | float | None = 1) -> None:
        pass

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def _translated_errors(
    repo: str, revision: str, token: str | None, path: str | None = None
) -> Iterator[None]:
    try:
        yield
    except GatedRepoError as error:
        if token:
            message = f"repo {repo} is gated and this token has no access: accept its terms on the Hub first"
        else:
            message = f"repo {repo} is gated and needs a token: set HF_TOKEN (after accepting its terms)"
        raise DownloadError(message, ExitCode.UNAUTHORIZED) from error
    except RepositoryNotFoundError as error:
        if error.response.status_code == 401:
            # Without a token the Hub answers 401 for private and for missing repos alike.
            message = f"repo {repo} needs a token: set HF_TOKEN (or it does not exist)"
            raise DownloadError(message, ExitCode.UNAUTHORIZED) from error
        suffix = " (or this token cannot see it)" if token else ""
        raise DownloadError(f"repo {repo} not found{suffix}", ExitCode.NOT_FOUND) from error
    except RevisionNotFoundError as error:
        raise DownloadError(f"revision {revision} not found in {repo}", ExitCode.NOT_FOUND) from error
    except RemoteEntryNotFoundError as error:
        raise DownloadError(f"{path} not found in {repo} at {revision}", ExitCode.NOT_FOUND) from error
    except HfHubHTTPError as error:
        status = error.response.status_code
        elsewhere = _file_host(error)
        if status in (401, 403) and elsewhere is not None:
            # The Hub redirects a file to its CDN (or a mirror to its store), where no token is sent: a refusal
            # there is no token's fault, and signed links expire; retried.
            message = f"{elsewhere}, where the Hub sent the download of {path or repo}, refused it (HTTP {status}): check egress to it"
            raise DownloadError(message, ExitCode.NETWORK) from error
        if status in (401, 403):
            message = f"the Hub refused access to {repo} (HTTP {status}): check HF_TOKEN"
            raise DownloadError(message, ExitCode.UNAUTHORIZED) from error
        if status == 429 or status >= 500:
            wait = _retry_after(error.response.headers.get("Retry-After"))
            raise DownloadError(f"the Hub answered HTTP {status} for {repo}", ExitCode.NETWORK, wait) from error
        # Another 4xx: the Hub (or a mirror) refused the request itself; retrying will not help.
        detail = (getattr(error, "server_message", None) or str(error) or "no detail").splitlines()[0][:200]
        raise DownloadError(f"the Hub answered HTTP {status} for {repo}: {detail}", ExitCode.UNEXPECTED) from error
    except OfflineModeIsEnabled as error:
        message = f"HF_HUB_OFFLINE is set and {repo} at {revision} is not complete here: unset it to download"
        raise DownloadError(message, ExitCode.USAGE) from error
    except json.JSONDecodeError as error:
        # A proxy's login page, or an HF_ENDPOINT that is no Hub: HTML where the API answers JSON.
        where = _endpoint() or "https://huggingface.co"
        message = f"{where} did not answer like the Hub's API (not JSON: {error.msg}): check HF_ENDPOINT and egress"
        raise DownloadError(message, ExitCode.NETWORK) from error
    except OSError as error:
        if error.errno is not None:  # the disk's (the caller reports it)
            raise
        # huggingface_hub's own, such as a file that arrived shorter than announced ("Consistency check
        # failed"): the transfer went wrong, and another try may not.
        raise DownloadError(f"the download of {path or repo} went wrong: {error}", ExitCode.NETWORK) from error
    except (httpx.TransportError, LocalEntryNotFoundError) as error:
        # hf_hub_download reports an unreachable Hub as LocalEntryNotFoundError caused by the network error.
        cause = error.__cause__ if isinstance(error, LocalEntryNotFoundError) and error.__cause__ else error
        where = _endpoint() or "https://huggingface.co"
        message = f"cannot reach the Hub at {where}: {type(cause).__name__}: {cause}"
        raise DownloadError(message, ExitCode.NETWORK) from error
