"""The asyncio face of the engine: a client of the engine process, streams per request.

Requests and aborts go to the engine process over one pipe; each step's deltas come back over
another, read by the event loop itself (add_reader, no thread). A client that goes away aborts
its request, which frees its KV blocks before the engine's next step. Deltas that pile up behind
a slow consumer are merged, so a busy event loop sends fewer, larger SSE chunks instead of
falling further behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
from collections.abc import AsyncIterator, Callable

from serving.config import ServeConfig
from serving.engine.engine_process import ModelInfo, run_engine
from serving.engine.llm_engine import SequenceDelta, StepStats, merge_deltas
from serving.engine.sampling_params import SamplingParams

log = logging.getLogger("fleetlm.engine")


class QueueFullError(Exception):
    """More requests are waiting than the queue may hold."""


class EngineStoppedError(Exception):
    """The engine is shut down (or died) and takes no more requests."""


class ModelLoadError(Exception):
    """The engine process could not load the model."""


class AsyncEngine:
    def __init__(self, cfg: ServeConfig, threads: int, on_step: Callable[[StepStats], None] | None = None):
        self.queue_capacity = cfg.queue_capacity
        self.max_batch_size = cfg.max_batch_size
        self._on_step = on_step
        ctx = mp.get_context("spawn")  # a clean interpreter: no forked torch threads or CUDA state
        self._commands_recv, self._commands = ctx.Pipe(duplex=False)
        self._outputs, outputs_send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=run_engine, args=(cfg, threads, self._commands_recv, outputs_send), name="fleetlm-engine", daemon=True
        )
        self._outputs_send = outputs_send
        self._streams: dict[str, asyncio.Queue[SequenceDelta | Exception]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sent = 0  # sequences sent to the engine
        self._received = 0  # ... and taken in by it, as of its last message
        self._waiting = 0
        self._running = 0
        self._dead: str | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> ModelInfo:
        """Start the engine process and wait until its model is loaded."""
        self._process.start()
        self._outputs_send.close()  # only the child writes; EOF then means the child is gone
        self._commands_recv.close()
        self._loop = asyncio.get_running_loop()
        try:
            msg = await self._loop.run_in_executor(None, self._outputs.recv)
        except EOFError as exc:
            raise ModelLoadError(f"the engine process exited (code {self._process.exitcode})") from exc
        if msg[0] == "failed":
            raise ModelLoadError(msg[1])
        self._loop.add_reader(self._outputs.fileno(), self._on_readable)
        return msg[1]

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._outputs.fileno())
        if self._process.is_alive():
            with contextlib.suppress(OSError):  # already gone
                self._commands.send(("stop",))
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout)

    @property
    def healthy(self) -> bool:
        return self._dead is None and not self._stopping and self._process.is_alive()

    # -- load ------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self._waiting + (self._sent - self._received)

    @property
    def num_running(self) -> int:
        return self._running

    def would_wait(self, sequences: int) -> int:
        """How many sequences would be queued if `sequences` more arrived now (free batch slots
        take new sequences at the next step, so they do not count as waiting)."""
        free_slots = max(0, self.max_batch_size - self._running)
        return max(0, self.num_waiting + sequences - free_slots)

    # -- requests --------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int = 1
    ) -> AsyncIterator[SequenceDelta]:
        """Yield deltas of all n choices until every choice has finished."""
        if not self.healthy:
            raise EngineStoppedError(self._dead or "the engine is not running")
        if self.would_wait(n) > self.queue_capacity:
            raise QueueFullError(f"{self.num_waiting} sequences are already waiting (capacity {self.queue_capacity})")
        queue: asyncio.Queue[SequenceDelta | Exception] = asyncio.Queue()
        self._streams[request_id] = queue
        self._sent += n
        self._commands.send(("add", request_id, prompt_token_ids, params, n))
        finished = 0
        try:
            while finished < n:
                pending: dict[int, SequenceDelta] = {}
                item = await queue.get()
                while True:
                    if isinstance(item, Exception):
                        raise item
                    pending[item.index] = merge_deltas(pending[item.index], item) if item.index in pending else item
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                for delta in pending.values():
                    if delta.finished:
                        finished += 1
                    yield delta
        finally:
            self._streams.pop(request_id, None)
            if finished < n and self.healthy:  # client went away, or an error: free its sequences now
                self._commands.send(("abort", request_id))

    # -- engine messages -------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            for _ in range(64):  # then yield to the event loop; the reader fires again while data waits
                if not self._outputs.poll():
                    break
                self._handle(self._outputs.recv())
        except (EOFError, OSError):
            self._engine_died()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            _, deltas, stats, received = msg
            for delta in deltas:
                queue = self._streams.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
        elif kind == "idle":
            _, stats, received = msg
        elif kind == "rejected":
            queue = self._streams.get(msg[1])
            if queue is not None:
                queue.put_nowait(ValueError(msg[2]))
            return
        else:
            return
        self._received = received
        self._waiting, self._running = stats.num_waiting, stats.num_running
        if self._on_step is not None:
            self._on_step(stats)

    def _engine_died(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._outputs.fileno())
        if self._stopping:
            return
        self._dead = f"the engine process exited unexpectedly (code {self._process.exitcode})"
        log.error(self._dead)
        for queue in self._streams.values():
            queue.put_nowait(EngineStoppedError(self._dead))
