"""A client that stops reading cannot pin unbounded memory: past MAX_UNREAD_OUTPUTS unread engine
outputs its request is aborted, its sequences freed, and the other requests carry on."""

from __future__ import annotations

import asyncio
import time

import pytest
from transformers import AutoTokenizer

from serving.config import ServeConfig
from serving.engine.async_engine import AsyncEngine, SlowReaderError
from serving.engine.sampling_params import SamplingParams
from serving.models.source import demo_model_dir


async def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.01)


async def test_a_reader_that_stops_reading_is_aborted_and_its_sequences_freed():
    dropped: list[int] = []
    engine = AsyncEngine(ServeConfig(device="cpu"), on_slow_reader=lambda: dropped.append(1), max_unread_outputs=64)
    await engine.start()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    engine.set_tokenizer(tokenizer)
    try:
        prompt = tokenizer("Once upon a time").input_ids
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        stalled = engine.generate("stalled", prompt, params, n=4)  # 1,600 outputs if it were read
        await stalled.__anext__()  # ... then the reader stops
        await _wait_for(lambda: dropped, "the stalled request to be dropped")
        await _wait_for(lambda: engine.num_running == 0, "its sequences to be freed")
        with pytest.raises(SlowReaderError):
            async for _ in stalled:
                pass
        # A reader that keeps up is untouched, however long its output.
        texts = [d.text async for d in engine.generate("reader", prompt, params, n=4)]
        assert sum(len(t) for t in texts) > 0 and dropped == [1]
    finally:
        engine.stop()
