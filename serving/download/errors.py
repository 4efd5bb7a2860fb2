"""How a model download fails: one exit code per cause, so an init container's status says what to fix."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    UNAUTHORIZED = 3  # 401/403, gated repos
    NOT_FOUND = 4  # repo, revision, file or source directory
    NETWORK = 5  # connection refused, timeouts, Hub 5xx, after retries
    DISK = 6  # the destination cannot be written


class DownloadError(Exception):
    """A download failed for a known reason; `str(error)` is the one-line message for humans."""

    def __init__(self, message: str, exit_code: ExitCode, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.retry_after = retry_after  # seconds the server asked for (a 429's or 503's Retry-After)
