"""Byte progress of one file transfer, logged as a JSON line every PROGRESS_INTERVAL_S seconds."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger("fleetlm.download")

PROGRESS_INTERVAL_S = 10.0


@dataclass(slots=True)
class ModelProgress:
    """Bytes of the whole model, over files downloaded in parallel: one "download progress" line
    (downloaded_bytes, total_bytes, percent, eta_s) every PROGRESS_INTERVAL_S. The operator reads the
    latest from the init container's log for status.startup."""

    total: int
    received: int = 0
    started: float = field(default_factory=time.monotonic)
    last_logged: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        # Logged under the lock: lines written after it by parallel files came out of order (a later
        # line with fewer bytes), and the operator takes the last line for the whole model's progress.
        with self._lock:
            self.received += n
            now = time.monotonic()
            if now - self.last_logged < PROGRESS_INTERVAL_S:
                return
            self.last_logged = now
            received, elapsed = self.received, now - self.started
            rate = received / elapsed if elapsed > 0 else 0.0
            logger.info(
                "download progress",
                extra={
                    "downloaded_bytes": received,
                    "total_bytes": self.total,
                    "percent": round(100 * received / self.total, 1) if self.total else None,
                    "eta_s": round((self.total - received) / rate) if rate > 0 and self.total >= received else None,
                },
            )


@dataclass(slots=True)
class Transfer:
    path: str
    total: int | None
    received: int = 0
    started: float = field(default_factory=time.monotonic)
    last_logged: float = field(default_factory=time.monotonic)
    whole: ModelProgress | None = None  # the model's progress this file counts towards

    def advance(self, n: int) -> None:
        """Count `n` more bytes (negative when a resumed download has to start over)."""
        self.received += n
        if self.whole is not None:
            self.whole.add(n)
        now = time.monotonic()
        if now - self.last_logged >= PROGRESS_INTERVAL_S:
            self.last_logged = now
            percent = round(100 * self.received / self.total, 1) if self.total else None
            logger.info(
                "file progress",
                extra={
                    "file": self.path,
                    "downloaded_bytes": self.received,
                    "bytes": self.total,
                    "percent": percent,
                },
            )

    def finished(self) -> None:
        logger.info(
            "file finished",
            extra={
                "file": self.path,
                "bytes": self.total,
                "downloaded_bytes": self.received,
                "seconds": round(time.monotonic() - self.started, 3),
            },
        )
