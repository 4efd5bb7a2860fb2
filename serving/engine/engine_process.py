"""The engine's own process: builds the engine, runs the step loop, talks to the API over pipes
(the messages are in protocol.py).

Running the step loop in a separate process rather than a thread keeps the model's Python work
and the HTTP layer's off each other's GIL: measured on the 2-core CPU, the thread version lost
most of its batching gain to GIL hand-offs between the two (README.md, Benchmarks).

The engine never waits for a busy API process: while the pipe is full it keeps stepping and
sends the outputs of several steps as one message, merged per sequence (fewer, larger SSE chunks
exactly when the HTTP side cannot keep up). Measured on 2 cores, blocking sends had cost the
engine a fifth of its time.
"""

from __future__ import annotations

import dataclasses
import logging
import select
import sys
from multiprocessing.connection import Connection

import torch

from serving.config import ServeConfig
from serving.cpus import COMPUTE_BOUND_WEIGHT_BYTES, default_threads, engine_cpus, pin_process
from serving.engine.llm_engine import DeviceLost, LLMEngine, check_device
from serving.engine.protocol import (
    AbortRequest,
    AdapterLoaded,
    AddRequest,
    Idle,
    LoadAdapter,
    LoadFailed,
    Ready,
    Rejected,
    RequestRejected,
    SequenceOutput,
    Shutdown,
    StepOutputs,
    UnloadAdapter,
    coalesce,
)
from serving.heap import freeze_startup_heap
from serving.logs import setup_logging
from serving.models.lora import AdapterError

log = logging.getLogger("fleetlm.engine")

# The engine's exit status when the accelerator failed (DeviceLost), told apart from a crash (1).
EXIT_DEVICE_LOST = 3

# Send anyway (blocking) once this many steps are held back, to bound memory and staleness.
_MAX_HELD_STEPS = 64


def run_engine(cfg: ServeConfig, commands: Connection, outputs: Connection) -> None:
    # SIGINT and SIGTERM are ignored here (async_engine._engine_main): the API process owns shutdown.
    setup_logging(cfg.log_level)
    # Loading uses every core (reading and packing weights); the step's threads are chosen after it.
    torch.set_num_threads(cfg.num_threads or default_threads(COMPUTE_BOUND_WEIGHT_BYTES, cfg.cpus))
    from serving.engine.builder import build_engine  # heavy imports stay in this process

    try:
        built = build_engine(cfg)
    except Exception as exc:
        # One line for the operator (the API process logs it too, then exits non-zero); the
        # traceback only at debug.
        log.debug("model failed to load", exc_info=True)
        outputs.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        return
    info = built.info
    threads = cfg.num_threads or default_threads(built.model.weight_bytes if info.device == "cpu" else None, cfg.cpus)
    torch.set_num_threads(threads)  # the C kernels' pool follows (models/cpu_qmm.py)
    info = dataclasses.replace(info, engine_threads=threads)
    if cfg.cpu_affinity == "auto" and info.device == "cpu":
        cpus = engine_cpus(threads)
        if cpus:
            pin_process(cpus)  # torch's worker threads, started while loading, included
            info = dataclasses.replace(info, engine_cpus=cpus)
    log.info(
        "engine threads",
        extra={
            "threads": threads,
            "chosen": "--num-threads" if cfg.num_threads else "from the model's size and the usable cores",
            "weight_bytes": built.model.weight_bytes,
            "pinned_cpus": list(info.engine_cpus),
        },
    )
    freeze_startup_heap()
    outputs.send(Ready(info))
    try:
        _serve(built.engine, commands, outputs)
    except DeviceLost as exc:
        # Every request from now on would fail the same way: exit, and the API process exits after it
        # (the container restarts on a fresh CUDA context).
        log.critical("the accelerator failed: the engine stops", extra={"error": str(exc)})
        sys.exit(EXIT_DEVICE_LOST)


def _serve(engine: LLMEngine, commands: Connection, outputs: Connection) -> None:
    received = 0
    held: list[SequenceOutput] = []
    held_steps = 0
    while True:
        if not engine.has_work:
            if held:
                assert engine.last_stats is not None
                outputs.send(StepOutputs(coalesce(held), engine.last_stats, received))
                held, held_steps = [], 0
            outputs.send(Idle(engine.idle_stats(), received))
            commands.poll(None)  # sleep until the API sends something
        while commands.poll():
            try:
                msg = commands.recv()
            except EOFError:
                return  # the API process is gone
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, AbortRequest):
                engine.abort_request(msg.request_id, msg.indices)
            elif isinstance(msg, LoadAdapter):
                outputs.send(_load_adapter(engine, msg))
            elif isinstance(msg, UnloadAdapter):
                engine.unload_adapter(msg.adapter_id)
            elif isinstance(msg, AddRequest):
                received += msg.n
                try:
                    engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params, msg.n)
                except RequestRejected as exc:
                    outputs.send(Rejected(msg.request_id, str(exc), client_error=True))
                except Exception as exc:  # an engine bug must not take the engine down with it
                    check_device(exc)
                    log.exception("adding a request failed", extra={"request_id": msg.request_id})
                    outputs.send(Rejected(msg.request_id, f"{type(exc).__name__}", client_error=False))
        if engine.has_work:
            held.extend(engine.step())
            held_steps += 1
            if held_steps >= _MAX_HELD_STEPS or _writable(outputs):
                assert engine.last_stats is not None
                outputs.send(StepOutputs(coalesce(held) if held_steps > 1 else held, engine.last_stats, received))
                held, held_steps = [], 0


def _load_adapter(engine: LLMEngine, msg: LoadAdapter) -> AdapterLoaded:
    try:
        return AdapterLoaded(msg.request_id, engine.load_adapter(msg.adapter_id, msg.directory, msg.name))
    except AdapterError as exc:
        return AdapterLoaded(msg.request_id, 0, str(exc))
    except Exception as exc:  # unreadable files and the like: the adapter's fault, and the engine goes on
        check_device(exc)
        log.warning("loading a LoRA adapter failed", exc_info=True)
        return AdapterLoaded(msg.request_id, 0, f"{type(exc).__name__}: {exc}")


def _writable(conn: Connection) -> bool:
    return bool(select.select([], [conn.fileno()], [], 0)[1])
