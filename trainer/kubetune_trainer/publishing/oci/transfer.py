"""Pushing an adapter image to a registry, and pulling an image or artifact back into a folder.

``push`` uploads the layer and the config as blobs (chunked above :data:`CHUNK_BYTES`), then the
manifest, in the layout of :mod:`.layout`, and checks the digest the registry reports. ``pull``
reads that layout and also plain ``oras push`` artifacts: tar layers are unpacked, other
layers are written under their ``org.opencontainers.image.title``; when the result has a ``data/``
folder, its content is what lands in the target folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import requests

from kubetune_trainer.publishing.folders import move_into
from kubetune_trainer.publishing.oci.client import OciError, RegistryClient, short_reason
from kubetune_trainer.publishing.oci.credentials import Credentials
from kubetune_trainer.publishing.oci.layout import (
    CONFIG_MEDIA_TYPE,
    DATA_DIR,
    DOCKER_MANIFEST_MEDIA_TYPE,
    INDEX_MEDIA_TYPES,
    LAYER_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    TITLE_ANNOTATION,
    build_layer,
    image_config,
    image_manifest,
)
from kubetune_trainer.publishing.oci.reference import Reference

log = logging.getLogger("kubetune.oci")

#: Layers above this size are uploaded in chunks of this size (oras reads a plain upload into memory).
CHUNK_BYTES: Final = 64 << 20


@dataclass(frozen=True, slots=True)
class Pushed:
    """What a push left in the registry."""

    reference: Reference
    digest: str
    """The manifest's digest (``sha256:…``), as the registry reports it in Docker-Content-Digest."""
    size_bytes: int
    """Total size of the published files (uncompressed)."""
    manifest: dict[str, Any]


def push(
    files: Mapping[str, Path],
    ref: Reference,
    *,
    credentials: Credentials | None,
    credential_source: str,
    fix: str = "",
    annotations: Mapping[str, str] | None = None,
    workdir: Path | None = None,
) -> Pushed:
    """Push ``files`` (relative path → file) as the adapter image ``ref``, laid out as :mod:`.layout` describes."""
    ref = ref.with_tag()
    if ref.digest:
        raise OciError(f"{ref}: push to a tag (oci://registry/repository:tag), not to a digest", permanent=True)
    registry = RegistryClient(ref.host, credentials, credential_source=credential_source, fix=fix)
    container = registry.container(ref)
    size = sum(path.stat().st_size for path in files.values())
    with tempfile.TemporaryDirectory(prefix="kubetune-oci-", dir=workdir) as scratch:
        started = time.monotonic()
        layer = build_layer(
            {f"{DATA_DIR}/{name}": path for name, path in files.items()}, Path(scratch) / "layer.tar.gz"
        )
        log.info(
            "built the layer of %d files (%d bytes, %d compressed) in %.1fs",
            len(files),
            size,
            layer.size,
            time.monotonic() - started,
        )
        config = image_config(layer)
        config_path = Path(scratch) / "config.json"
        config_path.write_bytes(config)
        manifest = image_manifest(layer, config, annotations or {})
        try:
            for path, media_type, digest, blob_size in (
                (layer.path, LAYER_MEDIA_TYPE, layer.digest, layer.size),
                (config_path, CONFIG_MEDIA_TYPE, json.loads(manifest)["config"]["digest"], len(config)),
            ):
                chunked = blob_size > CHUNK_BYTES
                response = registry.upload_blob(
                    str(path),
                    container,
                    {"mediaType": media_type, "digest": digest, "size": blob_size},
                    do_chunked=chunked,
                    chunk_size=CHUNK_BYTES,
                )
                registry.check(response, f"the upload of blob {digest} to {ref.repository}")
        except ValueError as exc:  # oras's own complaints (no upload session, a failed chunk)
            raise OciError(f"registry {ref.host} refused a blob upload: {exc}", permanent=True) from None
    url = f"{registry.prefix}://{container.manifest_url(ref.reference)}"
    response = registry.do_request(url, "PUT", data=manifest, headers={"Content-Type": MANIFEST_MEDIA_TYPE})
    registry.check(response, f"the manifest PUT for {ref}")
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    reported = response.headers.get("Docker-Content-Digest")
    if reported and reported != digest:
        raise OciError(f"registry {ref.host} stored the manifest as {reported}, expected {digest}", permanent=False)
    log.info("pushed %s (%s)", ref, digest)
    return Pushed(reference=ref, digest=digest, size_bytes=size, manifest=json.loads(manifest))


# ------------------------------------------------------------------------------------- pull


@dataclass(frozen=True, slots=True)
class Pulled:
    """What a pull put in the target folder."""

    reference: Reference
    digest: str
    files: tuple[str, ...]
    size_bytes: int


_TAR_MEDIA_TYPES: Final = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
)


def fetch_manifest(registry: RegistryClient, ref: Reference) -> tuple[dict[str, Any], str]:
    """The manifest that ``ref`` names and its digest (checked against ``ref``'s digest when it has one)."""
    container = registry.container(ref)
    accept = ", ".join([MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST_MEDIA_TYPE, *INDEX_MEDIA_TYPES])
    response = registry.do_request(
        f"{registry.prefix}://{container.manifest_url(ref.reference)}", "GET", headers={"Accept": accept}
    )
    if response.status_code == 404:
        raise OciError(
            f"{ref} does not exist (registry {ref.host} answered 404); check the repository and tag", permanent=True
        )
    registry.check(response, f"the manifest GET for {ref}")
    body = response.content
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.digest and ref.digest != digest:
        raise OciError(f"{ref}: the registry sent a manifest whose digest is {digest}", permanent=True)
    try:
        manifest = json.loads(body)
    except ValueError:
        raise OciError(f"{ref}: the manifest is not JSON", permanent=True) from None
    media_type = manifest.get("mediaType") or response.headers.get("Content-Type", "")
    if media_type in INDEX_MEDIA_TYPES or "manifests" in manifest:
        raise OciError(
            f"{ref} is an image index (several platforms); kubetune pull reads a single image or artifact manifest",
            permanent=True,
        )
    if not isinstance(manifest.get("layers"), list):
        raise OciError(f"{ref}: the manifest lists no layers", permanent=True)
    return manifest, digest


def _download(registry: RegistryClient, ref: Reference, layer: Mapping[str, Any], target: Path) -> None:
    digest = str(layer.get("digest", ""))
    if not re.fullmatch(r"sha256:[a-f0-9]{64}", digest):
        raise OciError(f"{ref}: a layer has an unsupported digest {digest!r} (only sha256)", permanent=True)
    url = f"{registry.prefix}://{registry.container(ref).get_blob_url(digest)}"
    response = registry.do_request(url, "GET", stream=True)
    registry.check(response, f"the GET of blob {digest}")
    sha = hashlib.sha256()
    size = 0
    try:
        with open(target, "wb") as out:
            for chunk in response.iter_content(chunk_size=1 << 20):
                sha.update(chunk)
                size += len(chunk)
                out.write(chunk)
    except requests.exceptions.RequestException as exc:
        raise OciError(
            f"the download of {digest} from {ref.host} broke off ({short_reason(exc)})", permanent=False
        ) from None
    finally:
        response.close()
    if "sha256:" + sha.hexdigest() != digest:
        raise OciError(
            f"{ref}: blob {digest} arrived with digest sha256:{sha.hexdigest()} ({size} bytes)", permanent=False
        )


def _safe_relative(name: str) -> PurePosixPath | None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def pull(ref: Reference, into: Path, *, credentials: Credentials | None, credential_source: str) -> Pulled:
    """Pull ``ref`` so that its files (the ``data/`` folder's content, when it has one) end up directly in ``into``.

    Files already in ``into`` with the same names are replaced; others are left alone. The layers
    are downloaded, checked against their digests and unpacked in a hidden folder inside ``into``
    first, so that an interrupted pull leaves nothing half-written under a final name.
    """
    registry = RegistryClient(ref.host, credentials, credential_source=credential_source)
    manifest, digest = fetch_manifest(registry, ref)
    into.mkdir(parents=True, exist_ok=True)
    for stale in into.glob(".kubetune-pull-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".kubetune-pull-", dir=into))
    try:
        root = staging / "root"
        root.mkdir()
        for index, layer in enumerate(manifest["layers"]):
            if not isinstance(layer, dict):
                raise OciError(f"{ref}: layer {index} is not an object", permanent=True)
            media_type = str(layer.get("mediaType", ""))
            title = str((layer.get("annotations") or {}).get(TITLE_ANNOTATION, ""))
            blob = staging / f"blob-{index}"
            if media_type in _TAR_MEDIA_TYPES:
                _download(registry, ref, layer, blob)
                with tarfile.open(blob, "r:*") as tar:
                    tar.extractall(root, filter="data")
            elif media_type.endswith("+zstd"):
                raise OciError(
                    f"{ref}: layer {index} is zstd-compressed, which kubetune pull cannot unpack", permanent=True
                )
            elif title:
                relative = _safe_relative(title)
                if relative is None:
                    raise OciError(f"{ref}: layer {index} has the unsafe title {title!r}", permanent=True)
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                _download(registry, ref, layer, root / relative)
            else:
                log.info("skipping layer %d of %s (%s, no title)", index, ref, media_type)
            blob.unlink(missing_ok=True)
        source = root / DATA_DIR if (root / DATA_DIR).is_dir() else root
        names = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
        if not names:
            raise OciError(f"{ref} holds no files", permanent=True)
        size = sum((source / name).stat().st_size for name in names)
        move_into(source, into)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("pulled %s (%s): %d files into %s", ref, digest, len(names), into)
    return Pulled(reference=ref, digest=digest, files=tuple(names), size_bytes=size)
