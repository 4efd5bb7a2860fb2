"""Room on a cache volume: before a download, other models under the cache's root are deleted, least
recently used first, when the volume lacks the room for what is still to be fetched.

A cache volume that one LLMDeployment owns collects every revision and every model it was ever pointed at;
without this, the third revision of an 8B model no longer fits a 50 GiB cache and the download fails
half-way with a full disk. Nothing is deleted while there is room, a directory with a download running in
it (its lock held) is never deleted, and the directory being filled is never a candidate.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from serving.download import model_dir

logger = logging.getLogger("fleetlm.download")

# Besides the files themselves: huggingface_hub's metadata, directory entries, a filesystem's rounding.
HEADROOM = 64 * 1024 * 1024


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def make_room(dest: Path, needed: int, root: Path) -> None:
    """Delete other model directories under `root` (least recently used first) until the volume holding
    `dest` has `needed` bytes free, plus headroom. If it still has not, the download goes on (a volume may
    report its free space wrongly) and a warning says what is missing."""
    wanted = needed + HEADROOM
    free = free_bytes(dest)
    if free >= wanted:
        return
    for other in sorted(_model_dirs(root, dest), key=model_dir.last_used):
        marker = model_dir.read_marker(other)
        if not model_dir.remove(other):
            continue  # a download is running in it
        _remove_empty_parents(other, root)
        free = free_bytes(dest)
        logger.info(
            "evicted a model from the cache to make room",
            extra={
                "dir": str(other),
                "repo": marker.repo if marker else None,
                "commit": marker.commit if marker else None,
                "complete": marker is not None,
                "free_bytes": free,
                "needed_bytes": needed,
            },
        )
        if free >= wanted:
            return
    logger.warning(
        f"the cache volume has {free} bytes free and this download needs {needed} more: it may fail "
        "for want of space (raise the cache's size)",
        extra={"free_bytes": free, "needed_bytes": needed},
    )


def _model_dirs(root: Path, dest: Path) -> list[Path]:
    """The model directories under `root` (those a download made: they hold its lock file), other than
    `dest` and any directory above or inside it."""
    dest = dest.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath).resolve()
        if model_dir.LOCK_NAME in filenames:
            dirnames.clear()  # a model directory holds no other model
            if here != dest and here not in dest.parents and dest not in here.parents:
                found.append(Path(dirpath))
        else:
            dirnames[:] = [name for name in dirnames if not name.startswith(".")]
    return found


def _remove_empty_parents(path: Path, root: Path) -> None:
    """Remove the directories between `path` (already gone) and `root` that it left empty (ORG--NAME/)."""
    parent = path.parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent
