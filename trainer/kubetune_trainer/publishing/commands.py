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
    :mod:`kubetune_trainer.oci.layout`), with the credentials of ``spec.output.secretRef`` (a
    ``kubernetes.io/dockerconfigjson`` Secret mounted under ``mounts.secrets``);
  - ``s3://`` is not supported yet: the spec refuses it at admission (``OUTPUT_SCHEMES``);
  - with ``spec.output.merge``, the merged model is published beside the adapter
    (``…/path-merged``, ``…:tag-merged``) or, with no destination, stays beside it in the volume
    (:mod:`kubetune_trainer.publishing.publish`).

- ``pull oci://… DIR [--docker-config FILE]`` puts an adapter image's files directly in ``DIR``.
- ``fetch-model --config FILE --into DIR`` fetches ``spec.model.source`` (with :mod:`kubetune_trainer.fetch`)
  and leaves the model's files in ``DIR``, for the serving pod's init container.

Each prints its result as JSON on the last line of standard output, and ``publish`` also writes it
to ``$KUBETUNE_TERMINATION_MESSAGE_PATH``: ``{"uri": …, "digest": "sha256:…", "sizeBytes": N}``, plus
``"mergedUri": …`` when a merged model was published.
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
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from kubetune_trainer.config_file import load_config
from kubetune_trainer.errors import EXIT_OK, EXIT_PERMANENT, EXIT_RETRYABLE, PermanentError, write_termination_message
from kubetune_trainer.oci.client import OciError
from kubetune_trainer.oci.credentials import load_credentials
from kubetune_trainer.oci.reference import Reference
from kubetune_trainer.oci.transfer import pull
from kubetune_trainer.process import setup_logging
from kubetune_trainer.publishing.fetch_model import fetch_model
from kubetune_trainer.publishing.publish import publish

log = logging.getLogger("kubetune.publish")


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
    except OciError as exc:
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
            ref = Reference.parse(args.reference)
        except ValueError as exc:
            raise PermanentError.one("REFERENCE", str(exc), summary="the reference is invalid") from None
        path, source = _docker_config(args)
        credentials = None
        if path is not None:
            try:
                credentials = load_credentials(path, ref.host)
            except ValueError as exc:
                raise PermanentError.one("--docker-config", str(exc), summary="the credentials are unusable") from None
        pulled = pull(ref, Path(args.folder), credentials=credentials, credential_source=source)
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
