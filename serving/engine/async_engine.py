"""The asyncio face of the engine: a step loop on its own thread, streams per request.

The HTTP event loop never runs model code. Requests and aborts cross to the engine thread
through a queue; each step's deltas cross back in one `call_soon_threadsafe`. A client that
goes away aborts its request, which frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from serving.engine.llm_engine import LLMEngine, SequenceDelta, StepStats
from serving.engine.sampling_params import SamplingParams

log = logging.getLogger("fleetlm.engine")


class QueueFullError(Exception):
    """More requests are waiting than the queue may hold."""


class EngineStoppedError(Exception):
    """The engine is shut down (or its loop died) and takes no more requests."""


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    n: int


@dataclass(slots=True)
class _Abort:
    request_id: str


class _Stream:
    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[SequenceDelta | Exception] = asyncio.Queue()


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        queue_capacity: int,
        on_step: Callable[[StepStats], None] | None = None,
    ):
        self.engine = engine
        self.queue_capacity = queue_capacity
        self._on_step = on_step
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._pending_adds = 0  # sequences in the inbox, not yet in the scheduler
        self._pending_lock = threading.Lock()  # both threads update the count
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="fleetlm-engine", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self._dead is None and not self._stopping

    # -- load ------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting + self._pending_adds

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    # -- requests --------------------------------------------------------------------------
    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int = 1
    ) -> AsyncIterator[SequenceDelta]:
        """Yield deltas of all n choices, interleaved, until every choice has finished."""
        if not self.healthy:
            raise EngineStoppedError("the engine is not running")
        if self.num_waiting + n > self.queue_capacity:
            raise QueueFullError(f"{self.num_waiting} requests are already waiting (capacity {self.queue_capacity})")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        with self._pending_lock:
            self._pending_adds += n
        self._inbox.put(_Add(request_id, prompt_token_ids, params, n))
        self._wake.set()
        finished = 0
        try:
            while finished < n:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    finished += 1
                yield item
        finally:
            self._streams.pop(request_id, None)
            if finished < n:  # client went away, or an error: free its sequences now
                self._inbox.put(_Abort(request_id))
                self._wake.set()

    # -- engine thread ---------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, _Abort):
                self.engine.abort_request(msg.request_id)
                continue
            with self._pending_lock:
                self._pending_adds -= msg.n
            if msg.request_id not in self._streams:
                continue  # cancelled before it reached the engine
            try:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.n)
            except ValueError as exc:
                self._deliver([(msg.request_id, exc)])

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                self._drain_inbox()
                if not self.engine.has_work:
                    self._wake.wait()
                    continue
                deltas = self.engine.step()
                if deltas:
                    self._deliver([(d.request_id, d) for d in deltas])
                if self._on_step is not None and self.engine.last_stats is not None:
                    self._on_step(self.engine.last_stats)
        except BaseException as exc:  # keep the reason; /health reports the engine dead
            self._dead = exc
            log.exception("engine loop died")
            self._deliver([(rid, EngineStoppedError(f"engine failed: {exc}")) for rid in list(self._streams)])
            raise

    def _deliver(self, items: list[tuple[str, SequenceDelta | Exception]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, SequenceDelta | Exception]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: its clients are gone
                loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[asyncio.Queue, SequenceDelta | Exception]]) -> None:
    for q, item in batch:
        q.put_nowait(item)
