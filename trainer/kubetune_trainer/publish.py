"""``kubetune publish``, ``kubetune pull`` and ``kubetune fetch-model``: moving the results and the base model.

Torch-free (they run in short pods without the ML stack):

- ``publish --config FILE [--output DIR] [--default-uri URI]`` publishes what training left in the
  output folder (``adapter/``, or ``model/`` for method full, plus ``summary.json``) to
  ``spec.output.destination``:

  - unset: nothing is copied; the result's ``uri`` is ``--default-uri`` (the operator passes
    ``pvc://<workspace claim>/adapter``), else the folder's ``file://`` URI;
  - ``pvc://claim/path``: the files are copied into ``<mounts.claims[claim]>/path``, staged in a
    hidden folder beside it and renamed into place only once complete (an existing folder is
    replaced then);
  - ``oci://registry[:port]/repository:tag``: pushed as a Kaito-compatible adapter image (see
    :mod:`kubetune_trainer.oci`), with the credentials of ``spec.output.secretRef`` (a
    ``kubernetes.io/dockerconfigjson`` Secret mounted under ``mounts.secrets``);
  - ``s3://`` is not supported yet: the spec refuses it at admission (``OUTPUT_SCHEMES``).

- ``pull oci://… DIR [--docker-config FILE]`` puts an adapter image's files directly in ``DIR``.
- ``fetch-model --config FILE --into DIR`` fetches ``spec.model.source`` (with :mod:`kubetune_trainer.sources`)
  and leaves the model's files in ``DIR``, for the serving pod's init container.

Each prints its result as JSON on the last line of standard output, and ``publish`` also writes it
to ``$KUBETUNE_TERMINATION_MESSAGE_PATH``: ``{"uri": …, "digest": "sha256:…", "sizeBytes": N}``.
The digest of an ``oci://`` result is the manifest's digest. The digest of a folder (``pvc://``, or
the unset destination) is the sha256 of the text made of one line ``<sha256 of the file>  <path>\\n``
per file, sorted by path (relative, ``/``-separated; hidden files are not published): what
``(cd DIR && find . -type f | sed 's|^./||' | LC_ALL=C sort | xargs -d '\\n' sha256sum) | sha256sum``
prints. ``sizeBytes`` is the total size of the published files.

Exit codes, as ``kubetune train``'s: 0 done; 2 permanent (nothing to publish, a bad destination,
refused credentials), with the reason as the termination message; 1 retryable (the registry cannot
be reached or answers 5xx, a download broke off).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kubetune_api import SourceURI, TrainerConfig, parse_uri
from kubetune_api.uris import OUTPUT_SCHEMES
from kubetune_trainer import oci, sources
from kubetune_trainer.configfile import load_config
from kubetune_trainer.errors import (
    EXIT_OK,
    EXIT_PERMANENT,
    EXIT_RETRYABLE,
    PermanentError,
    ProblemList,
    write_termination_message,
)
from kubetune_trainer.launch import WORK_DIR_ENV, setup_logging

log = logging.getLogger("kubetune.publish")

SUMMARY_FILE: Final = "summary.json"
#: The keys of a kubernetes.io/dockerconfigjson Secret, and of the legacy kubernetes.io/dockercfg one.
DOCKER_CONFIG_KEYS: Final = (".dockerconfigjson", ".dockercfg")
_COPY_CHUNK: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Result:
    """Where the published files are, and what they are."""

    uri: str
    digest: str
    size_bytes: int

    def as_json(self) -> str:
        """One line of JSON: ``{"uri": …, "digest": …, "sizeBytes": …}``."""
        return json.dumps({"uri": self.uri, "digest": self.digest, "sizeBytes": self.size_bytes})


# ----------------------------------------------------------------------------------- folders


def list_files(folder: Path) -> dict[str, Path]:
    """The files under ``folder`` (symbolic links followed), by ``/``-separated relative path; hidden ones left out."""
    found: dict[str, Path] = {}
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in names:
            path = Path(directory) / name
            if not name.startswith(".") and path.is_file():
                found[path.relative_to(folder).as_posix()] = path
    return dict(sorted(found.items()))


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's content."""
    sha = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(_COPY_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def folder_digest(hashes: Mapping[str, str]) -> str:
    """``sha256:`` of the ``sha256sum``-style listing of ``hashes`` (relative path → hex sha256), sorted by path."""
    listing = "".join(f"{hashes[name]}  {name}\n" for name in sorted(hashes))
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def _copy_hashing(source: Path, target: Path) -> str:
    sha = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(_COPY_CHUNK):
            sha.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return sha.hexdigest()


# ----------------------------------------------------------------------------------- publish


def published_files(config: TrainerConfig) -> tuple[Path, dict[str, Path]]:
    """The folder training left (``adapter/`` or ``model/``) and the files to publish from it, ``summary.json`` added."""
    output = Path(config.mounts.output)
    folder = output / config.spec.method.result_folder
    files = list_files(folder) if folder.is_dir() else {}
    if not files:
        raise PermanentError.one(
            "spec.output",
            f"training left nothing at {folder} ({'an empty folder' if folder.is_dir() else 'no such folder'}); "
            "publish runs after a successful training, which saves the "
            f"{'model' if config.spec.method.type == 'full' else 'adapter'} there",
            summary="there is nothing to publish",
        )
    summary = output / SUMMARY_FILE
    if SUMMARY_FILE not in files and summary.is_file():
        files[SUMMARY_FILE] = summary
    return folder, files


def publish(config: TrainerConfig, *, default_uri: str | None = None) -> Result:
    """Publish the trained adapter (or model) to ``spec.output.destination``; see the module's docstring."""
    folder, files = published_files(config)
    destination = config.spec.output.destination
    if destination is None:
        adapter_files = list_files(folder)
        digest = folder_digest({name: file_sha256(path) for name, path in adapter_files.items()})
        log.info("publish: no spec.output.destination; the %d files stay in %s", len(adapter_files), folder)
        return Result(
            default_uri or folder.resolve().as_uri(), digest, sum(p.stat().st_size for p in adapter_files.values())
        )
    try:
        parsed = parse_uri(destination, OUTPUT_SCHEMES)
    except ValueError as exc:
        raise PermanentError.one("spec.output.destination", str(exc), summary="the destination is invalid") from None
    if parsed.scheme == "pvc":
        return _publish_pvc(config, folder, files, parsed)
    return _publish_oci(config, files, destination)


def _publish_pvc(config: TrainerConfig, folder: Path, files: dict[str, Path], destination: SourceURI) -> Result:
    field = "spec.output.destination"
    claim, path, uri = destination.authority, destination.path, str(destination)
    size = sum(p.stat().st_size for p in files.values())
    mount = config.mounts.claims.get(claim)
    if mount is None:
        raise PermanentError.one(
            field,
            f"claim {claim!r} is not mounted in this pod (mounts.claims names {sorted(config.mounts.claims) or 'none'})",
            summary="the destination is not mounted",
        )
    root = Path(mount).resolve()
    target = (root / path.strip("/")).resolve()
    if target == root or not target.is_relative_to(root):
        raise PermanentError.one(
            field,
            f"{uri} must name a folder inside claim {claim}, such as pvc://{claim}/adapters/NAME "
            "(the claim's root is never replaced, and .. may not leave the claim)",
            summary="the destination is invalid",
        )
    source = folder.resolve()
    if target == source:  # already there: the job's own volume named explicitly
        hashes = {name: file_sha256(p) for name, p in list_files(folder).items()}
        return Result(uri, folder_digest(hashes), sum(p.stat().st_size for p in list_files(folder).values()))
    if target.is_relative_to(source) or source.is_relative_to(target):
        raise PermanentError.one(
            field,
            f"{uri} ({target}) overlaps the folder it would be copied from ({source})",
            summary="the destination is invalid",
        )
    if target.exists() and not target.is_dir():
        raise PermanentError.one(
            field, f"{uri} ({target}) is a file, not a folder", summary="the destination is invalid"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.kubetune-"
    for stale in target.parent.glob(prefix + "*"):  # left by an interrupted publish
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix + "staging-", dir=target.parent))
    try:
        hashes = {name: _copy_hashing(source_file, staging / name) for name, source_file in files.items()}
        staging.chmod(0o755)
        if target.exists():
            old = target.parent / f"{prefix}old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("publish: copied %d files (%d bytes) to %s (%s)", len(files), size, uri, target)
    return Result(uri, folder_digest(hashes), size)


def _secret_docker_config(config: TrainerConfig, secret: str) -> Path:
    mount = config.mounts.secrets.get(secret)
    if mount is None:
        raise PermanentError.one(
            "spec.output.secretRef",
            f"Secret {secret!r} is not mounted in this pod (mounts.secrets names {sorted(config.mounts.secrets) or 'none'})",
            summary="the push credentials are missing",
        )
    for key in DOCKER_CONFIG_KEYS:
        if (Path(mount) / key).is_file():
            return Path(mount) / key
    raise PermanentError.one(
        "spec.output.secretRef",
        f"Secret {secret!r} has no key .dockerconfigjson; create it as a kubernetes.io/dockerconfigjson Secret "
        f"(kubectl create secret docker-registry {secret} --docker-server=REGISTRY --docker-username=… --docker-password=…)",
        summary="the push credentials are missing",
    )


def _publish_oci(config: TrainerConfig, files: dict[str, Path], destination: str) -> Result:
    try:
        ref = oci.Reference.parse(destination).with_tag()
    except ValueError as exc:
        raise PermanentError.one("spec.output.destination", str(exc), summary="the destination is invalid") from None
    secret = config.spec.output.secret_ref
    credentials = None
    if secret:
        source = f"Secret {secret!r} (spec.output.secretRef)"
        path = _secret_docker_config(config, secret)
        try:
            credentials = oci.load_credentials(path, ref.host)
        except ValueError as exc:
            raise PermanentError.one(
                "spec.output.secretRef", f"Secret {secret!r}: {exc}", summary="the push credentials are unusable"
            ) from None
        if credentials is None:
            raise PermanentError.one(
                "spec.output.secretRef",
                f"Secret {secret!r} has no credentials for registry {ref.host} in its .dockerconfigjson; "
                f"add an entry for {ref.host} (--docker-server={ref.host})",
                summary="the push credentials are missing",
            )
        fix = (
            f"for example recreate it: kubectl delete secret {secret}; kubectl create secret docker-registry {secret} "
            f"--docker-server={ref.host} --docker-username=USER --docker-password=PASSWORD"
        )
    else:
        source = "spec.output.secretRef (a kubernetes.io/dockerconfigjson Secret)"
        fix = (
            f"for example: kubectl create secret docker-registry NAME --docker-server={ref.host} "
            "--docker-username=USER --docker-password=PASSWORD, then set spec.output.secretRef: NAME"
        )
    spec = config.spec
    annotations = {
        "io.kubetune.job": f"{config.namespace}/{config.job_name}",
        "io.kubetune.base-model": spec.model.source,
        "io.kubetune.method": spec.method.type,
    }
    pushed = oci.push(
        files,
        ref,
        credentials=credentials,
        credential_source=source,
        fix=fix,
        annotations=annotations,
        workdir=Path(os.environ[WORK_DIR_ENV]) if os.environ.get(WORK_DIR_ENV) else None,
    )
    return Result(str(pushed.reference), pushed.digest, pushed.size_bytes)


# -------------------------------------------------------------------------------- fetch-model


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


def _materialize(source: Path, target: Path, movable: Path | None) -> tuple[int, int]:
    """Put ``source``'s files in ``target``: moved when they lie under ``movable`` (a scratch cache), else copied.

    Returns the number of files and their total size.
    """
    moved: dict[Path, Path] = {}
    count = size = 0
    for name, path in list_files(source).items():
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
    located = sources.locate(
        spec.model.source, kind="model", secret_ref=spec.model.secret_ref, config=config, problems=problems
    )
    problems.raise_if_any("the model cannot be fetched")
    assert located is not None
    into.mkdir(parents=True, exist_ok=True)
    for stale in into.glob(".kubetune-fetch-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".kubetune-fetch-", dir=into))
    try:
        own_cache = not os.environ.get(sources.CACHE_DIR_ENV)
        cache = staging / "cache" if own_cache else Path(os.environ[sources.CACHE_DIR_ENV])
        try:
            path = sources.fetch(located, cache=cache)
        except sources.FetchError as exc:
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
        count, size = _materialize(path, model, (staging / "cache").resolve() if own_cache else None)
        oci.move_into(model, into)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("fetch-model: %s: %d files (%d bytes) in %s", spec.model.source, count, size, into)
    return {"uri": spec.model.source, "path": str(into), "files": count, "sizeBytes": size}


# -------------------------------------------------------------------------------------- mains


def _run(what: str, body: Callable[[], str], *, termination: bool) -> int:
    """Run ``body``, print its JSON result last; turn failures into exit codes and termination messages."""
    setup_logging()

    def fail(message: str, code: int) -> int:
        log.error("%s", message)
        if termination:
            write_termination_message(message)
        return code

    try:
        result = body()
    except PermanentError as exc:
        return fail(exc.paragraph(), EXIT_PERMANENT)
    except oci.OciError as exc:
        return fail(f"{what} failed: {exc}", EXIT_PERMANENT if exc.permanent else EXIT_RETRYABLE)
    except KeyboardInterrupt:
        return fail(f"{what} was interrupted", EXIT_RETRYABLE)
    except Exception as exc:  # anything unexpected is worth a retry, with its reason recorded
        log.error("%s failed: %s", what, "".join(traceback.format_exception(exc)).rstrip())
        return fail(f"{what} failed ({type(exc).__name__}): {exc}", EXIT_RETRYABLE)
    if termination:
        write_termination_message(result)
    sys.stdout.write(result + "\n")
    sys.stdout.flush()
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    """``kubetune publish``."""

    def body() -> str:
        config = load_config(Path(args.config), output=Path(args.output) if args.output else None)
        return publish(config, default_uri=args.default_uri).as_json()

    return _run("publish", body, termination=True)


def _docker_config(args: argparse.Namespace) -> tuple[Path | None, str]:
    if args.docker_config:
        return Path(args.docker_config), f"--docker-config {args.docker_config}"
    home = Path(os.environ["DOCKER_CONFIG"]) if os.environ.get("DOCKER_CONFIG") else Path.home() / ".docker"
    default = home / "config.json"
    return (default if default.is_file() else None), "--docker-config FILE (a Docker config.json)"


def pull_main(args: argparse.Namespace) -> int:
    """``kubetune pull``."""

    def body() -> str:
        try:
            ref = oci.Reference.parse(args.reference)
        except ValueError as exc:
            raise PermanentError.one("REFERENCE", str(exc), summary="the reference is invalid") from None
        path, source = _docker_config(args)
        credentials = None
        if path is not None:
            try:
                credentials = oci.load_credentials(path, ref.host)
            except ValueError as exc:
                raise PermanentError.one("--docker-config", str(exc), summary="the credentials are unusable") from None
        pulled = oci.pull(ref, Path(args.folder), credentials=credentials, credential_source=source)
        return json.dumps(
            {
                "uri": str(pulled.reference),
                "digest": pulled.digest,
                "sizeBytes": pulled.size_bytes,
                "path": str(args.folder),
                "files": len(pulled.files),
            }
        )

    return _run("pull", body, termination=True)


def fetch_model_main(args: argparse.Namespace) -> int:
    """``kubetune fetch-model``."""

    def body() -> str:
        into = Path(args.into)
        # A FineTuneJob manifest needs an output folder; fetching uses none, so the target stands in.
        config = load_config(Path(args.config), output=into)
        return json.dumps(fetch_model(config, into))

    return _run("fetch-model", body, termination=True)
