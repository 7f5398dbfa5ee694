"""``kubetune serve``: check the command line, listen at once, load the model, serve until SIGTERM or SIGINT.

``/healthz`` answers while the model loads. A model or a start-up adapter (``--adapter``) that
cannot be loaded ends the command with exit code 2. Then the adapters of ``--adapters-file`` (a
JSON object ``{name: path}``, the paths inside ``--runtime-adapters DIR``; a missing file means
none) are loaded; one that cannot be is logged and skipped, and ``/readyz`` names it, so that a
replica restarted with the file of a shared server comes back with every adapter it can load.
``/readyz`` answers 200 once all that is done. SIGTERM or SIGINT stops listening, gives the
answers in flight up to 5 seconds to finish (then ends them), stops the scheduler and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import EXIT_OK, EXIT_PERMANENT
from kubetune_trainer.serving.engine import Engine
from kubetune_trainer.serving.protocol import RequestError, check_adapter_name, confined
from kubetune_trainer.serving.server import Limits, Server

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


def read_adapters_file(path: Path) -> dict[str, object]:
    """The ``--adapters-file`` object (``{}`` when the file is missing); ValueError when it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ValueError(f"--adapters-file {path}: {exc}") from None
    try:
        loaded = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise ValueError(f"--adapters-file {path}: not JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--adapters-file {path}: not a JSON object of name: path")
    return loaded


def load_adapters_file(engine: Engine, path: Path, root: Path) -> dict[str, str]:
    """Load every adapter of the file onto the engine; those that could not be, with why."""
    skipped: dict[str, str] = {}
    try:
        wanted = read_adapters_file(path)
    except ValueError as exc:
        log.error("%s; no adapter loaded from it", exc)
        return {str(path): str(exc)}
    for name, where in wanted.items():
        try:
            checked = check_adapter_name(name, engine.names)
            engine.load_adapter(checked, confined(root, where)).result()
            log.info("loaded adapter %s from %s", checked, where)
        except RequestError as exc:
            log.error("adapter %s from %s: %s; skipped", name, path, exc.message)
            skipped[name] = exc.message
    return skipped


def check_flags(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags (beyond ``--adapter``), if anything."""
    if not (Path(args.model) / "config.json").is_file():
        return f"--model {args.model}: not a model folder (no config.json)"
    for flag in ("max_new_tokens_limit", "max_batch", "max_queued", "max_connections"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1"
    for flag in ("read_timeout", "write_timeout", "request_timeout"):
        if not getattr(args, flag) > 0:
            return f"--{flag.replace('_', '-')} must be above 0"
    if args.runtime_adapters and not Path(args.runtime_adapters).is_dir():
        return f"--runtime-adapters {args.runtime_adapters}: not a folder"
    if args.adapters_file and not args.runtime_adapters:
        return "--adapters-file needs --runtime-adapters (the folder its adapters must lie in)"
    return None


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
    problem = check_flags(args)
    if problem:
        log.error("%s", problem)
        return EXIT_PERMANENT
    model = Path(args.model)
    runtime = Path(args.runtime_adapters) if args.runtime_adapters else None
    return asyncio.run(_serve(args, model, adapters, runtime))


async def _serve(args: argparse.Namespace, model: Path, adapters: dict[str, Path], runtime: Path | None) -> int:
    limits = Limits(
        max_tokens=args.max_new_tokens_limit,
        read_timeout=args.read_timeout,
        write_timeout=args.write_timeout,
        request_timeout=args.request_timeout,
        max_connections=args.max_connections,
    )
    server = Server(base_name=args.base_name, limits=limits, runtime_adapters=runtime)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop(signum: signal.Signals) -> None:
        log.info("received %s; stopping", signum.name)
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    port = await server.start(args.host, args.port)
    log.info("listening on http://%s:%d (healthz answers; readyz once the model is loaded)", args.host, port)
    try:
        started = time.monotonic()

        def load() -> Engine:
            engine = Engine(
                model,
                adapters,
                base_name=args.base_name,
                device=args.device,
                max_batch=args.max_batch,
                max_queued=args.max_queued,
            )
            if args.adapters_file and runtime is not None:
                server.skipped = load_adapters_file(engine, Path(args.adapters_file), runtime)
            return engine

        loading: asyncio.Future[Engine] = loop.run_in_executor(None, load)
        waiting: asyncio.Future[bool] = asyncio.ensure_future(stopping.wait())
        either: list[asyncio.Future[Any]] = [loading, waiting]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            log.info("stopped while loading")
            return EXIT_OK
        try:
            engine = loading.result()
        except Exception as exc:
            log.error("cannot load %s with adapters %s: %s", model, adapters or "none", exc)
            return EXIT_PERMANENT
        engine.start()
        server.engine = engine
        server.ready = True
        log.info("ready in %.1fs on %s: models %s", time.monotonic() - started, engine.device, engine.names)
        await waiting
    finally:
        await server.stop()
    return EXIT_OK
