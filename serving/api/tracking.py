"""Per-request bookkeeping: metrics, the drain counter and one JSON log line per request."""

from __future__ import annotations

import logging
import time

from serving.api.state import AppState

log = logging.getLogger("fleetlm.api")


class RequestTracker:
    """Opened by the app when a generation request arrives, before anything can refuse it; closed
    exactly once, however the request ends. The one place that counts a generation request
    (llm_requests_total), its success or failure, and writes its log line.

    Whoever sends the response closes it: the app for errors and whole JSON bodies, the stream's
    body for a streamed response (`streaming` is set when that stream takes it over)."""

    def __init__(self, state: AppState, request_id: str, endpoint: str):
        self.state = state
        self.request_id = request_id
        self.endpoint = endpoint
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens: dict[int, int] = {}  # choice index -> prompt tokens served from the prefix cache
        self.finish_reasons: list[str] = []
        self.streaming = False
        self.error: str | None = None  # the message of the error response, if one is sent
        self._closed = False
        m = state.metrics
        m.requests.labels(m.model).inc()
        m.active_requests.labels(m.model).inc()
        state.in_flight += 1

    def token_arrived(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, status: int, error: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        state, m = self.state, self.state.metrics
        state.in_flight -= 1
        m.active_requests.labels(m.model).dec()
        elapsed = time.monotonic() - self.started
        if status < 400:
            m.requests_success.labels(m.model).inc()
            m.request_duration.labels(m.model).observe(elapsed)
            m.prompt_tokens.labels(m.model).inc(self.prompt_tokens)
            m.tokens_generated.labels(m.model).inc(self.completion_tokens)
            if self.first_token_at is not None:
                m.ttft.labels(m.model).observe(self.first_token_at - self.started)
                if self.completion_tokens > 1:
                    per_token = (time.monotonic() - self.first_token_at) / (self.completion_tokens - 1)
                    m.tpot.labels(m.model).observe(per_token)
        else:
            m.requests_failed.labels(m.model).inc()
        log.info(
            "request finished",
            extra={
                "request_id": self.request_id,
                "endpoint": self.endpoint,
                "status": status,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "latency_s": round(elapsed, 4),
                "ttft_s": None if self.first_token_at is None else round(self.first_token_at - self.started, 4),
                "finish_reason": self.finish_reasons[0] if len(set(self.finish_reasons)) == 1 else self.finish_reasons,
                **({"error": error or self.error} if (error or self.error) else {}),
            },
        )
