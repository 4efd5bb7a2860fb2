"""The asyncio face of the engine: a client of the engine process, streams per request.

Requests and aborts go to the engine process over one pipe; each step's token outputs come back
over another, read by the event loop itself (add_reader, no thread), and become text here
(output_processor.py), off the engine's step loop. A client that goes away aborts its request,
which frees its KV blocks before the engine's next step. Outputs that pile up behind a slow
consumer are merged, so a busy event loop sends fewer, larger SSE chunks instead of falling
further behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from serving.config import ServeConfig
from serving.engine.detokenizer import Decoder, fast_decoder
from serving.engine.output_processor import ChoiceDelta, ChoiceText
from serving.engine.protocol import (
    AbortRequest,
    AdapterLoaded,
    AddRequest,
    Idle,
    LoadAdapter,
    LoadFailed,
    ModelInfo,
    Ready,
    Rejected,
    RequestRejected,
    SequenceOutput,
    Shutdown,
    StepOutputs,
    StepStats,
    UnloadAdapter,
    merge_outputs,
)
from serving.engine.sampling_params import SamplingParams

log = logging.getLogger("fleetlm.engine")


class QueueFullError(Exception):
    """More requests are waiting than the queue may hold."""


class EngineStoppedError(Exception):
    """The engine is shut down (or died) and takes no more requests."""

    def __init__(self, message: str, code: str = "engine_stopped"):
        super().__init__(message)
        self.code = code


class EngineInternalError(Exception):
    """The engine failed to take a request through no fault of the request's."""


def _engine_main(cfg: ServeConfig, commands, outputs) -> None:
    """The engine process's entry. Its module (torch, the model code) is imported there, not here: the
    API process can start the engine before it has imported any of that itself, and both import at once."""
    # The API process owns shutdown: Ctrl-C and SIGTERM reach the whole process group, and the engine keeps
    # stepping while the API drains in-flight requests (or, while loading, is stopped by it). Usually
    # ignored already (_shutdown_signals_ignored); not when started from another thread.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    from serving.engine.engine_process import run_engine

    run_engine(cfg, commands, outputs)


@contextlib.contextmanager
def _shutdown_signals_ignored():
    """SIGINT and SIGTERM ignored while the engine process is started (from the main thread, where signal
    dispositions can be set): an ignored signal stays ignored across exec, so the new interpreter ignores
    them from its first instruction (a Ctrl-C as it imports its first modules printed their traceback), and
    the API process's own handlers are back once it is started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this process when the API process dies, however it dies (SIGKILL, the
    OOM killer). A running engine notices the closed pipe at its next step; one still loading a model (a
    download, minutes of reading weights) would otherwise go on, holding its memory, for nobody."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the API process died before the call above


class ModelLoadError(Exception):
    """The engine process could not load the model."""


# Engine outputs one request may have waiting for its reader (one per sequence and step). A client
# that stops reading would otherwise pin all it asked for (n=16 x 480 tokens with logprobs: ~6 MB);
# past this the request is aborted and its memory freed. A reader that keeps up holds a handful.
MAX_UNREAD_OUTPUTS = 2048


class SlowReaderError(Exception):
    """The client stopped reading: its request was aborted to bound what one connection holds."""


class AsyncEngine:
    def __init__(
        self,
        cfg: ServeConfig,
        on_step: Callable[[StepStats], None] | None = None,
        on_slow_reader: Callable[[], None] | None = None,
        max_unread_outputs: int = MAX_UNREAD_OUTPUTS,
        on_death: Callable[[str], None] | None = None,
    ):
        self.queue_capacity = cfg.queue_capacity
        self.max_batch_size = cfg.max_batch_size
        self._on_step = on_step
        self._on_slow_reader = on_slow_reader
        self._on_death = on_death  # called with the reason when the engine process dies unasked
        self._ready = False  # the model is loaded and the engine steps
        self._max_unread = max_unread_outputs
        self._unread_limit: dict[str, int] = {}
        ctx = mp.get_context("spawn")  # a clean interpreter: no forked torch threads or CUDA state
        self._commands_recv, self._commands = ctx.Pipe(duplex=False)
        self._outputs, outputs_send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_engine_main, args=(cfg, self._commands_recv, outputs_send), name="fleetlm-engine", daemon=True
        )
        self._outputs_send = outputs_send
        self._streams: dict[str, asyncio.Queue[SequenceOutput | Exception]] = {}
        self._tokenizer: Decoder | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sent = 0  # sequences sent to the engine
        self._received = 0  # ... and taken in by it, as of its last message
        self._waiting = 0
        self._running = 0
        self._dead: str | None = None
        self._stopping = False
        self._adapter_loads: dict[str, asyncio.Future[AdapterLoaded]] = {}

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The engine process's id, once started."""
        return self._process.pid

    def launch(self) -> None:
        """Start the engine process, which begins loading the model (`start` waits for it). Called as early
        as the process starts, the engine's imports and load overlap the API's own."""
        if self._process.pid is not None:
            return
        with _shutdown_signals_ignored():
            self._process.start()
        self._outputs_send.close()  # only the child writes; EOF then means the child is gone
        self._commands_recv.close()

    def kill(self) -> None:
        """Kill the engine process at once (from a signal handler: nothing is waited for)."""
        if self._process.pid is not None and self._process.exitcode is None:
            with contextlib.suppress(OSError):
                os.kill(self._process.pid, signal.SIGKILL)

    def observe(
        self,
        on_step: Callable[[StepStats], None] | None,
        on_slow_reader: Callable[[], None] | None,
        on_death: Callable[[str], None] | None,
    ) -> None:
        """Set the callbacks of an engine created before its observers (see __init__)."""
        self._on_step, self._on_slow_reader, self._on_death = on_step, on_slow_reader, on_death

    async def start(self) -> ModelInfo:
        """Start the engine process (unless launched already) and wait until its model is loaded."""
        self.launch()
        self._loop = asyncio.get_running_loop()
        try:
            msg = await self._loop.run_in_executor(None, self._outputs.recv)
        except EOFError as exc:
            raise ModelLoadError(f"the engine process exited (code {self._process.exitcode})") from exc
        if isinstance(msg, LoadFailed):
            raise ModelLoadError(msg.message)
        assert isinstance(msg, Ready)
        self._ready = True
        self._loop.add_reader(self._outputs.fileno(), self._on_readable)
        return msg.info

    def set_tokenizer(self, tokenizer: Decoder) -> None:
        """The tokenizer that turns this engine's tokens into text (loaded once the model is known)."""
        self._tokenizer = fast_decoder(tokenizer)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._outputs.fileno())
        if self._process.is_alive():
            if self._ready:  # a loading engine reads no commands: nothing of it is worth waiting for
                with contextlib.suppress(OSError):  # already gone
                    self._commands.send(Shutdown())
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
    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int = 1) -> EngineStream:
        """Send the request's n sequences to the engine now, or raise QueueFullError (EngineStoppedError):
        from this call on they count as waiting, read or not, so a check of the queue and the sequences it
        lets in are one step (nothing else is admitted in between). Read the text deltas from the stream;
        close it (its reader's `finally` does) to abort what is unfinished."""
        if not self.healthy:
            raise EngineStoppedError(self._dead or "the engine is not running")
        if self.would_wait(n) > self.queue_capacity:
            raise QueueFullError(f"{self.num_waiting} sequences are already waiting (capacity {self.queue_capacity})")
        assert self._tokenizer is not None, "set_tokenizer() before submit()"
        queue: asyncio.Queue[SequenceOutput | Exception] = asyncio.Queue()
        self._streams[request_id] = queue
        # A reader that keeps up can still find a burst waiting: up to 64 engine messages are handled
        # per wake-up (_on_readable), each with an output per choice.
        self._unread_limit[request_id] = max(self._max_unread, 2 * 64 * n)
        self._sent += n
        self._commands.send(AddRequest(request_id, list(prompt_token_ids), params, n))
        choices = [ChoiceText(self._tokenizer, prompt_token_ids, params.stop) for _ in range(n)]
        return EngineStream(self, request_id, queue, choices)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int = 1
    ) -> AsyncIterator[ChoiceDelta]:
        """Yield text deltas of all n choices until every choice has finished (submit, then read)."""
        stream = self.submit(request_id, prompt_token_ids, params, n)
        async with aclosing(stream.deltas()) as deltas:
            async for delta in deltas:
                yield delta

    async def load_adapter(self, adapter_id: int, directory: str, name: str) -> int:
        """Have the engine serve the LoRA adapter in `directory` under adapter_id; its rank. RequestRejected
        says why it cannot be (another model's adapter, say)."""
        if not self.healthy:
            raise EngineStoppedError(self._dead or "the engine is not running")
        assert self._loop is not None
        request_id = f"lora-{adapter_id}"
        reply = self._adapter_loads[request_id] = self._loop.create_future()
        try:
            self._commands.send(LoadAdapter(request_id, adapter_id, directory, name))
            loaded = await reply
        finally:
            self._adapter_loads.pop(request_id, None)
        if loaded.error is not None:
            raise RequestRejected(loaded.error)
        return loaded.rank

    def unload_adapter(self, adapter_id: int) -> None:
        """The engine drops the adapter once its sequences in flight have finished."""
        if self.healthy:
            self._commands.send(UnloadAdapter(adapter_id))

    def _abort(self, request_id: str, indices: tuple[int, ...] | None = None) -> None:
        self._commands.send(AbortRequest(request_id) if indices is None else AbortRequest(request_id, indices))

    # -- engine messages -------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            for _ in range(64):  # then yield to the event loop; the reader fires again while data waits
                if not self._outputs.poll():
                    break
                self._handle(self._outputs.recv())
        except (EOFError, OSError):
            self._engine_died()

    def _handle(self, msg: StepOutputs | Idle | Rejected | AdapterLoaded) -> None:
        if isinstance(msg, AdapterLoaded):
            reply = self._adapter_loads.get(msg.request_id)
            if reply is not None and not reply.done():
                reply.set_result(msg)
            return
        if isinstance(msg, Rejected):
            queue = self._streams.get(msg.request_id)
            if queue is not None:
                error = RequestRejected(msg.message) if msg.client_error else EngineInternalError(msg.message)
                queue.put_nowait(error)
            return
        if isinstance(msg, StepOutputs):
            for out in msg.outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                    if queue.qsize() > self._unread_limit.get(out.request_id, self._max_unread):
                        self._drop_slow_reader(out.request_id, queue)
        self._received = msg.received
        self._waiting, self._running = msg.stats.num_waiting, msg.stats.num_running
        if self._on_step is not None:
            self._on_step(msg.stats)

    def _drop_slow_reader(self, request_id: str, queue: asyncio.Queue[SequenceOutput | Exception]) -> None:
        """Free what a request's reader left unread and stop its sequences; the reader, if it ever
        reads again, gets SlowReaderError."""
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(SlowReaderError(f"the client read too slowly: more than {self._max_unread} outputs were left unread"))
        del self._streams[request_id]  # later outputs of its sequences are dropped
        self._commands.send(AbortRequest(request_id))
        log.warning("aborted a request whose client stopped reading", extra={"request_id": request_id})
        if self._on_slow_reader is not None:
            self._on_slow_reader()

    def cancel_all(self, message: str, code: str) -> int:
        """End every request in flight with EngineStoppedError(message, code) (their sequences are
        aborted as their generators close); returns how many there were."""
        for queue in self._streams.values():
            queue.put_nowait(EngineStoppedError(message, code))
        return len(self._streams)

    def _engine_died(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._outputs.fileno())
        if self._stopping:
            return
        self._dead = f"the engine process exited unexpectedly (code {self._process.exitcode})"
        log.error(self._dead)
        for queue in self._streams.values():
            queue.put_nowait(EngineStoppedError(self._dead))
        for reply in self._adapter_loads.values():
            if not reply.done():
                reply.set_exception(EngineStoppedError(self._dead))
        if self._on_death is not None:
            self._on_death(self._dead)


class EngineStream:
    """One submitted request's outputs, as text deltas of its n choices."""

    def __init__(
        self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue[SequenceOutput | Exception], choices: list[ChoiceText]
    ):
        self._engine = engine
        self.request_id = request_id
        self._queue = queue
        self._choices = choices
        self._done_in_engine: set[int] = set()  # finished there, or told to abort
        self._closed = False

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Text deltas until every choice has finished; closing this generator closes the stream."""
        n, queue, choices, done_in_engine = len(self._choices), self._queue, self._choices, self._done_in_engine
        finished = 0
        try:
            while finished < n:
                pending: dict[int, SequenceOutput] = {}
                item = await queue.get()
                while True:
                    if isinstance(item, Exception):
                        raise item
                    pending[item.index] = merge_outputs(pending[item.index], item) if item.index in pending else item
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                deltas: list[ChoiceDelta] = []
                aborts: list[int] = []
                for out in pending.values():
                    choice = choices[out.index]
                    delta = choice.process(out)
                    if out.finished:
                        done_in_engine.add(out.index)
                    if delta is None:
                        continue
                    if choice.needs_abort and out.index not in done_in_engine:
                        aborts.append(out.index)
                        done_in_engine.add(out.index)
                    deltas.append(delta)
                if aborts:  # before yielding: the client may take its time with the deltas
                    self._engine._abort(self.request_id, tuple(aborts))
                for delta in deltas:
                    if delta.finished:
                        finished += 1
                    yield delta
        finally:
            self.close()

    def close(self) -> None:
        """Stop reading: what has not finished in the engine is aborted (client gone, or an error), which
        frees its KV blocks before the next step. Idempotent."""
        if self._closed:
            return
        self._closed = True
        engine = self._engine
        engine._streams.pop(self.request_id, None)
        engine._unread_limit.pop(self.request_id, None)
        if len(self._done_in_engine) < len(self._choices) and engine.healthy:
            engine._abort(self.request_id)
