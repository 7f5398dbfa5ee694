"""One training process under torchrun: ``python -m kubetune_trainer.training.worker --prepared DIR``.

``kubetune train`` prepares the run and starts torchrun with this module. A worker that fails
records why in ``$KUBETUNE_FAILURE_DIR/rank-<rank>.json`` (with whether the failure is permanent),
because torchrun reports every failure as exit code 1 and the launcher must tell the operator
which kind it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from kubetune_trainer.errors import EXIT_OK, EXIT_PERMANENT, EXIT_RETRYABLE, PermanentError
from kubetune_trainer.process import setup_logging

log = logging.getLogger("kubetune.train")


def _record(permanent: bool, message: str) -> None:
    folder = os.environ.get("KUBETUNE_FAILURE_DIR")
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "permanent": permanent, "message": message}
    with contextlib.suppress(OSError):
        (Path(folder) / f"rank-{rank}.json").write_text(json.dumps(record), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Train from a prepared folder; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer.training.worker")
    parser.add_argument("--prepared", required=True, help="folder written by kubetune train's preparation")
    args = parser.parse_args(argv)

    setup_logging()
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("kubetune").setLevel(logging.WARNING)
    try:
        from kubetune_trainer.training.prepare import PreparedRun  # noqa: PLC0415
        from kubetune_trainer.training.train import run  # noqa: PLC0415

        config, prepared = PreparedRun.load(Path(args.prepared))
        run(config, prepared)
        return EXIT_OK
    except PermanentError as exc:
        log.error("%s", exc)
        _record(True, exc.paragraph())
        return EXIT_PERMANENT
    except Exception as exc:  # recorded for the launcher, which decides the exit code
        log.error("training failed: %s", "".join(traceback.format_exception(exc)).rstrip())
        _record(False, f"{type(exc).__name__}: {exc}")
        return EXIT_RETRYABLE


if __name__ == "__main__":
    sys.exit(main())
