"""`python -m serving [flags]` serves a model; `python -m serving download ...` fetches one."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from serving.config import ConfigError, load_config, program_name
from serving.logs import setup_logging
from serving.trust import trust_extra_ca


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["download"]:
        from serving.download import main as download_main

        return download_main(argv[1:])
    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        print(f"{program_name()}: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    try:
        trust_extra_ca()  # before anything reaches the Hub (a Hub tokenizer, a Hub id's download)
    except ValueError as exc:
        print(f"{program_name()}: error: {exc}", file=sys.stderr)
        return 2
    from serving.engine.async_engine import AsyncEngine

    # The engine process starts first: its imports and the model's load (seconds) overlap this process's
    # imports (as long again) rather than follow them. A preflight failure stops it.
    engine = AsyncEngine(cfg)
    engine.launch()

    def stop_starting(signum: int, frame: object) -> None:
        # Ctrl-C or SIGTERM before the server handles them (it drains then): nothing is served yet, so stop
        # at once, engine and all, rather than raise into whatever import is running (its traceback, or a
        # library half-imported that fails again at exit).
        engine.kill()
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_starting)  # until serve() sets its own
    try:
        from serving.models.loader import preflight

        preflight(cfg)  # an unavailable device or a missing path fails now, not after binding
        from serving.server import serve

        return asyncio.run(serve(cfg, engine=engine))  # from here SIGINT and SIGTERM drain, then return
    except ConfigError as exc:
        print(f"{program_name()}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while starting: stop, without a traceback of wherever the imports were
        return 130
    finally:
        engine.stop()  # a no-op once serve() has stopped it

if __name__ == "__main__":
    sys.exit(main())
