"""The engine's own process: loads the model, runs the step loop, talks to the API over pipes.

Running the step loop in a separate process rather than a thread keeps the model's Python work
and the HTTP layer's off each other's GIL: measured on the 2-core CPU, the thread version lost
most of its batching gain to GIL hand-offs between the two (README.md, Benchmarks).

Messages to the engine: ("add", request_id, prompt_token_ids, params, n), ("abort", request_id),
("stop",). From the engine: ("ready", ModelInfo) or ("failed", message) once, then
("step", deltas, stats, sequences_received) after steps and ("idle", stats, received) when it
runs out of work, and ("rejected", request_id, message) for a request it cannot take.

The engine never waits for a busy API process: while the pipe is full it keeps stepping and
sends the deltas of several steps as one message, merged per sequence (fewer, larger SSE chunks
exactly when the HTTP side cannot keep up). Measured on 2 cores, blocking sends had cost the
engine a fifth of its time.
"""


from __future__ import annotations

import dataclasses
import logging
import select
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from serving.config import ServeConfig
from serving.cpus import engine_cpus, pin_process
from serving.engine.llm_engine import SequenceDelta, coalesce
from serving.logs import setup_logging

log = logging.getLogger("fleetlm.engine")

# Send anyway (blocking) once this many steps are held back, to bound memory and staleness.
_MAX_HELD_STEPS = 64


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """What the API process needs to know about the loaded model."""

    name: str
    max_model_len: int
    vocab_size: int
    architecture: str
    device: str
    dtype: str
    directory: str  # where config and tokenizer files are (after any download)
    gguf_file: str | None
    engine_cpus: tuple[int, ...] = ()  # cores the engine pinned itself to (serving/cpus.py); () if none


def run_engine(cfg: ServeConfig, threads: int, commands: Connection, outputs: Connection) -> None:
    # The API process owns shutdown: Ctrl-C and SIGTERM reach the whole process group, and the
    # engine must keep stepping while the API drains in-flight requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(cfg.log_level)
    torch.set_num_threads(threads)
    from serving.models.loader import load  # heavy imports stay in this process

    try:
        loaded = load(cfg)
    except Exception as exc:
        log.exception("model failed to load")
        outputs.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    info = loaded.info
    if cfg.cpu_affinity == "auto" and info.device == "cpu":
        cpus = engine_cpus(threads)
        if cpus:
            pin_process(cpus)  # torch's worker threads, started while loading, included
            info = dataclasses.replace(info, engine_cpus=cpus)
    outputs.send(("ready", info))
    engine = loaded.engine
    received = 0
    held: list[SequenceDelta] = []
    held_steps = 0
    while True:
        if not engine.has_work:
            if held:
                outputs.send(("step", coalesce(held), engine.last_stats, received))
                held, held_steps = [], 0
            outputs.send(("idle", engine.idle_stats(), received))
            commands.poll(None)  # sleep until the API sends something
        while commands.poll():
            try:
                msg = commands.recv()
            except EOFError:
                return  # the API process is gone
            if msg[0] == "stop":
                return
            if msg[0] == "abort":
                engine.abort_request(msg[1])
                continue
            _, request_id, prompt_ids, params, n = msg
            received += n
            try:
                engine.add_request(request_id, prompt_ids, params, n)
            except ValueError as exc:
                outputs.send(("rejected", request_id, str(exc)))
        if engine.has_work:
            held.extend(engine.step())
            held_steps += 1
            if held_steps >= _MAX_HELD_STEPS or _writable(outputs):
                outputs.send(("step", coalesce(held) if held_steps > 1 else held, engine.last_stats, received))
                held, held_steps = [], 0


def _writable(conn: Connection) -> bool:
    return bool(select.select([], [conn.fileno()], [], 0)[1])
