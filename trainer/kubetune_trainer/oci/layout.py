"""The adapter image: its layer (a reproducible tar of the files), its config and its manifest.

Layout of a pushed adapter
==========================

The artifact is a platform-independent OCI *image* in the layout Kaito documents for adapters
(files under ``/data``), which a container runtime can also mount as an image volume:

- manifest: ``application/vnd.oci.image.manifest.v1+json``, schemaVersion 2, no image index.
- config: ``application/vnd.oci.image.config.v1+json``, exactly
  ``{"rootfs":{"type":"layers","diff_ids":["sha256:<digest of the uncompressed tar>"]}}``: no
  ``architecture`` or ``os``, so that any platform accepts it, and ``rootfs.diff_ids`` so that
  containerd can unpack it.
- one layer: ``application/vnd.oci.image.layer.v1.tar+gzip``, a tar of ``data/`` and one entry
  ``data/<relative path>`` per published file (``data/adapter_config.json``,
  ``data/adapter_model.safetensors``, the tokenizer files, ``data/summary.json``), sorted, with
  owner 0:0, mode 0644 (folders 0755) and mtime 0, gzipped with mtime 0: the same files always
  give the same layer, config and manifest digests. Its annotations:

  - ``org.opencontainers.image.title``: ``data``
  - ``io.deis.oras.content.unpack``: ``true`` and ``io.deis.oras.content.digest``: the diff ID,
    so that ``oras pull`` unpacks the layer into ``./data/`` as well;
  - ``io.kubetune.files``: a JSON array of the files' paths in the layer (``["data/adapter_config.json", …]``).
- manifest annotations: ``io.kubetune.job`` (``namespace/name``), ``io.kubetune.base-model`` (the
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final, Protocol

MANIFEST_MEDIA_TYPE: Final = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE: Final = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
INDEX_MEDIA_TYPES: Final = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
DOCKER_MANIFEST_MEDIA_TYPE: Final = "application/vnd.docker.distribution.manifest.v2+json"
TITLE_ANNOTATION: Final = "org.opencontainers.image.title"
UNPACK_ANNOTATION: Final = "io.deis.oras.content.unpack"
UNPACKED_DIGEST_ANNOTATION: Final = "io.deis.oras.content.digest"
FILES_ANNOTATION: Final = "io.kubetune.files"
#: The folder of the image that holds the adapter's files (Kaito's layout).
DATA_DIR: Final = "data"
_GZIP_LEVEL: Final = 1  # safetensors barely compress; level 1 is several times faster than 9


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


class _Hashing:
    """A write-only stream that hashes and counts what passes through to ``target``."""

    def __init__(self, target: _Sink) -> None:
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()


@dataclass(frozen=True, slots=True)
class Layer:
    """A built layer file: its digest and size, and the digest of its uncompressed tar (the diff ID)."""

    path: Path
    digest: str
    size: int
    diff_id: str
    names: tuple[str, ...]


def build_layer(files: Mapping[str, Path], target: Path) -> Layer:
    """Write the gzipped tar of ``files`` (path in the image under ``data/`` → file) to ``target``, reproducibly."""
    names = sorted(files)
    folders = sorted({str(parent) for name in names for parent in PurePosixPath(name).parents if str(parent) != "."})
    with open(target, "wb") as raw:
        compressed = _Hashing(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=_GZIP_LEVEL, mtime=0) as gz:
            uncompressed = _Hashing(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for folder in folders:
                    tar.addfile(_entry(folder, tarfile.DIRTYPE, 0o755, 0))
                for name in names:
                    with open(files[name], "rb") as source:
                        tar.addfile(_entry(name, tarfile.REGTYPE, 0o644, os.fstat(source.fileno()).st_size), source)
    return Layer(
        path=target,
        digest="sha256:" + compressed.sha256.hexdigest(),
        size=compressed.size,
        diff_id="sha256:" + uncompressed.sha256.hexdigest(),
        names=tuple(names),
    )


def _entry(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def image_config(layer: Layer) -> bytes:
    """The image config: only ``rootfs`` (no platform, see the module's docstring)."""
    return json.dumps({"rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}, separators=(",", ":")).encode()


def image_manifest(layer: Layer, config: bytes, annotations: Mapping[str, str]) -> bytes:
    """The manifest of the adapter image, serialized as it is pushed (its sha256 is the image's digest)."""
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": LAYER_MEDIA_TYPE,
                "digest": layer.digest,
                "size": layer.size,
                "annotations": {
                    TITLE_ANNOTATION: DATA_DIR,
                    UNPACK_ANNOTATION: "true",
                    UNPACKED_DIGEST_ANNOTATION: layer.diff_id,
                    FILES_ANNOTATION: json.dumps(list(layer.names), separators=(",", ":")),
                },
            }
        ],
    }
    if annotations:
        manifest["annotations"] = dict(sorted(annotations.items()))
    return json.dumps(manifest, separators=(",", ":")).encode()
