"""serving/api/grammar_check.py: a grammar that compiles too slowly is killed with its process when its
time runs out, frees its slot at once, and is refused at once when asked again; one that the library
refuses is a GrammarError; while every slot is busy, others are told so (GrammarBusy).

Real compiles in real processes, with the demo model's tokenizer: an enum of 5000 200-character strings
takes xgrammar some 24 s on this VM (and 280 MB), and is killed after 1 s."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import serving
from serving.api.grammar_check import GrammarBusy, GrammarCheck, TokenizerSource
from serving.engine.grammar import JSON_OBJECT, GrammarError, Grammars, json_schema_spec

DEMO = Path(serving.__file__).parent / "demo" / "stories260k"
SLOW = json_schema_spec({"enum": [f"e{i:05d}" + "z" * 200 for i in range(5000)]})


@pytest.fixture(scope="module")
def source() -> TokenizerSource:
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    return TokenizerSource(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))


def compile_processes() -> list[mp.Process]:
    return [p for p in mp.active_children() if p.name == "fleetlm-grammar-check"]


def test_a_compile_out_of_time_is_killed_frees_its_slot_and_is_then_refused_at_once(source) -> None:
    check = GrammarCheck(lambda: source, slots=1)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        await check.compile(JSON_OBJECT, timeout=5)
        (first,) = compile_processes()
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        started = loop.time()
        with pytest.raises(TimeoutError):
            await check.compile(SLOW, timeout=1.0)
        took = loop.time() - started
        ticker.cancel()
        assert 1.0 <= took < 5.0, took  # its own timeout, not the compile's 24 s
        assert ticks > 20, "the event loop turned while the compile ran"
        assert not first.is_alive(), "the runaway compile's process was killed"
        # Its replacement starts at once, off any request's path.
        deadline = loop.time() + 60
        while not (spares := compile_processes()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert len(spares) == 1 and spares[0].pid != first.pid
        # The one slot is free: another grammar compiles; a refused one is a GrammarError naming the problem.
        await check.compile(("regex", "[ab]+c"), timeout=5)
        with pytest.raises(GrammarError):
            await check.compile(("regex", "["), timeout=5)
        # Asked again, the slow one is refused at once, without a compile.
        started = loop.time()
        with pytest.raises(TimeoutError):
            await check.compile(SLOW, timeout=5)
        assert loop.time() - started < 0.1
        await check.compile(("regex", "[ab]+c"), timeout=0)  # compiled before: no slot, no wait

    try:
        asyncio.run(scenario())
    finally:
        check.close()
    # Every process ends: idle ones at once, one still starting once it has started.
    deadline = time.monotonic() + 60
    while compile_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert compile_processes() == []


def test_one_grammar_asked_many_times_compiles_once_while_others_wait_for_a_slot(source) -> None:
    check = GrammarCheck(lambda: source, slots=1)

    async def scenario() -> None:
        await check.compile(JSON_OBJECT, timeout=5)  # the process is started: the rest is compile time
        same = [asyncio.create_task(check.compile(SLOW, timeout=1.5)) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert len(compile_processes()) == 1, "the three requests share one compile"
        # The one slot is held by the slow compile for this request's whole timeout: busy, not too slow
        # (it never started), and not remembered as anything.
        with pytest.raises(GrammarBusy):
            await check.compile(("regex", "x+"), timeout=0.3)
        for task in same:
            with pytest.raises(TimeoutError):
                await task
        await check.compile(("regex", "x+"), timeout=5)

    try:
        asyncio.run(scenario())
    finally:
        check.close()


def test_a_process_that_cannot_start_is_a_busy_compiler_not_the_requests_fault() -> None:
    check = GrammarCheck(lambda: TokenizerSource(object(), 512, ()), slots=1)  # no tokenizer to build tables from
    before = {p.pid for p in compile_processes()}  # (another test's last process may still be ending)

    async def scenario() -> None:
        with pytest.raises(GrammarBusy, match="did not start"):
            await check.compile(("regex", "x+"), timeout=5)

    asyncio.run(scenario())
    assert {p.pid for p in compile_processes()} <= before



def test_compiled_grammars_are_kept_within_a_byte_budget(source) -> None:
    """The engine's cache is bounded by what its grammars take, not by their number: an enum of a few
    hundred long strings takes some 100 MB, and each new one was kept (twice: xgrammar's compiler has an
    unbounded cache of its own, now off)."""
    small = json_schema_spec({"type": "object", "properties": {"a": {"type": "integer"}}})
    big = json_schema_spec({"enum": [f"e{i:04d}" + "z" * 50 for i in range(100)]})
    sizes = {}
    probe = Grammars(lambda: source.tokenizer, source.vocab_size, source.stop_token_ids)
    for spec in (small, big):
        sizes[spec] = probe.compile(spec).memory_size_bytes
    assert sizes[big] > 2 * sizes[small] > 0
    grammars = Grammars(lambda: source.tokenizer, source.vocab_size, source.stop_token_ids, cache_bytes=sizes[big])
    grammars.compile(small)
    assert grammars.cached(small)
    grammars.compile(big)  # together over the budget: the older one goes
    assert grammars.cached(big) and not grammars.cached(small)
    grammars.compile(small)
    assert grammars.cached(small) and not grammars.cached(big)
    none = Grammars(lambda: source.tokenizer, source.vocab_size, source.stop_token_ids, cache_bytes=0)
    none.compile(small)  # (what the check processes use: the API keeps only the verdict)
    assert not none.cached(small)
