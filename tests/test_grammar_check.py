"""serving/api/grammar_check.py: a grammar that compiles too slowly holds a compile slot, never the API's
shared worker threads, and is refused at once when asked again.

xgrammar cannot be made slow on demand without burning CPU for minutes (a few thousand long enum values),
so the compile here waits on an event instead: the stand-in for the library's uninterruptible work."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.api.grammar_check import GrammarBusy, GrammarCheck
from serving.engine.grammar import GrammarError


class SlowGrammars:
    """Grammars' two calls that GrammarCheck makes; a spec named 'slow:...' compiles once `release` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.compiled: list[tuple[str, str]] = []

    def cached(self, spec) -> bool:
        return spec in self.compiled

    def compile(self, spec):
        if spec[1].startswith("slow"):
            self.release.wait(30)
        if spec[1] == "bad":
            raise GrammarError("not a grammar")
        self.compiled.append(spec)
        return object()


def test_a_slow_compile_times_out_keeps_its_slot_and_is_then_refused_at_once() -> None:
    grammars = SlowGrammars()
    check = GrammarCheck(lambda: grammars, slots=2)

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            await check.compile(("regex", "slow-1"), timeout=0.2)
        # Refused again at once, even after it finished: the engine would compile it again for minutes.
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await check.compile(("regex", "slow-1"), timeout=5)
        assert loop.time() - started < 0.1
        # One slot is still held by the runaway compile; the other serves, errors included.
        await check.compile(("regex", "fine"), timeout=1)
        with pytest.raises(GrammarError, match="not a grammar"):
            await check.compile(("regex", "bad"), timeout=1)
        # A second runaway takes the last slot: the next grammar waits, within its own timeout, and is told
        # the compiler is busy (not that it is too slow: it never started), and is not remembered.
        with pytest.raises(TimeoutError):
            await check.compile(("regex", "slow-2"), timeout=0.2)
        with pytest.raises(GrammarBusy):
            await check.compile(("regex", "fine-2"), timeout=0.2)
        grammars.release.set()  # the runaways end: their slots come back
        await check.compile(("regex", "fine-2"), timeout=5)
        assert ("regex", "fine-2") in grammars.compiled
        await check.compile(("regex", "fine"), timeout=0)  # cached: no slot, no thread, no wait

    asyncio.run(scenario())


def test_the_compile_threads_do_not_hold_up_the_event_loop_or_exit() -> None:
    grammars = SlowGrammars()
    check = GrammarCheck(lambda: grammars, slots=1)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        slow = asyncio.create_task(check.compile(("regex", "slow"), timeout=0.5))
        started = loop.time()
        await asyncio.sleep(0.05)  # the loop keeps turning while the compile runs
        ticked = loop.time() - started
        with pytest.raises(TimeoutError):
            await slow
        return ticked

    assert asyncio.run(scenario()) < 0.4
    worker = next(t for t in threading.enumerate() if t.name == "grammar-check")
    assert worker.daemon  # a runaway compile cannot keep the process from exiting
    grammars.release.set()
    worker.join(5)


def test_requests_for_a_grammar_already_compiling_share_that_compile() -> None:
    """Two requests with one slow schema must not take both slots (leaving no room for any other grammar)."""
    grammars = SlowGrammars()
    check = GrammarCheck(lambda: grammars, slots=2)

    async def scenario() -> None:
        same = [asyncio.create_task(check.compile(("regex", "slow"), timeout=0.3)) for _ in range(3)]
        await asyncio.sleep(0.05)
        await check.compile(("regex", "other"), timeout=1)  # a slot is free: the three share one
        for task in same:
            with pytest.raises(TimeoutError):
                await task
        assert sum(t.name == "grammar-check" for t in threading.enumerate()) == 1

    asyncio.run(scenario())
    grammars.release.set()
