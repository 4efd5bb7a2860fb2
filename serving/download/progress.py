"""Byte progress of one file transfer, logged as a JSON line every PROGRESS_INTERVAL_S seconds."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("fleetlm.download")

PROGRESS_INTERVAL_S = 10.0


@dataclass(slots=True)
class Transfer:
    path: str
    total: int | None
    received: int = 0
    started: float = field(default_factory=time.monotonic)
    last_logged: float = field(default_factory=time.monotonic)

    def advance(self, n: int) -> None:
        """Count `n` more bytes (negative when a resumed download has to start over)."""
        self.received += n
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
