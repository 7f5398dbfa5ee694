"""Pushing an adapter image to a registry, and pulling an image or artifact back into a folder.

``push`` uploads the layer and the config as blobs (chunked above :data:`CHUNK_BYTES`), then the
manifest, in the layout of :mod:`.layout`, and checks the digest the registry reports. ``pull``
reads that layout, plain ``oras push`` artifacts and container images: a layer with an
``org.opencontainers.image.title`` is a file of that name, as ``oras pull`` has it (``oras push``
gives files the plain tar media type), unless it is a compressed tar or ``io.deis.oras.content.unpack``
marks it as a tar to unpack (a folder); untitled tar layers (a container image's) are unpacked; when
the result has a ``data/`` folder, its content is what lands in the target folder.

A registry is not trusted to be honest. ``pull`` refuses, permanently:

- a manifest above :data:`MAX_MANIFEST_BYTES` (4 MiB, what registries themselves accept), one that
  is not a JSON object, and one with more than :data:`MAX_LAYERS` (32) layers (an adapter image
  has one; an artifact pushed file by file has one per file);
- a layer whose descriptor has no usable ``size``, a blob whose body is larger than that size (it
  stops reading there and writes nothing past it), and layers whose sizes add up to more than
  ``$KUBETUNE_MAX_UNPACKED_BYTES`` (see :mod:`kubetune_trainer.archive`);
- a tar layer that :func:`kubetune_trainer.archive.unpack` refuses: one that unpacks to more than
  its bound (a gzip bomb), holds too many entries, or a symbolic or hard link that leads out of its
  folder (``data/up -> ..``), or that is not a readable tar at all;
- a result with a symbolic link that leads outside the folder whose content is pulled.

A blob that arrives short (the connection broke) or with another digest is retryable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import requests

from kubetune_trainer.archive import ArchiveError, escaping_links, human, max_unpacked_bytes, unpack, unpacked_limit
from kubetune_trainer.folders import move_into
from kubetune_trainer.oci.client import OciError, RegistryClient, short_reason
from kubetune_trainer.oci.credentials import Credentials
from kubetune_trainer.oci.layout import (
    CONFIG_MEDIA_TYPE,
    DATA_DIR,
    DOCKER_MANIFEST_MEDIA_TYPE,
    INDEX_MEDIA_TYPES,
    LAYER_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    TITLE_ANNOTATION,
    UNPACK_ANNOTATION,
    build_layer,
    image_config,
    image_manifest,
)
from kubetune_trainer.oci.reference import Reference

log = logging.getLogger("kubetune.oci")

#: Layers above this size are uploaded in chunks of this size (oras reads a plain upload into memory).
CHUNK_BYTES: Final = 64 << 20
#: Largest manifest read: registries accept manifests of at least 4 MiB, and kubetune's are a few KiB.
MAX_MANIFEST_BYTES: Final = 4 << 20
#: Most layers a pulled manifest may list.
MAX_LAYERS: Final = 32


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


def _read_manifest(response: requests.Response, ref: Reference) -> bytes:
    too_big = OciError(
        f"{ref}: the registry sent a manifest larger than {human(MAX_MANIFEST_BYTES)}; refused", permanent=True
    )
    length = response.headers.get("Content-Length", "")
    if length.strip().isdigit() and int(length) > MAX_MANIFEST_BYTES:
        raise too_big
    body = bytearray()
    try:
        for chunk in response.iter_content(chunk_size=64 << 10):
            body += chunk
            if len(body) > MAX_MANIFEST_BYTES:
                raise too_big
    except requests.exceptions.RequestException as exc:
        raise OciError(
            f"the download of the manifest of {ref} broke off ({short_reason(exc)})", permanent=False
        ) from None
    return bytes(body)


def fetch_manifest(registry: RegistryClient, ref: Reference) -> tuple[dict[str, Any], str]:
    """The manifest that ``ref`` names and its digest (checked against ``ref``'s digest when it has one).

    Its layers are checked as far as they can be before a download: at most :data:`MAX_LAYERS`,
    each an object with a media type, a sha256 digest and a size.
    """
    container = registry.container(ref)
    accept = ", ".join([MANIFEST_MEDIA_TYPE, DOCKER_MANIFEST_MEDIA_TYPE, *INDEX_MEDIA_TYPES])
    response = registry.do_request(
        f"{registry.prefix}://{container.manifest_url(ref.reference)}", "GET", headers={"Accept": accept}, stream=True
    )
    try:
        if response.status_code == 404:
            raise OciError(
                f"{ref} does not exist (registry {ref.host} answered 404); check the repository and tag",
                permanent=True,
            )
        registry.check(response, f"the manifest GET for {ref}")
        body = _read_manifest(response, ref)
    finally:
        response.close()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.digest and ref.digest != digest:
        raise OciError(f"{ref}: the registry sent a manifest whose digest is {digest}", permanent=True)
    try:
        manifest = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, a number of thousands of digits, nesting too deep
        raise OciError(f"{ref}: the manifest is not JSON", permanent=True) from None
    if not isinstance(manifest, dict):
        raise OciError(
            f"{ref}: the manifest is a JSON {type(manifest).__name__}, not an object; the registry sent no image manifest",
            permanent=True,
        )
    media_type = manifest.get("mediaType") or response.headers.get("Content-Type", "")
    if media_type in INDEX_MEDIA_TYPES or "manifests" in manifest:
        raise OciError(
            f"{ref} is an image index (several platforms); kubetune pull reads a single image or artifact manifest",
            permanent=True,
        )
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise OciError(f"{ref}: the manifest lists no layers", permanent=True)
    if len(layers) > MAX_LAYERS:
        raise OciError(
            f"{ref}: the manifest lists {len(layers)} layers, more than the {MAX_LAYERS} kubetune pull reads "
            "(an adapter image has one)",
            permanent=True,
        )
    for index, layer in enumerate(layers):
        _check_descriptor(ref, index, layer)
    return manifest, digest


def _check_descriptor(ref: Reference, index: int, layer: Any) -> None:
    if not isinstance(layer, dict):
        raise OciError(f"{ref}: layer {index} is not an object", permanent=True)
    digest = layer.get("digest")
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[a-f0-9]{64}", digest):
        raise OciError(f"{ref}: layer {index} has an unsupported digest {digest!r} (only sha256)", permanent=True)
    size = layer.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise OciError(f"{ref}: layer {index} has no size in bytes (found {size!r})", permanent=True)
    if not isinstance(layer.get("mediaType", ""), str):
        raise OciError(f"{ref}: layer {index} has a mediaType that is not a string", permanent=True)
    annotations = layer.get("annotations")
    if annotations is not None and not (
        isinstance(annotations, dict) and all(isinstance(v, str) for v in annotations.values())
    ):
        raise OciError(f"{ref}: the annotations of layer {index} are not an object of strings", permanent=True)


def _download(registry: RegistryClient, ref: Reference, layer: Mapping[str, Any], target: Path) -> None:
    """Download the blob of ``layer`` (a checked descriptor) into ``target``, never past its ``size``."""
    digest = str(layer["digest"])
    expected = int(layer["size"])
    url = f"{registry.prefix}://{registry.container(ref).get_blob_url(digest)}"
    response = registry.do_request(url, "GET", stream=True)
    too_big = OciError(
        f"{ref}: the registry sent more than the {expected:,} bytes that the manifest gives for blob {digest}; refused",
        permanent=True,
    )
    sha = hashlib.sha256()
    size = 0
    try:
        registry.check(response, f"the GET of blob {digest}")
        length = response.headers.get("Content-Length", "")
        identity = response.headers.get("Content-Encoding", "identity").strip().lower() in ("", "identity")
        if identity and length.strip().isdigit() and int(length) > expected:
            raise too_big
        with open(target, "wb") as out:
            for chunk in response.iter_content(chunk_size=1 << 20):
                if size + len(chunk) > expected:
                    raise too_big
                sha.update(chunk)
                size += len(chunk)
                out.write(chunk)
    except requests.exceptions.RequestException as exc:
        raise OciError(
            f"the download of {digest} from {ref.host} broke off ({short_reason(exc)})", permanent=False
        ) from None
    finally:
        response.close()
    if size < expected:
        raise OciError(
            f"the download of {digest} from {ref.host} broke off after {size:,} of {expected:,} bytes", permanent=False
        )
    if "sha256:" + sha.hexdigest() != digest:
        raise OciError(
            f"{ref}: blob {digest} arrived with digest sha256:{sha.hexdigest()} ({size} bytes)", permanent=False
        )


def _safe_relative(name: str) -> PurePosixPath | None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def _pull_layer(  # noqa: PLR0917 - the pull's state, passed along
    registry: RegistryClient, ref: Reference, index: int, layer: dict[str, Any], staging: Path, root: Path, budget: int
) -> int:
    """Download layer ``index`` and unpack or place it under ``root``; return the bytes it added (at most ``budget``)."""
    media_type = str(layer.get("mediaType", ""))
    title = str((layer.get("annotations") or {}).get(TITLE_ANNOTATION, ""))
    size = int(layer["size"])
    blob = staging / f"blob-{index}"
    # `oras push` gives a file the plain tar media type and its name as title: such a layer, not
    # marked for unpacking, is a file. Compressed tar layers and untitled ones are unpacked.
    titled_file = (
        bool(title)
        and not media_type.endswith("+gzip")
        and (layer.get("annotations") or {}).get(UNPACK_ANNOTATION) != "true"
    )
    try:
        if media_type in _TAR_MEDIA_TYPES and not titled_file:
            _download(registry, ref, layer, blob)
            try:
                return unpack(blob, root, limit=min(unpacked_limit(size), budget), name=f"layer {index} of {ref}")
            except ArchiveError as exc:
                raise OciError(f"{exc}; refused", permanent=True) from None
        if media_type.endswith("+zstd"):
            raise OciError(
                f"{ref}: layer {index} is zstd-compressed, which kubetune pull cannot unpack", permanent=True
            )
        if title:
            relative = _safe_relative(title)
            if relative is None:
                raise OciError(f"{ref}: layer {index} has the unsafe title {title!r}", permanent=True)
            destination = root / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if not destination.parent.resolve().is_relative_to(root.resolve()) or destination.is_symlink():
                raise OciError(
                    f"{ref}: layer {index} ({title!r}) would be written through a symbolic link; refused",
                    permanent=True,
                )
            _download(registry, ref, layer, destination)
            return size
        log.info("skipping layer %d of %s (%s, no title)", index, ref, media_type)
        return 0
    finally:
        blob.unlink(missing_ok=True)


def pull(ref: Reference, into: Path, *, credentials: Credentials | None, credential_source: str) -> Pulled:
    """Pull ``ref`` so that its files (the ``data/`` folder's content, when it has one) end up directly in ``into``.

    Files already in ``into`` with the same names are replaced; others are left alone. The layers
    are downloaded, checked against their digests and unpacked in a hidden folder inside ``into``
    first, so that an interrupted pull leaves nothing half-written under a final name.
    """
    registry = RegistryClient(ref.host, credentials, credential_source=credential_source)
    manifest, digest = fetch_manifest(registry, ref)
    try:
        budget = max_unpacked_bytes()
    except ArchiveError as exc:
        raise OciError(str(exc), permanent=True) from None
    declared = sum(int(layer["size"]) for layer in manifest["layers"])
    if declared > budget:
        raise OciError(
            f"{ref}: its layers hold {human(declared)}, more than the {human(budget)} a pull may "
            "(raise $KUBETUNE_MAX_UNPACKED_BYTES for larger images)",
            permanent=True,
        )
    into.mkdir(parents=True, exist_ok=True)
    for stale in into.glob(".kubetune-pull-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".kubetune-pull-", dir=into))
    try:
        root = staging / "root"
        root.mkdir()
        for index, layer in enumerate(manifest["layers"]):
            budget -= _pull_layer(registry, ref, index, layer, staging, root, budget)
        source = root / DATA_DIR if (root / DATA_DIR).is_dir() else root
        if source.is_symlink():
            raise OciError(f"{ref}: its {DATA_DIR} folder is a symbolic link; refused", permanent=True)
        escaping = escaping_links(source, source.resolve())
        if escaping:
            raise OciError(f"{ref} holds symbolic links that lead out of it: {'; '.join(escaping)}", permanent=True)
        names = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
        if not names:
            raise OciError(f"{ref} holds no files", permanent=True)
        size = sum((source / name).stat().st_size for name in names)
        move_into(source, into)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("pulled %s (%s): %d files into %s", ref, digest, len(names), into)
    return Pulled(reference=ref, digest=digest, files=tuple(names), size_bytes=size)
