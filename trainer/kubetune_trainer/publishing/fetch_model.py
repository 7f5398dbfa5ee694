"""``kubetune fetch-model``'s work: fetch ``spec.model.source`` and leave the model's files in a folder.

The source is located and fetched with :mod:`kubetune_trainer.fetch`. Downloads go to a hidden
staging folder inside the target, whence they are moved, or to ``$KUBETUNE_CACHE_DIR`` when it is
set, whence they are copied; the model's files reach the target only once all of them are there.
A source that retrying cannot fix (a missing Hub repository or revision, a refused download or
archive, a file where a model folder is needed, a symbolic link that leads out of the claim or out
of the download) is a :class:`PermanentError`; other failures are retryable.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from kubetune_api import TrainerConfig
from kubetune_trainer import fetch
from kubetune_trainer.errors import PermanentError, ProblemList
from kubetune_trainer.folders import list_files, move_into

log = logging.getLogger("kubetune.publish")


def _hub_error_is_permanent(exc: BaseException) -> bool:
    try:
        from huggingface_hub import errors  # noqa: PLC0415 - only present with the trainer's extra
    except ImportError:
        return False
    if isinstance(exc, errors.RepositoryNotFoundError | errors.RevisionNotFoundError | errors.EntryNotFoundError):
        return True
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return isinstance(exc, errors.HfHubHTTPError) and status in (401, 403, 404)


def _materialize(source: Path, target: Path, movable: Path | None, root: Path | None) -> tuple[int, int]:
    """Put ``source``'s files in ``target``: moved when they lie under ``movable`` (a scratch cache), else copied.

    Every file's real path must lie under ``root`` (the claim's mount, the download cache), when
    one is given: a symbolic link that leads anywhere else is refused. Returns the number of files
    and their total size.
    """
    moved: dict[Path, Path] = {}
    count = size = 0
    files = list_files(source)
    for name, path in files.items():
        real = path.resolve()
        if root is not None and not real.is_relative_to(root):
            raise PermanentError.one(
                "spec.model.source",
                f"{name} in the model folder {source} is a symbolic link that leads to {real}, outside {root}; "
                "a model folder may only link to files inside its claim",
                summary="the model cannot be fetched",
            )
    for name, path in files.items():
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        real = path.resolve()
        if real in moved:  # a hub snapshot may link two names to one blob
            shutil.copyfile(moved[real], destination)
        elif movable is not None and real.is_relative_to(movable):
            os.replace(real, destination)
            moved[real] = destination
        else:
            shutil.copyfile(path, destination)
        count += 1
        size += destination.stat().st_size
    return count, size


def fetch_model(config: TrainerConfig, into: Path) -> dict[str, object]:
    """Locate and fetch ``spec.model.source`` and leave the model's files in ``into``."""
    spec = config.spec
    problems = ProblemList()
    located = fetch.locate(
        spec.model.source, kind="model", secret_ref=spec.model.secret_ref, config=config, problems=problems
    )
    problems.raise_if_any("the model cannot be fetched")
    assert located is not None
    into.mkdir(parents=True, exist_ok=True)
    for stale in into.glob(".kubetune-fetch-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".kubetune-fetch-", dir=into))
    try:
        own_cache = not os.environ.get(fetch.CACHE_DIR_ENV)
        cache = staging / "cache" if own_cache else Path(os.environ[fetch.CACHE_DIR_ENV])
        try:
            path = fetch.fetch(located, cache=cache)
        except fetch.FetchError as exc:
            if exc.permanent:
                raise PermanentError.one("spec.model.source", str(exc), summary="the model cannot be fetched") from None
            raise
        except Exception as exc:
            if _hub_error_is_permanent(exc):
                raise PermanentError.one(
                    "spec.model.source", f"{type(exc).__name__}: {exc}", summary="the model cannot be fetched"
                ) from None
            raise
        if not path.is_dir():
            raise PermanentError.one(
                "spec.model.source",
                f"{spec.model.source} is a file ({path}); a model source is a folder with config.json, the weights and the tokenizer",
                summary="the model cannot be fetched",
            )
        model = staging / "model"
        model.mkdir()
        root = located.root if isinstance(located, fetch.LocalSource) else cache.resolve()
        count, size = _materialize(path, model, (staging / "cache").resolve() if own_cache else None, root)
        move_into(model, into)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("fetch-model: %s: %d files (%d bytes) in %s", spec.model.source, count, size, into)
    return {"uri": spec.model.source, "path": str(into), "files": count, "sizeBytes": size}
