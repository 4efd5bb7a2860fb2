"""A request's grammar compiled before it is admitted, without a slow one holding anything but grammars.

xgrammar's compile cannot be interrupted, and some schemas take minutes (an enum of a few thousand long
strings: compile time grows much faster than its size). Run on the API's shared worker threads, two such
compiles had left every tokenizer and template call queued behind them, so every generation request
hung, and the process could not exit on SIGTERM (its pool's threads are joined at exit). Here each
compile runs on its own daemon thread, at most SLOTS at a time; a request waits for a slot and its
compile within one timeout, then gets its 400 (its compile ran out of time) or 503 (no slot came free).
A compile that ran out of time keeps its slot until it ends, and its grammar is remembered as too slow:
asking again is refused at once, and the engine, which compiles each admitted grammar again in its own
process, never meets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from serving.engine.grammar import Grammars, GrammarSpec

SLOTS = 2
REMEMBERED = 256  # grammars known to be too slow


class GrammarBusy(Exception):
    """Every compile slot stayed busy (with other grammars) for the whole of a request's timeout."""


class GrammarCheck:
    def __init__(self, grammars: Callable[[], Grammars], slots: int = SLOTS) -> None:
        self._grammars = grammars
        self._slots: asyncio.Semaphore | None = None  # made on the event loop, at first use
        self._size = slots
        self._too_slow: OrderedDict[GrammarSpec, None] = OrderedDict()
        self._jobs: dict[GrammarSpec, _Job] = {}
        self._tasks: set[asyncio.Task] = set()

    async def compile(self, spec: GrammarSpec, timeout: float) -> None:
        """Returns once `spec` compiled; raises GrammarError (the library refused it), TimeoutError (its
        compile took more than `timeout` seconds) or GrammarBusy (no slot came free in that time).
        Requests for a grammar already waiting or compiling wait for that compile rather than start another."""
        if spec in self._too_slow:
            self._too_slow.move_to_end(spec)
            raise TimeoutError
        grammars = self._grammars()
        if grammars.cached(spec):
            return
        job = self._jobs.get(spec)
        if job is None:
            job = self._jobs[spec] = _Job(asyncio.get_running_loop().create_future())
            task = asyncio.create_task(self._run(grammars, spec, job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        job.waiting += 1
        try:
            outcome = await asyncio.wait_for(asyncio.shield(job.done), timeout)
        except TimeoutError:
            if not job.started:  # the wait for a slot ran out of time: the grammar is not to blame
                raise GrammarBusy from None
            self._too_slow[spec] = None
            while len(self._too_slow) > REMEMBERED:
                self._too_slow.popitem(last=False)
            raise
        finally:
            job.waiting -= 1
        if outcome is not None:
            raise outcome

    async def _run(self, grammars: Grammars, spec: GrammarSpec, job: _Job) -> None:
        """Take a slot, then compile `spec` on a thread of its own (unless every request for it gave up
        while it waited); the job settles with None or the compile's exception, and the slot is given
        back, when the compile ends."""
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._size)
        slots = self._slots
        await slots.acquire()

        def settle(outcome: BaseException | None) -> None:
            slots.release()
            self._jobs.pop(spec, None)
            if not job.done.done():
                job.done.set_result(outcome)

        if job.waiting == 0:
            settle(TimeoutError())
            return
        job.started = True

        def work() -> None:
            outcome: BaseException | None = None
            try:
                grammars.compile(spec)
            except BaseException as exc:  # noqa: BLE001 - handed to the requests that asked
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone, nobody waits
                loop.call_soon_threadsafe(settle, outcome)

        threading.Thread(target=work, name="grammar-check", daemon=True).start()


@dataclass(slots=True)
class _Job:
    """One grammar's compile: its outcome, how many requests wait for it, whether it has a slot yet."""

    done: asyncio.Future[BaseException | None]
    waiting: int = 0
    started: bool = False
