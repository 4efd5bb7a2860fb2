"""The destination directory's protocol: one writer at a time, and a completion marker written last.

A directory holds a usable model exactly when its marker exists and every file it lists has the listed
size; readers (the server, a second init container) need nothing else.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

MARKER_NAME = ".fleetlm-complete.json"
LOCK_NAME = ".fleetlm-download.lock"
MARKER_VERSION = 1

logger = logging.getLogger("fleetlm.download")


@dataclass(frozen=True, slots=True)
class Marker:
    """What a finished download holds: Hub downloads set repo/revision/commit, local copies set source."""

    files: dict[str, int]  # path relative to the directory -> size in bytes
    repo: str | None = None
    revision: str | None = None  # as requested: branch, tag or commit
    commit: str | None = None  # what the revision resolved to
    source: str | None = None
    completed_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, object]:
        return {
            "version": MARKER_VERSION,
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "source": self.source,
            "files": [{"path": path, "size": size} for path, size in sorted(self.files.items())],
            "completed_at": self.completed_at,
        }

    def intact(self, dest: Path) -> bool:
        """Every listed file is in `dest` with its listed size (a cheap check that nothing was removed)."""
        try:
            return all((dest / path).stat().st_size == size for path, size in self.files.items())
        except FileNotFoundError:
            return False

    @classmethod
    def from_json(cls, data: dict) -> Marker:
        return cls(
            files={entry["path"]: int(entry["size"]) for entry in data["files"]},
            repo=data.get("repo"),
            revision=data.get("revision"),
            commit=data.get("commit"),
            source=data.get("source"),
            completed_at=data.get("completed_at", ""),
        )


def read_marker(dest: Path) -> Marker | None:
    """The marker `dest` holds, if any."""
    try:
        return Marker.from_json(json.loads((dest / MARKER_NAME).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:
        logger.warning(
            "ignoring an unreadable completion marker", extra={"dest": str(dest), "error": str(error)}
        )
        return None


def write_marker(dest: Path, marker: Marker) -> None:
    """Atomically: a reader sees no marker or the whole marker, even after a crash mid-write."""
    tmp = dest / f"{MARKER_NAME}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(marker.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest / MARKER_NAME)
    _fsync_dir(dest)


def remove_marker(dest: Path) -> None:
    """Before changing any file, so a reader never trusts a half-updated directory."""
    (dest / MARKER_NAME).unlink(missing_ok=True)
    _fsync_dir(dest)


@contextmanager
def exclusive(dest: Path) -> Iterator[None]:
    """Hold the directory's download lock; a second downloader waits here until the first is done.

    flock is released by the kernel when the process dies, so a killed download never leaves it held.
    """
    dest.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(
                "another download into this directory is running: waiting for it", extra={"dest": str(dest)}
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
