"""Unpacking tar archives that come from outside (a model archive over https, an image layer), within bounds.

Every archive the trainer image unpacks was made by someone else, so :func:`unpack` reads it as a
stream, never holding more than a read buffer, and refuses with an :class:`ArchiveError` (a
permanent failure: the same bytes fail the same way on every retry):

- more than :data:`MAX_ENTRIES` (100,000) entries;
- more unpacked bytes (headers and padding included) than :func:`unpacked_limit` allows for the
  archive's compressed size: at most :data:`EXPANSION_RATIO` (100) times the compressed size plus
  :data:`EXPANSION_SLACK_BYTES` (64 MiB), so that a gzip bomb is stopped after a few dozen MiB
  whatever it claims to hold, and never more than the maximum of ``$KUBETUNE_MAX_UNPACKED_BYTES``
  (:data:`MAX_UNPACKED_ENV`; default :data:`DEFAULT_MAX_UNPACKED_BYTES`, 32 GiB: a full model in
  16-bit weights of up to 16 billion parameters). Model weights barely compress (a ratio below 2),
  and configs and tokenizers are small, so real archives stay far below both bounds;
- a pax or GNU long-name header above :data:`MAX_HEADER_BYTES` (1 MiB), which tarfile would read
  into memory whole;
- what tarfile's ``data`` filter refuses: absolute names, ``..`` that leaves the target, devices,
  links that point outside the target;
- a symbolic or hard link whose target leaves the top-level folder the link is in (``data/up ->
  ..``; the top-level folder is the content of an adapter image and of a model archive);
- a sparse file, and compression other than gzip, bzip2 and xz.

Nothing here touches the network; callers turn an :class:`ArchiveError` into their own permanent error.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import posixpath
import tarfile
import zlib
from pathlib import Path
from typing import IO, Any, Final, cast

#: Env var holding the most bytes that one archive, or one pull, may unpack to.
MAX_UNPACKED_ENV: Final = "KUBETUNE_MAX_UNPACKED_BYTES"
#: The maximum unpacked size when ``$KUBETUNE_MAX_UNPACKED_BYTES`` is unset: 32 GiB.
DEFAULT_MAX_UNPACKED_BYTES: Final = 32 << 30
#: Unpacked bytes allowed per compressed byte (on top of :data:`EXPANSION_SLACK_BYTES`).
EXPANSION_RATIO: Final = 100
#: Unpacked bytes allowed whatever the compressed size: small archives of text compress well.
EXPANSION_SLACK_BYTES: Final = 64 << 20
#: Entries (files, folders, links) allowed in one archive.
MAX_ENTRIES: Final = 100_000
#: Largest pax or GNU long-name header read (tarfile holds one in memory).
MAX_HEADER_BYTES: Final = 1 << 20

_READ_BYTES: Final = 1 << 20
_LONG_HEADERS: Final = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, b"X")


class ArchiveError(Exception):
    """An archive this trainer will not unpack; retrying cannot change that."""


def max_unpacked_bytes() -> int:
    """The most bytes one archive (or one pull) may unpack to: ``$KUBETUNE_MAX_UNPACKED_BYTES`` or 32 GiB."""
    value = os.environ.get(MAX_UNPACKED_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_UNPACKED_BYTES
    try:
        parsed = int(value)
    except ValueError:
        raise ArchiveError(f"${MAX_UNPACKED_ENV} is {value!r}, not a number of bytes") from None
    if parsed < 1:
        raise ArchiveError(f"${MAX_UNPACKED_ENV} is {parsed}; it must be a positive number of bytes")
    return parsed


def unpacked_limit(compressed_bytes: int) -> int:
    """The most bytes an archive of ``compressed_bytes`` may unpack to (see the module's docstring)."""
    return min(max_unpacked_bytes(), EXPANSION_RATIO * max(compressed_bytes, 0) + EXPANSION_SLACK_BYTES)


def human(size: int) -> str:
    """``size`` bytes as a short readable number (``64 MiB``)."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "bytes" or value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover - the loop returns at GiB


class _Bounded:
    """A read-only stream over ``source`` that refuses to hand out more than ``limit`` bytes in all."""

    def __init__(self, source: IO[bytes], limit: int, name: str) -> None:
        self.source = source
        self.limit = limit
        self.name = name
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > _READ_BYTES:
            size = _READ_BYTES
        chunk = self.source.read(size)
        self.count += len(chunk)
        if self.count > self.limit:
            raise self.too_big()
        return chunk

    def too_big(self) -> ArchiveError:
        """The refusal of an archive that unpacks to more than the limit."""
        return ArchiveError(
            f"{self.name} unpacks to more than {human(self.limit)}, the most it may for its compressed size "
            f"(at most {EXPANSION_RATIO}× that plus {human(EXPANSION_SLACK_BYTES)}, and never above "
            f"${MAX_UNPACKED_ENV}, now {human(max_unpacked_bytes())}); refused as a decompression bomb"
        )


class _CheckedTarInfo(tarfile.TarInfo):
    """A tar header that refuses long-name and pax headers too large to hold in memory."""

    def _proc_member(self, owner: tarfile.TarFile) -> Any:  # tarfile's own hook, called for each header read
        if self.type in _LONG_HEADERS and self.size > MAX_HEADER_BYTES:
            raise ArchiveError(
                f"an extended header of {human(self.size)} (above {human(MAX_HEADER_BYTES)}) at byte {self.offset}"
            )
        return super()._proc_member(owner)  # type: ignore[misc]


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return cast("IO[bytes]", gzip.GzipFile(fileobj=raw, mode="rb"))
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw, mode="rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(raw, mode="rb")
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        raise ArchiveError("it is zstd-compressed, which kubetune cannot unpack; use gzip")
    return raw


def link_problem(member: tarfile.TarInfo) -> str | None:
    """Why the link ``member`` may not be unpacked (its target leaves its top-level folder), or ``None``."""
    if not (member.issym() or member.islnk()):
        return None
    name = posixpath.normpath(member.name.lstrip("/"))
    if member.issym():
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
    else:
        target = posixpath.normpath(member.linkname)
    kind = "symbolic" if member.issym() else "hard"
    if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
        return f"{member.name} is a {kind} link to {member.linkname}, outside the archive"
    parts = name.split("/")
    if len(parts) > 1 and not (target == parts[0] or target.startswith(parts[0] + "/")):
        return f"{member.name} is a {kind} link to {member.linkname}, outside its folder {parts[0]}/"
    return None


def _filter(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
    if member.issparse():
        raise ArchiveError(f"{member.name} is a sparse file")
    problem = link_problem(member)
    if problem:
        raise ArchiveError(problem)
    return tarfile.data_filter(member, destination)


def unpack(archive: Path, target: Path, *, limit: int | None = None, name: str | None = None) -> int:
    """Unpack the (optionally compressed) tar ``archive`` into the existing folder ``target``; return its unpacked size.

    ``limit`` defaults to :func:`unpacked_limit` of the archive's size; ``name`` is how messages
    call the archive (its file name by default). Raise :class:`ArchiveError` for anything the
    module's docstring lists, and for a tar that is damaged; ``OSError`` (a full disk) is left as is.
    """
    label = name or archive.name
    bound = unpacked_limit(archive.stat().st_size) if limit is None else limit
    try:
        with open(archive, "rb") as raw:
            stream = _Bounded(_decompressed(raw), bound, label)
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedTarInfo) as tar:  # type: ignore[call-overload]
                for count, member in enumerate(tar, start=1):
                    if count > MAX_ENTRIES:
                        raise ArchiveError(f"{label} holds more than {MAX_ENTRIES:,} entries")
                    if stream.count + member.size > bound:  # refused before a byte of it is written
                        raise stream.too_big()
                    tar.extract(member, target, filter=_filter)
    except ArchiveError as exc:
        message = str(exc)
        raise ArchiveError(message if message.startswith(label) else f"{label}: {message}") from None
    except tarfile.FilterError as exc:
        raise ArchiveError(f"{label}: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as exc:
        raise ArchiveError(f"{label} is not a readable tar archive ({exc or type(exc).__name__})") from None
    except OSError as exc:
        if "Invalid data stream" in str(exc):  # bz2's word for a damaged stream
            raise ArchiveError(f"{label} is not a readable tar archive ({exc})") from None
        raise
    return stream.count


def escaping_links(folder: Path, root: Path, *, limit: int = 5) -> list[str]:
    """Symbolic links under ``folder`` (itself included) whose real target is outside ``root``, described.

    ``root`` must be a real (resolved) path. At most ``limit`` are listed. Links are not followed
    into folders, so a link loop cannot hang the walk.
    """
    found: list[str] = []

    def check(path: Path) -> None:
        try:
            real = path.resolve()
        except (OSError, RuntimeError):  # a link loop
            found.append(f"{path} is a symbolic link that cannot be resolved (a loop?)")
            return
        if not real.is_relative_to(root):
            found.append(f"{path} is a symbolic link to {os.readlink(path)}, which leads to {real}, outside {root}")

    if folder.is_symlink():
        check(folder)
    if not folder.is_dir():
        return found
    for directory, subdirs, names in os.walk(folder):
        for entry in (*subdirs, *names):
            path = Path(directory) / entry
            if path.is_symlink():
                check(path)
                if len(found) >= limit:
                    return found
    return found
