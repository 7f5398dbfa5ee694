"""Publishing what training left in the output folder to ``spec.output.destination``.

What is published is the result folder (``adapter/``, or ``model/`` for method full) plus
``summary.json``. With no destination nothing is copied; a ``pvc://`` destination is a folder on a
mounted claim, replaced whole once the copy is complete; an ``oci://`` destination is an adapter
image pushed with the credentials of ``spec.output.secretRef``. :mod:`.commands` documents the
result each gives.

With ``spec.output.merge`` the merged model training left in ``merged/`` is published too, beside
the adapter: ``pvc://claim/path`` → ``pvc://claim/path-merged``, ``oci://…/repository:tag`` →
``oci://…/repository:tag-merged`` (the same layout, the model's files under ``data/``); with no
destination it stays in the job's volume, beside ``adapter/``. The result names it (``mergedUri``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kubetune_api import SourceURI, TrainerConfig, parse_uri
from kubetune_api.uris import OUTPUT_SCHEMES
from kubetune_trainer.errors import PermanentError
from kubetune_trainer.folders import copy_hashing, file_sha256, folder_digest, list_files
from kubetune_trainer.oci.credentials import docker_config_in, load_credentials
from kubetune_trainer.oci.reference import Reference
from kubetune_trainer.oci.transfer import push
from kubetune_trainer.process import WORK_DIR_ENV

log = logging.getLogger("kubetune.publish")

SUMMARY_FILE: Final = "summary.json"
#: Where training leaves the merged model (``spec.output.merge``), and what its published copy adds to the destination.
MERGED_FOLDER: Final = "merged"
MERGED_SUFFIX: Final = "-merged"
#: The longest tag the OCI distribution spec allows.
MAX_TAG_LENGTH: Final = 128


@dataclass(frozen=True, slots=True)
class Result:
    """Where the published files are, and what they are."""

    uri: str
    digest: str
    size_bytes: int
    merged_uri: str | None = None
    """Where the merged model was published (``spec.output.merge``)."""

    def as_json(self) -> str:
        """One line of JSON: ``{"uri": …, "digest": …, "sizeBytes": …}``, and ``mergedUri`` with a merged model."""
        result: dict[str, object] = {"uri": self.uri, "digest": self.digest, "sizeBytes": self.size_bytes}
        if self.merged_uri:
            result["mergedUri"] = self.merged_uri
        return json.dumps(result)


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


def merged_files(config: TrainerConfig) -> tuple[Path, dict[str, Path]] | None:
    """The merged model's folder and files with ``spec.output.merge`` (an adapter method), else ``None``."""
    if not config.spec.output.merge or config.spec.method.type == "full":
        return None
    folder = Path(config.mounts.output) / MERGED_FOLDER
    files = list_files(folder) if folder.is_dir() else {}
    if not files:
        raise PermanentError.one(
            "spec.output.merge",
            f"training left no merged model at {folder}; a training with output.merge saves it there",
            summary="there is nothing to publish",
        )
    return folder, files


def publish(config: TrainerConfig, *, default_uri: str | None = None) -> Result:
    """Publish the trained adapter (or model) to ``spec.output.destination``; see the module's docstring."""
    folder, files = published_files(config)
    merged = merged_files(config)
    destination = config.spec.output.destination
    if destination is None:
        adapter_files = list_files(folder)
        digest = folder_digest({name: file_sha256(path) for name, path in adapter_files.items()})
        log.info("publish: no spec.output.destination; the %d files stay in %s", len(adapter_files), folder)
        uri = default_uri or folder.resolve().as_uri()
        merged_uri = None
        if merged is not None:
            # The merged model stays in the same volume, beside the result folder.
            merged_uri = uri.rpartition("/")[0] + "/" + MERGED_FOLDER if default_uri else merged[0].resolve().as_uri()
        return Result(uri, digest, sum(p.stat().st_size for p in adapter_files.values()), merged_uri)
    try:
        parsed = parse_uri(destination, OUTPUT_SCHEMES)
    except ValueError as exc:
        raise PermanentError.one("spec.output.destination", str(exc), summary="the destination is invalid") from None
    if parsed.scheme == "pvc":
        result = _publish_pvc(config, folder, files, parsed)
        if merged is not None:
            beside = parse_uri(f"{str(parsed).rstrip('/')}{MERGED_SUFFIX}", OUTPUT_SCHEMES)
            result = dataclasses.replace(result, merged_uri=_publish_pvc(config, merged[0], merged[1], beside).uri)
        return result
    result = _publish_oci(config, files, destination)
    if merged is not None:
        ref = _oci_reference(destination)
        if ref.tag is None or len(ref.tag) + len(MERGED_SUFFIX) > MAX_TAG_LENGTH:
            raise PermanentError.one(
                "spec.output.destination",
                f"{destination}: the merged model is pushed under the tag + {MERGED_SUFFIX!r}, which needs a tag "
                f"of at most {MAX_TAG_LENGTH - len(MERGED_SUFFIX)} characters",
                summary="the destination is invalid",
            )
        tagged = f"oci://{ref.host}/{ref.repository}:{ref.tag}{MERGED_SUFFIX}"
        pushed = _publish_oci(config, merged[1], tagged, merged=True)
        result = dataclasses.replace(result, merged_uri=pushed.uri)
    return result


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
        hashes = {name: copy_hashing(source_file, staging / name) for name, source_file in files.items()}
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
    found = docker_config_in(Path(mount))
    if found is not None:
        return found
    raise PermanentError.one(
        "spec.output.secretRef",
        f"Secret {secret!r} has no key .dockerconfigjson; create it as a kubernetes.io/dockerconfigjson Secret "
        f"(kubectl create secret docker-registry {secret} --docker-server=REGISTRY --docker-username=… --docker-password=…)",
        summary="the push credentials are missing",
    )


def _oci_reference(destination: str) -> Reference:
    try:
        return Reference.parse(destination).with_tag()
    except ValueError as exc:
        raise PermanentError.one("spec.output.destination", str(exc), summary="the destination is invalid") from None


def _publish_oci(config: TrainerConfig, files: dict[str, Path], destination: str, *, merged: bool = False) -> Result:
    ref = _oci_reference(destination)
    secret = config.spec.output.secret_ref
    credentials = None
    if secret:
        source = f"Secret {secret!r} (spec.output.secretRef)"
        path = _secret_docker_config(config, secret)
        try:
            credentials = load_credentials(path, ref.host)
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
        **({"io.kubetune.merged": "true"} if merged else {}),
    }
    pushed = push(
        files,
        ref,
        credentials=credentials,
        credential_source=source,
        fix=fix,
        annotations=annotations,
        workdir=Path(os.environ[WORK_DIR_ENV]) if os.environ.get(WORK_DIR_ENV) else None,
    )
    return Result(str(pushed.reference), pushed.digest, pushed.size_bytes)
