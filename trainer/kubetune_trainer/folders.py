"""The published files of a folder, their digest, and moving or copying them into place.

The digest of a folder is the sha256 of the text made of one line ``<sha256 of the file>  <path>\\n``
per file, sorted by path (relative, ``/``-separated; hidden files are not published): what
``(cd DIR && find . -type f | sed 's|^./||' | LC_ALL=C sort | xargs -d '\\n' sha256sum) | sha256sum``
prints.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Final

_COPY_CHUNK: Final = 1 << 20


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


def copy_hashing(source: Path, target: Path) -> str:
    sha = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(_COPY_CHUNK):
            sha.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return sha.hexdigest()


def move_into(source: Path, into: Path) -> None:
    """Move each entry of ``source`` into ``into``, replacing same-named entries there (others stay)."""
    for entry in sorted(source.iterdir()):
        target = into / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
