"""Process lifecycle: bind at once, load the model in the background (/health says 503 until it is
ready; `python -m serving` has started the engine process, which loads it, before importing this),
serve, and on SIGTERM drain: /health and new requests get 503 while in-flight requests finish, up to
--drain-timeout, then exit 0."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from serving.api import reasoning
from serving.api.app import create_app
from serving.api.state import AppState, ServedModel
from serving.config import ServeConfig
from serving.cpus import pin_process
from serving.engine.async_engine import AsyncEngine
from serving.heap import freeze_startup_heap
from serving.metrics import Metrics
from serving.models.loader import load_tokenizer
from serving.models.source import served_name

log = logging.getLogger("fleetlm.server")


async def _start_engine(state: AppState, engine: AsyncEngine) -> None:
    """Start the engine process (it loads the model), then load the tokenizer here."""
    cfg = state.config
    try:
        info = await engine.start()
        if engine.pid is not None:
            state.metrics.watch_engine(engine.pid)
        state.metrics.describe_cache(info.kv_block_size, info.kv_cache_tokens // info.kv_block_size)
        if info.engine_cpus:
            api_cpus = os.sched_getaffinity(0) - set(info.engine_cpus)
            pin_process(api_cpus)
            log.info("CPU cores split", extra={"engine_cpus": list(info.engine_cpus), "api_cpus": sorted(api_cpus)})
        gguf_file = Path(info.gguf_file) if info.gguf_file else None
        tokenizer = await asyncio.get_running_loop().run_in_executor(
            state.executor, load_tokenizer, cfg, Path(info.directory), gguf_file
        )
    except Exception as exc:
        engine.stop()
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("model failed to load", extra={"error": state.load_error})
        return
    engine.set_tokenizer(tokenizer)
    tags = reasoning.tag_ids(tokenizer)  # the vocabulary read once
    thinks = reasoning.enabled(cfg.reasoning_parser, tokenizer, tags)
    think_ids = tags if thinks and tags and max(tags) < info.vocab_size else None
    served = ServedModel.of(info, tokenizer, thinks, think_ids, cfg.served_model_name[1:])
    freeze_startup_heap()  # before /health says ready: its one full collection pauses this loop
    state.engine = engine
    state.model = served


def _abort_open_connections(loop: asyncio.AbstractEventLoop) -> None:
    """Drop the connections still open at shutdown, their unsent bytes with them."""
    # The selector loop's own registry of its transports (private, but there since Python 3.4): asyncio
    # offers no public way to reach the connections hypercorn holds.
    transports = [t for t in list(getattr(loop, "_transports", {}).values()) if isinstance(t, asyncio.Transport)]
    if transports:
        log.warning("closing connections whose clients stopped reading", extra={"connections": len(transports)})
    for transport in transports:
        transport.abort()


def _quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """At shutdown, connection tasks hypercorn cancels are not errors (asyncio's stream callback would log
    each as one, with a traceback); anything else is reported as usual."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


async def serve(
    cfg: ServeConfig, stop: asyncio.Event | None = None, handle_signals: bool = True, engine: AsyncEngine | None = None
) -> int:
    """Run until `stop` is set or SIGTERM/SIGINT arrives; returns the process exit code. `engine`: one made
    (and perhaps launched) for `cfg` beforehand, else one is made here."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    state = AppState(
        config=cfg,
        metrics=Metrics(served_name(cfg)),
        executor=ThreadPoolExecutor(cfg.workers, thread_name_prefix="fleetlm-worker"),
    )
    app = create_app(state)
    failure: list[str] = []  # why the process must exit non-zero, once something broke

    def engine_died(reason: str) -> None:
        failure.append(reason)
        stop.set()  # exit non-zero, so the pod (or service manager) restarts it, rather than sit failed

    metrics = state.metrics
    engine = engine or AsyncEngine(cfg)
    engine.observe(metrics.observe_step, metrics.slow_readers.labels(metrics.model).inc, engine_died)

    async def load_then_watch() -> None:
        await _start_engine(state, engine)
        if state.load_error is not None:
            failure.append(state.load_error)
            stop.set()  # exit non-zero rather than sit unready forever

    async def drain() -> None:
        await stop.wait()
        state.draining = True
        log.info("draining", extra={"in_flight": state.in_flight, "timeout_s": cfg.drain_timeout})
        deadline = loop.time() + cfg.drain_timeout
        while state.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if state.in_flight:
            log.warning("drain timeout: cancelling in-flight requests", extra={"in_flight": state.in_flight})
            if state.engine is not None:
                # Each stream ends with a `data: {"error": ...}` event and [DONE] (a waiting
                # non-streaming request gets a 503), rather than a connection cut mid-body.
                state.engine.cancel_all(
                    f"The server shut down before this request finished (--drain-timeout {cfg.drain_timeout:g} s).",
                    code="drain_timeout",
                )
                flush_deadline = loop.time() + 5.0
                while state.in_flight > 0 and loop.time() < flush_deadline:
                    await asyncio.sleep(0.02)
        # hypercorn now closes the connections, waiting up to its graceful timeout for their tasks; a
        # connection whose client stopped reading never finishes closing (its unsent bytes wait for a
        # reader), and would hold the process, and the pod, until the client left.
        loop.call_later(hc.graceful_timeout + 2.0, _abort_open_connections, loop)
        loop.set_exception_handler(_quiet_cancellations)

    hc = HypercornConfig()
    hc.bind = [f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"]
    hc.accesslog = None  # one structured line per generation request comes from the API itself
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 1.0  # in-flight requests already had --drain-timeout
    # Connections the kernel has completed but the server not yet accepted. hypercorn's 100 overflowed under
    # a burst of a few hundred clients connecting at once: the kernel dropped the overflow, and those
    # clients, their requests sent, read a reset some seconds later (a request the server never saw).
    # uvicorn's default (vLLM's server), and the kernel caps it at net.core.somaxconn.
    hc.backlog = 2048
    # hypercorn's 5 s idle timer runs from the accept until a request is read: a load generator too busy
    # with its hundreds of streams to send the request on a connection it had just opened saw it closed
    # (the request cancelled 10 ms after it was read). 75 s (nginx's default) also outlasts the 60 s idle
    # timeouts of the load balancers and ingress proxies in front of a pod, which would otherwise reuse a
    # connection the server has just closed and answer their client 502.
    hc.keep_alive_timeout = 75.0
    loader = asyncio.create_task(load_then_watch())
    log.info("listening", extra={"bind": hc.bind[0], "model": served_name(cfg)})
    try:
        await hypercorn_serve(app, hc, shutdown_trigger=drain)
    except OSError as exc:  # the address is taken, or not ours to bind
        failure.append(f"cannot listen on {hc.bind[0]}: {exc.strerror or exc}")
        log.error("cannot listen", extra={"bind": hc.bind[0], "error": failure[-1]})
    finally:
        loader.cancel()
        engine.stop()  # loaded or still loading (then killed at once), or never started
        state.grammar_check.close()
        state.executor.shutdown(wait=False, cancel_futures=True)
    log.info("stopped", extra={"exit_code": 1 if failure else 0})
    return 1 if failure else 0
