"""A request's grammar compiled before it is admitted, in processes that are killed when a compile runs
out of time.

xgrammar's compile cannot be interrupted, and some schemas take minutes (an enum of a few thousand long
strings: compile time grows much faster than its size). Compiled on threads, a compile that ran out of
time kept its thread, a core and its memory until it ended: two such requests held both compile slots
for over ten minutes, every structured-output request meanwhile got a 503, and the API process grew
by gigabytes beside the engine. Here each slot is a process of its own (spawned on first use with the
tokenizer, then reused), and a compile that runs out of time is killed with its process: the slot is
free at once, its next process starts at once (off any request's path), and the grammar is remembered
as too slow.
Asking again is refused at once, and the engine, which compiles each admitted grammar again in its own
process, never meets it.

A request waits for a slot within its timeout (GrammarBusy if none came free: other grammars' doing,
not its own), then for its compile, which has that timeout of its own. Requests for a grammar already
waiting or compiling share that compile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from serving.engine.grammar import JSON_OBJECT, GrammarError, Grammars, GrammarSpec

log = logging.getLogger("fleetlm.api")

SLOTS = 2
REMEMBERED = 256  # grammars known to compile, and known to be too slow (each)
STARTUP_TIMEOUT_S = 120.0  # a compile process's start: imports, the tokenizer, its vocabulary's byte table


class GrammarBusy(Exception):
    """Every compile slot stayed busy (with other grammars) for the whole of a request's timeout, or no
    compile process could be started."""


@dataclass(frozen=True, slots=True)
class TokenizerSource:
    """What a compile process builds its grammars for: the served model's tokenizer (sent to it pickled)."""

    tokenizer: Any
    vocab_size: int
    stop_token_ids: tuple[int, ...]


def _serve(conn: Connection, source: TokenizerSource) -> None:
    """A compile process: answers each spec with None (compiled) or the library's reason for refusing it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it ends us (SIGTERM at exit)
    # Nothing kept: the API remembers which grammars compiled, and the engine compiles those it admits.
    grammars = Grammars(lambda: source.tokenizer, source.vocab_size, source.stop_token_ids, cache_bytes=0)
    grammars.compile(JSON_OBJECT)  # the tokenizer's tables are built now: a request's compile time is its own
    conn.send(None)
    while True:
        try:
            spec = conn.recv()
        except EOFError:  # the server is gone
            return
        try:
            grammars.compile(spec)
        except GrammarError as exc:
            conn.send(str(exc))
        else:
            conn.send(None)


class _Process:
    """One compile process and its end of the pipe; used by one compile at a time."""

    def __init__(self, source: TokenizerSource) -> None:
        ctx = mp.get_context("spawn")  # a clean interpreter: forking the API's threads would copy their locks
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, source), name="fleetlm-grammar-check", daemon=True)
        self.process.start()
        child.close()
        try:
            ready = self.conn.poll(STARTUP_TIMEOUT_S)
            if ready:
                self.conn.recv()
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise GrammarBusy(f"the grammar compiler process did not start (exit code {self.process.exitcode})")

    def compile(self, spec: GrammarSpec, timeout: float) -> BaseException | None:
        """None, or the exception for the requests that asked: GrammarError (refused, or it crashed the
        compiler) or TimeoutError (it ran `timeout` seconds; the process is killed)."""
        try:
            self.conn.send(spec)
            if not self.conn.poll(timeout):
                self.kill()
                return TimeoutError()
            answer = self.conn.recv()
        except (EOFError, OSError):  # it died under the grammar: out of memory, or the library crashed
            self.kill()
            return GrammarError(f"compiling it ended the grammar compiler (exit code {self.process.exitcode})")
        return None if answer is None else GrammarError(answer)

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()


class GrammarCheck:
    def __init__(self, source: Callable[[], TokenizerSource], slots: int = SLOTS) -> None:
        self._source = source  # called on a compile thread at a process's start: the model is loaded by then
        self._slots: asyncio.Semaphore | None = None  # made on the event loop, at first use
        self._size = slots
        self._idle: list[_Process] = []  # started, compiling nothing
        self._idle_lock = threading.Lock()
        self._compiled: OrderedDict[GrammarSpec, None] = OrderedDict()
        self._too_slow: OrderedDict[GrammarSpec, None] = OrderedDict()
        self._jobs: dict[GrammarSpec, _Job] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    async def compile(self, spec: GrammarSpec, timeout: float) -> None:
        """Returns once `spec` compiled; raises GrammarError (the library refused it), TimeoutError (its
        compile took more than `timeout` seconds) or GrammarBusy (no slot came free in that time)."""
        if spec in self._too_slow:
            self._too_slow.move_to_end(spec)
            raise TimeoutError
        if spec in self._compiled:
            self._compiled.move_to_end(spec)
            return
        job = self._jobs.get(spec)
        if job is None:
            loop = asyncio.get_running_loop()
            job = self._jobs[spec] = _Job(loop.create_future(), loop.create_future())
            task = asyncio.create_task(self._run(spec, job, timeout))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        job.waiting += 1
        try:
            try:
                await asyncio.wait_for(asyncio.shield(job.started), timeout)
            except TimeoutError:
                raise GrammarBusy from None
            outcome = await asyncio.shield(job.done)  # within its own timeout: the process is killed then
        finally:
            job.waiting -= 1
        if outcome is not None:
            raise outcome

    async def _run(self, spec: GrammarSpec, job: _Job, timeout: float) -> None:
        """Take a slot, then compile `spec` in a process (unless every request for it gave up while it
        waited); the slot is given back when the compile ends or is killed."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._size)
        async with self._slots:
            if job.waiting == 0:
                self._jobs.pop(spec, None)
                return
            job.started.set_result(None)
            loop = asyncio.get_running_loop()
            thread_done: asyncio.Future[BaseException | None] = loop.create_future()

            def work() -> None:
                try:
                    outcome = self._compile_in_a_process(spec, timeout)
                except BaseException as exc:  # noqa: BLE001 - handed to the requests that asked
                    outcome = exc
                with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone, nobody waits
                    loop.call_soon_threadsafe(_settle, thread_done, outcome)

            # A thread of its own: the API's worker threads, shared with every tokenizer and template
            # call, never wait behind a compile.
            threading.Thread(target=work, name="grammar-check", daemon=True).start()
            outcome = await thread_done
        self._jobs.pop(spec, None)
        if outcome is None:
            _remember(self._compiled, spec)
        elif isinstance(outcome, TimeoutError):
            _remember(self._too_slow, spec)
            log.warning("grammar compile ran out of time: killed, and refused from now on", extra={"timeout_s": timeout})
        job.done.set_result(outcome)

    def _compile_in_a_process(self, spec: GrammarSpec, timeout: float) -> BaseException | None:
        with self._idle_lock:
            process = self._idle.pop() if self._idle else None
        if process is None:
            process = _Process(self._source())
        outcome = process.compile(spec, timeout)
        if process.alive:
            self._keep(process)
        else:  # killed: its replacement starts now, not on the next compile's path
            threading.Thread(target=self._start_spare, name="grammar-check-start", daemon=True).start()
        return outcome

    def _start_spare(self) -> None:
        with contextlib.suppress(GrammarBusy):  # the next compile tries again, and answers for it
            self._keep(_Process(self._source()))

    def _keep(self, process: _Process) -> None:
        with self._idle_lock:
            keep = not self._closed and len(self._idle) < self._size
            if keep:
                self._idle.append(process)
        if not keep:
            process.kill()

    def close(self) -> None:
        """Stop the idle compile processes (one compiling is killed when its compile ends or runs out of time;
        all are daemons, ended with the server's process in any case)."""
        with self._idle_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for process in idle:
            process.kill()


def _settle(future: asyncio.Future, outcome: BaseException | None) -> None:
    if not future.done():
        future.set_result(outcome)


def _remember(known: OrderedDict[GrammarSpec, None], spec: GrammarSpec) -> None:
    known[spec] = None
    while len(known) > REMEMBERED:
        known.popitem(last=False)


@dataclass(slots=True)
class _Job:
    """One grammar's compile: whether it has a slot yet, its outcome, how many requests wait for it."""

    started: asyncio.Future[None]
    done: asyncio.Future[BaseException | None]
    waiting: int = 0
