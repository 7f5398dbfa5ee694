"""``kubetune serve``: check the command line, listen at once, load the model, serve until SIGTERM or SIGINT.

``/healthz`` answers while the model loads and ``/readyz`` once it is loaded; a model or adapter
that cannot be loaded ends the command with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from kubetune_trainer.errors import EXIT_OK, EXIT_PERMANENT
from kubetune_trainer.serving.engine import Engine
from kubetune_trainer.serving.server import Server

log = logging.getLogger("kubetune.serve")


def parse_adapters(values: list[str] | None, base_name: str) -> dict[str, Path]:
    """``NAME=PATH`` pairs as a dict, each name unique and not the base's."""
    adapters: dict[str, Path] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ValueError(f"--adapter {value!r}: expected NAME=PATH")
        if name == base_name or name in adapters:
            raise ValueError(f"--adapter {value!r}: the name {name!r} is taken")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {value!r}: {path} holds no adapter_config.json")
        adapters[name] = Path(path)
    return adapters


def main(args: argparse.Namespace) -> int:
    """Run ``kubetune serve`` until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        adapters = parse_adapters(args.adapter, args.base_name)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_PERMANENT
    model = Path(args.model)
    if not (model / "config.json").is_file():
        log.error("--model %s: not a model folder (no config.json)", model)
        return EXIT_PERMANENT
    if args.max_new_tokens_limit < 1:
        log.error("--max-new-tokens-limit must be at least 1")
        return EXIT_PERMANENT

    server = Server((args.host, args.port), names=[args.base_name, *adapters], limit=args.max_new_tokens_limit)
    stopping = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    host, port = server.server_address[:2]
    log.info("listening on http://%s:%d (healthz answers; readyz once the model is loaded)", host, port)
    try:
        started = time.monotonic()
        try:
            server.engine = Engine(model, adapters, base_name=args.base_name, device=args.device)
        except Exception as exc:
            log.error("cannot load %s with adapters %s: %s", model, adapters or "none", exc)
            return EXIT_PERMANENT
        log.info(
            "ready in %.1fs on %s: models %s", time.monotonic() - started, server.engine.device, server.engine.names
        )
        stopping.wait()
    finally:
        server.shutdown()
        server.server_close()
    return EXIT_OK
