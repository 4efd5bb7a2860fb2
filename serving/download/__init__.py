"""Put a model where the server loads it: fetched from the Hugging Face Hub, or copied from a local/PVC path.

The serving pod's init container runs `python -m serving download --model ORG/NAME --revision REV --dest DIR`
(or `--source PATH`); the server calls `download_model` for `--model-path org/name`. Only what serving needs
is taken (see `serving.download.model_files`). The destination is complete exactly when it holds the completion
marker (`serving.download.model_dir`), which is written last; concurrent downloaders into one directory take turns.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub.utils import httpx

from serving.config import program_name
from serving.download import hub, model_dir, room
from serving.download.errors import DownloadError, ExitCode
from serving.download.model_files import SUPPORT_FILES, select_files
from serving.download.progress import ModelProgress, Transfer
from serving.logs import setup_logging
from serving.trust import trust_extra_ca

__all__ = ["DownloadError", "ExitCode", "copy_model", "download_model", "main"]

logger = logging.getLogger("fleetlm.download")

PARALLEL_FILES = 4
RETRY_BASE_DELAY_S = 2.0
_COPY_CHUNK = 16 * 1024 * 1024


def download_model(
    repo: str,
    revision: str | None,
    dest: Path,
    token: str | None = None,
    *,
    gguf_file: str | None = None,
    retries: int = 3,
    cache_root: Path | None = None,
) -> Path:
    """Download what serving needs from Hub repo `repo` at `revision` (default "main") into `dest`.

    Returns `dest` once it is complete. If `dest` already holds a complete download of the same repo and
    revision (or of the commit given as revision), returns at once without touching the network. On a
    network error the whole fetch is retried `retries` times with exponential backoff; files already
    fetched are kept. `token` defaults to huggingface_hub's own lookup (HF_TOKEN, then `hf auth login`).
    With `cache_root` (a cache volume's directory of models, `dest` among them), other models under it are
    deleted, least recently used first, where the volume lacks the room for this one (`room.make_room`).
    Raises `DownloadError` (with `exit_code`) on any known failure.
    """
    hub.check_repo_id(repo)
    revision = revision or "main"
    dest = Path(dest)
    with _disk_errors(dest):
        if _holds(dest, repo, revision, gguf_file):
            return dest
        with model_dir.exclusive(dest):
            if _holds(dest, repo, revision, gguf_file):
                return dest
            previous = model_dir.read_marker(dest)
            attempt = 0
            while True:
                try:
                    _fetch_from_hub(repo, revision, dest, token, gguf_file, previous, cache_root)
                    return dest
                except DownloadError as error:
                    if error.exit_code != ExitCode.NETWORK or attempt == retries:
                        raise
                    delay = max(RETRY_BASE_DELAY_S * 2**attempt, error.retry_after or 0.0)  # as long as the Hub asks
                    attempt += 1
                    logger.warning(f"{error}; retrying in {delay:g}s", extra={"attempt": attempt})
                    time.sleep(delay)


def copy_model(source: Path, dest: Path, *, gguf_file: str | None = None) -> Path:
    """Copy what serving needs from local directory `source` (e.g. a mounted PVC) into `dest`.

    Same file selection, marker and locking as `download_model`. Returns `dest` once it is complete, at
    once if it already holds a complete copy of the same files of `source`. Raises `DownloadError`.
    """
    source = Path(source).resolve()
    dest = Path(dest)
    if not source.is_dir():
        raise DownloadError(f"source directory {source} not found", ExitCode.NOT_FOUND)
    with _disk_errors(dest):
        listing = _list_dir(source)
        files = select_files(
            listing,
            lambda name: json.loads((source / name).read_text()),
            origin=str(source),
            gguf_file=gguf_file,
        )
        wanted = model_dir.Marker(files={path: listing[path] for path in files}, source=str(source))
        if _holds_copy(dest, source, wanted):
            return dest
        with model_dir.exclusive(dest):
            if _holds_copy(dest, source, wanted):
                return dest
            previous = model_dir.read_marker(dest)
            model_dir.remove_marker(dest)
            _remove_unneeded(dest, previous, files)
            for path in files:
                _copy_file(source / path, dest / path, path)
            model_dir.write_marker(dest, wanted)
    logger.info("model copied", extra={"source": str(source), "dest": str(dest), "files": len(files)})
    return dest


def main(argv: list[str]) -> int:
    """`python -m serving download ...` (argv without the word "download"); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on bad usage, 0 for --help
        return int(exit_.code or 0)
    setup_logging(args.log_level)
    signal.signal(signal.SIGTERM, _terminated)
    if args.log_level != "debug":  # one line per HTTP request drowns the per-file progress
        logging.getLogger(httpx.__name__).setLevel(logging.WARNING)
    if args.source is not None and args.revision is not None:
        logger.error("--revision applies to --model, not to --source")
        return ExitCode.USAGE
    try:
        trust_extra_ca()
    except ValueError as exc:
        logger.error(str(exc))
        return ExitCode.USAGE
    try:
        if args.model is not None:
            download_model(
                args.model,
                args.revision,
                args.dest,
                args.token,
                gguf_file=args.gguf_file,
                retries=args.retries,
                cache_root=args.cache_root,
            )
        else:
            copy_model(args.source, args.dest, gguf_file=args.gguf_file)
    except DownloadError as error:
        logger.error(str(error), extra={"exit_code": int(error.exit_code)})
        return error.exit_code
    except Exception:
        logger.exception("download failed unexpectedly")
        return ExitCode.UNEXPECTED
    return ExitCode.OK


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (a pod deleted or rolled mid-download) stops at once. As a container's PID 1 the process
    would otherwise never see it: the kernel drops signals PID 1 has no handler for, and the pod would
    wait out its whole grace period. Nothing is taken for complete that is not: the marker is written last,
    the kernel frees the lock, and the next downloader keeps the files that were complete and sweeps the
    temp files of those in flight, which it fetches again from their start (huggingface_hub names its
    partial files afresh in each process, so they cannot be continued across a restart)."""
    logger.warning("download stopped by SIGTERM", extra={"exit_code": 128 + signum})
    logging.shutdown()
    os._exit(128 + signum)  # not SystemExit: the pool's threads would keep the process alive


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{program_name()} download",
        description="Fetch the files serving needs (config, tokenizer, weights) into --dest. "
        "Exit codes: 0 ok, 1 unexpected error, 2 bad usage, 3 unauthorized/gated, 4 not found, "
        "5 network error, 6 local disk error.",
    )
    origin = parser.add_mutually_exclusive_group(required=True)
    origin.add_argument("--model", help="Hugging Face Hub repo id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    origin.add_argument(
        "--source", type=Path, help="copy from this local directory (e.g. a mounted PVC) instead"
    )
    parser.add_argument("--revision", help="branch, tag or commit sha (default: main)")
    parser.add_argument("--dest", type=Path, required=True, help="directory to fill")
    parser.add_argument(
        "--token",
        default=os.environ.get("HF_TOKEN") or None,  # an empty Secret value or HF_TOKEN= is no token
        help="Hub token for private or gated repos (default: $HF_TOKEN)",
    )
    parser.add_argument("--gguf-file", help="the GGUF file to take when the repo holds several")
    parser.add_argument(
        "--retries", type=_count, default=3, help="retries after a network error, with backoff (default: 3)"
    )
    parser.add_argument(
        "--cache-root",
        type=Path,
        help="a cache volume's directory of models, --dest among them: where the volume lacks the room for this "
        "model, the others under it are deleted, least recently used first (never one being downloaded)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


TOKENIZER_MARKER = ".fleetlm-tokenizer-complete"


def download_tokenizer(repo: str, dest: Path, token: str | None = None) -> Path:
    """A tokenizer's files, no weights, from Hub repo `repo` (its main branch) into `dest`: what the
    server takes for a --tokenizer-path that is a Hub id. Files already there from that commit are kept.
    Where the Hub cannot be reached, a tokenizer fetched whole before is used: a server restarted during
    a Hub outage crash-looped on the tokenizer of a model it had on disk."""
    hub.check_repo_id(repo)
    fetched = dest / TOKENIZER_MARKER
    try:
        remote = hub.resolve(repo, "main", token)
    except DownloadError as error:
        if error.exit_code != ExitCode.NETWORK or not fetched.is_file():
            raise
        logger.warning("the Hub is out of reach: using the tokenizer fetched before", extra={"repo": repo, "error": str(error)})
        return dest
    wanted = sorted(set(remote.sizes) & SUPPORT_FILES)
    if not {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} & set(wanted):
        raise DownloadError(f"{repo} holds no tokenizer files", ExitCode.NOT_FOUND)
    dest.mkdir(parents=True, exist_ok=True)
    with model_dir.exclusive(dest):
        fetched.unlink(missing_ok=True)  # written again once every file is there
        for path in wanted:
            hub.fetch(repo, remote.commit, path, dest, token, remote.sizes[path])
        fetched.write_text(remote.commit)
    return dest


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _holds(dest: Path, repo: str, revision: str, gguf_file: str | None = None) -> bool:
    marker = model_dir.read_marker(dest)
    if marker is None or marker.repo != repo or revision not in (marker.revision, marker.commit):
        return False
    if gguf_file is not None and gguf_file not in marker.files:  # another of the repo's GGUF files
        return False
    if not marker.intact(dest):
        return False
    logger.info("already complete", extra={"repo": repo, "revision": revision, "commit": marker.commit})
    model_dir.mark_used(dest)  # one more pod starts on it: the last a cache with too little room evicts
    return True


def _holds_copy(dest: Path, source: Path, wanted: model_dir.Marker) -> bool:
    marker = model_dir.read_marker(dest)
    if marker is None or marker.source != wanted.source or marker.files != wanted.files:
        return False
    if not all(_same_file(source / path, dest / path) for path in wanted.files):
        return False
    logger.info("already complete", extra={"source": wanted.source})
    return True


def _same_file(src: Path, dst: Path) -> bool:
    """rsync's quick check: same size and modification time (copies keep the source's mtime)."""
    try:
        ours, theirs = src.stat(), dst.stat()
    except FileNotFoundError:
        return False
    return (ours.st_size, ours.st_mtime_ns) == (theirs.st_size, theirs.st_mtime_ns)


def _fetch_from_hub(
    repo: str,
    revision: str,
    dest: Path,
    token: str | None,
    gguf_file: str | None,
    previous: model_dir.Marker | None,
    cache_root: Path | None = None,
) -> None:
    remote = hub.resolve(repo, revision, token)
    logger.info("revision resolved", extra={"repo": repo, "revision": revision, "commit": remote.commit})
    # From here on files change: a failure to resolve leaves a previous complete download usable.
    model_dir.remove_marker(dest)
    hub.remove_abandoned_partials(dest)

    def read_index(name: str) -> dict:
        hub.fetch(repo, remote.commit, name, dest, token, remote.sizes[name])
        return json.loads((dest / name).read_text())

    files = select_files(remote.sizes, read_index, origin=f"{repo} at {revision}", gguf_file=gguf_file)
    _remove_unneeded(dest, previous, files)
    if cache_root is not None:
        missing = sum(remote.sizes[path] or 0 for path in files if not model_dir.has_file(dest, path, remote.sizes[path]))
        room.make_room(dest, missing, Path(cache_root))
    whole = ModelProgress(sum(remote.sizes[path] or 0 for path in files))
    logger.info("download planned", extra={"files": len(files), "total_bytes": whole.total})
    pool = ThreadPoolExecutor(max_workers=PARALLEL_FILES, thread_name_prefix="download")
    try:
        pending = [
            pool.submit(hub.fetch, repo, remote.commit, path, dest, token, remote.sizes[path], whole)
            for path in files
        ]
        for done in as_completed(pending):
            done.result()
    finally:
        pool.shutdown(cancel_futures=True)  # the first failure stops files not yet started

    sizes = {path: (dest / path).stat().st_size for path in files}
    for path, size in sizes.items():
        if remote.sizes[path] not in (None, size):
            # hf_hub_download keeps an old local copy when it cannot reach the Hub to refresh it.
            message = (
                f"{path} has {size} bytes on disk but {remote.sizes[path]} on the Hub: it was not refreshed"
            )
            raise DownloadError(message, ExitCode.NETWORK)
    model_dir.write_marker(
        dest, model_dir.Marker(files=sizes, repo=repo, revision=revision, commit=remote.commit)
    )
    model_dir.mark_used(dest)
    logger.info(
        "model downloaded",
        extra={"repo": repo, "commit": remote.commit, "dest": str(dest), "files": len(files)},
    )


def _list_dir(root: Path) -> dict[str, int]:
    """Regular files under `root` (relative posix path -> size), hidden ones (.cache, .git, markers) left out."""
    listing = {}
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            listing[relative.as_posix()] = path.stat().st_size
    return listing


def _copy_file(src: Path, dst: Path, name: str) -> None:
    """Copy via a temp file and rename; skip a file a previous copy already placed.

    The temp name is fixed, not per process: the lock makes us its only writer, and a killed copy's
    leftover is overwritten by the next run instead of piling up.
    """
    size = src.stat().st_size
    if _same_file(src, dst):
        logger.info("file already present", extra={"file": name, "bytes": size})
        return
    logger.info("file started", extra={"file": name, "bytes": size})
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.fleetlm-partial")
    transfer = Transfer(name, size)
    with open(src, "rb") as reader, open(tmp, "wb") as writer:
        while chunk := reader.read(_COPY_CHUNK):
            writer.write(chunk)
            transfer.advance(len(chunk))
    shutil.copystat(src, tmp)
    os.replace(tmp, dst)
    transfer.finished()


def _remove_unneeded(dest: Path, previous: model_dir.Marker | None, files: list[str]) -> None:
    """Delete what the previous download put in `dest` and this one does not use (e.g. old shards)."""
    for path in sorted(set(previous.files) - set(files)) if previous else []:
        logger.info("removing a file of the previous download", extra={"file": path})
        (dest / path).unlink(missing_ok=True)


@contextmanager
def _disk_errors(dest: Path) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno is None:  # not an operating-system error: huggingface_hub's OSError subclasses
            raise
        where = error.filename or dest
        raise DownloadError(f"I/O error on {where}: {error.strerror}", ExitCode.DISK) from error
