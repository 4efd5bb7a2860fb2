"""The destination directory's protocol: one writer at a time, and a completion marker written last.

A directory holds a usable model exactly when its marker exists and every file it lists has the listed
size; readers (the server, a second init container) need nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
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
        return all(has_file(dest, path, size) for path, size in self.files.items())

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


def has_file(dest: Path, path: str, size: int | None) -> bool:
    """Whether `dest` holds `path` at `size` (a size not known is never held)."""
    try:
        return size is not None and (dest / path).stat().st_size == size
    except FileNotFoundError:
        return False


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


@contextlib.contextmanager
def exclusive(dest: Path) -> Iterator[None]:
    """Hold the directory's download lock; a second downloader waits here until the first is done.

    flock is released by the kernel when the process dies, so a killed download never leaves it held.
    A lock taken on a file that was meanwhile deleted (the directory evicted, `remove`) is taken again
    on the directory made anew.
    """
    waited = False
    while True:
        dest.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    logger.info(
                        "another download into this directory is running: waiting for it", extra={"dest": str(dest)}
                    )
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _still_there(fd, dest / LOCK_NAME):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def mark_used(dest: Path) -> None:
    """Note that a model directory was just used (its lock file's mtime): eviction takes the least recently used."""
    with contextlib.suppress(OSError):  # a read-only mount: nothing is evicted there either
        os.utime(dest / LOCK_NAME)


def last_used(dest: Path) -> float:
    try:
        return (dest / LOCK_NAME).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def remove(dest: Path) -> bool:
    """Delete the model directory `dest` unless a download into it is running (its lock is held): the
    marker first, so no reader trusts what is left if this is interrupted. True once it is gone."""
    try:
        fd = os.open(dest / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not _still_there(fd, dest / LOCK_NAME):
            return False
        remove_marker(dest)
        for entry in dest.iterdir():
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (dest / LOCK_NAME).unlink()  # a downloader waiting on it finds it gone and locks a new one
        with contextlib.suppress(OSError):  # such a downloader may have made its new lock file already
            dest.rmdir()
        return True
    finally:
        os.close(fd)


def _still_there(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the one at `path` (not deleted or replaced since it was opened)."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
