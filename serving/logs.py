"""Structured logging: one JSON object per line, so log pipelines (Loki, CloudWatch, ...) parse it."""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else was passed through `extra=` and belongs in the line.
# kopf attaches its whole OperatorSettings (about 3 KB) and a routing flag to every record it logs
# about an object: the operator logs its settings once at start-up instead.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "settings",
    "k8s_skip",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str = "info") -> None:
    """Route all logging (ours, hypercorn's, transformers') to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    route_library_logs()
    # warnings.warn (huggingface_hub's disk-space warning) becomes a record too.
    logging.captureWarnings(True)


def route_library_logs() -> None:
    """Libraries that print with a handler of their own write plain text among the JSON lines: their
    records go to the root's handler instead. transformers sets up its logger when first imported (its
    own stderr handler, no propagation), undoing this when that comes after setup_logging: call this
    again once it is imported (serving/models/loader.py does)."""
    for name in ("huggingface_hub", "transformers"):
        library = logging.getLogger(name)
        library.handlers[:] = []
        library.propagate = True
