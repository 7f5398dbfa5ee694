"""The hostile-input corpus: sources, datasets, registry answers and requests made to hurt the trainer image.

Each ``*.yaml`` file here is one case. Its first line is a comment saying what the input is and
why it is hostile; ``harness`` names how it is run, the keys beside it describe the input (big
inputs are generated at test time from a size, never committed), and ``expect`` says what must
come of it: ``exit`` (the command's exit code; 2 is permanent) or ``status`` (an HTTP status),
and ``message``, words the reason must contain. The harnesses:

- ``data``: the dataset loader reads ``dataset`` (tests/unit/test_hostile.py);
- ``source``: ``kubetune_trainer.fetch.locate`` places ``uri`` among the claims and ConfigMaps of
  ``files``/``links``; exit 2 means a problem naming ``expect.field`` (tests/unit/test_hostile.py);
- ``fetch-model``: ``kubetune fetch-model`` fetches ``uri`` (tests/unit/test_hostile.py); with
  ``s3`` (``bucket``, ``objects``: key → body, ``archive_key`` for the generated ``archive``) the
  objects are put on a real S3 server on loopback (moto) whose keys the model's secretRef holds;
- ``pull``: ``kubetune pull`` reads ``registry`` from a hostile registry on 127.0.0.1 (:class:`HostileRegistry`);
- ``serve``: ``kubetune serve``'s HTTP layer answers ``body`` (tests/unit/test_hostile.py);
- ``train``: a real ``kubetune train`` (tests/trainer/test_hostile.py).

This module loads the cases and builds their inputs.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import io
import json
import os
import re
import tarfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

FOLDER: Final = Path(__file__).resolve().parent
HARNESSES: Final = ("data", "source", "fetch-model", "pull", "serve", "train")
#: The repository and tag every pull case asks the hostile registry for.
REPOSITORY: Final = "team/hostile"
TAG: Final = "v1"
TAR_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class HostileCase:
    """One case of the corpus."""

    name: str
    why: str
    harness: str
    spec: dict[str, Any]
    expect: dict[str, Any]

    @property
    def exit(self) -> int | None:
        code = self.expect.get("exit")
        return int(code) if code is not None else None

    @property
    def messages(self) -> list[str]:
        """The words the reason must contain: one of these, when ``expect.message`` lists several."""
        message = self.expect.get("message", "")
        return [str(m) for m in message] if isinstance(message, list) else [str(message)]

    def assert_reason(self, reason: str) -> None:
        """Fail unless ``reason`` contains one of :attr:`messages`."""
        assert any(m in reason for m in self.messages), f"{self.name}: none of {self.messages} in {reason!r}"


def load_hostile(*harnesses: str) -> list[HostileCase]:
    """The cases of the corpus run by ``harnesses`` (all of them when none is named)."""
    cases = []
    for path in sorted(FOLDER.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        first = text.splitlines()[0]
        assert first.startswith("# "), f"{path.name}: the first line must be '# <what and why>'"
        document = yaml.safe_load(text)
        assert isinstance(document, dict), path
        harness = document.pop("harness")
        expect = document.pop("expect")
        assert harness in HARNESSES, f"{path.name}: unknown harness {harness!r}"
        assert isinstance(expect, dict), path
        assert "exit" in expect or "status" in expect, f"{path.name}: expect.exit or expect.status is required"
        assert expect.get("message"), f"{path.name}: expect.message is required"
        if not harnesses or harness in harnesses:
            cases.append(HostileCase(path.stem, first[2:], harness, document, expect))
    return cases


# ------------------------------------------------------------------------------------ files


def fill(tmp: Path, text: str) -> str:
    """``text`` with ``{tmp}`` replaced by the test's folder."""
    return text.replace("{tmp}", str(tmp))


def build_files(tmp: Path, spec: Mapping[str, Any]) -> None:
    """Write ``spec['files']`` (path → text) and make ``spec['links']`` (path → link target) under ``tmp``."""
    for name, content in (spec.get("files") or {}).items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fill(tmp, str(content)), encoding="utf-8")
    for name, target in (spec.get("links") or {}).items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(fill(tmp, str(target)))


def mounts_of(tmp: Path) -> dict[str, Any]:
    """TrainerConfig mounts for ``tmp``: each folder of ``claims/`` a claim, of ``configmaps/`` a ConfigMap."""

    def folders(parent: Path) -> dict[str, str]:
        return {p.name: str(p) for p in sorted(parent.iterdir()) if p.is_dir()} if parent.is_dir() else {}

    return {
        "output": str(tmp / "out"),
        "claims": folders(tmp / "claims"),
        "configMaps": folders(tmp / "configmaps"),
    }


def build_dataset(folder: Path, spec: Mapping[str, Any]) -> Path:
    """The dataset file that ``spec`` describes, written into ``folder``.

    Keys: ``name``; ``lines`` (written first, one per line); then at most one generated line:
    ``long_line`` (a JSON object line of that many bytes), ``deep`` (a value nested that deep),
    ``digits`` (an integer of that many digits); ``rows`` (that many small example lines).
    """
    path = folder / str(spec.get("name", "train.jsonl"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for line in spec.get("lines") or []:
            out.write(str(line).encode() + b"\n")
        if "long_line" in spec:
            size = int(spec["long_line"])
            head, tail = b'{"text": "', b'"}\n'
            out.write(head)
            chunk = b"a" * (1 << 20)
            left = size - len(head) - len(tail)
            while left > 0:
                out.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
            out.write(tail)
        if "deep" in spec:
            depth = int(spec["deep"])
            out.write(b'{"text": ' + b"[" * depth + b"]" * depth + b"}\n")
        if "digits" in spec:
            out.write(b'{"text": 1' + b"0" * (int(spec["digits"]) - 1) + b"}\n")
        for index in range(int(spec.get("rows", 0))):
            out.write(b'{"text": "example %d"}\n' % index)
    return path


# ---------------------------------------------------------------------------------- images


class _Zeros:
    """``size`` zero bytes as a readable stream (the body of a gzip bomb)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return b"\0" * size


def tar_layer(entries: list[Mapping[str, Any]], *, zeros: int = 0) -> bytes:
    """A gzipped tar of ``entries`` (``name`` with ``body``, ``symlink`` or ``hardlink``), then a file of ``zeros`` zero bytes."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w|") as tar,
    ):
        for entry in entries:
            info = tarfile.TarInfo(str(entry["name"]))
            if "symlink" in entry:
                info.type, info.linkname = tarfile.SYMTYPE, str(entry["symlink"])
                tar.addfile(info)
            elif "hardlink" in entry:
                info.type, info.linkname = tarfile.LNKTYPE, str(entry["hardlink"])
                tar.addfile(info)
            else:
                body = str(entry.get("body", "")).encode()
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        if zeros:
            info = tarfile.TarInfo("data/zeros.safetensors")
            info.size = zeros
            tar.addfile(info, _Zeros(zeros))
    return buffer.getvalue()


def digest_of(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


@dataclass
class Image:
    """What the hostile registry answers: the manifest's bytes, the blobs by digest, and how to send them."""

    manifest: bytes
    blobs: dict[str, bytes]
    content_length: bool = True


def build_image(spec: Mapping[str, Any]) -> Image:
    """The image that a case's ``registry`` section describes.

    Keys: ``manifest`` (the manifest's text, sent as is); ``manifest_depth`` (a manifest of arrays
    nested that deep); ``manifest_padding`` (an annotation of that many bytes); ``layers``, each with
    ``entries`` (see :func:`tar_layer`), ``zeros``, ``random`` (that many random bytes instead of a
    tar), ``media`` (default tar+gzip), ``declared_size`` (what the descriptor says instead of the
    blob's size) and ``repeat`` (the layer listed that many times); ``content_length: false`` sends
    blobs without a Content-Length.
    """
    if "manifest" in spec:
        return Image(str(spec["manifest"]).encode(), {})
    if "manifest_depth" in spec:
        depth = int(spec["manifest_depth"])
        return Image(b"[" * depth + b"]" * depth, {})
    blobs: dict[str, bytes] = {}
    layers: list[dict[str, Any]] = []
    for layer in spec.get("layers") or []:
        if "random" in layer:
            blob = os.urandom(int(layer["random"]))
        else:
            blob = tar_layer(list(layer.get("entries") or []), zeros=int(layer.get("zeros", 0)))
        digest = digest_of(blob)
        blobs[digest] = blob
        descriptor = {
            "mediaType": str(layer.get("media", TAR_GZIP)),
            "digest": digest,
            "size": int(layer.get("declared_size", len(blob))),
            "annotations": {"org.opencontainers.image.title": "data"},
        }
        layers.extend([descriptor] * int(layer.get("repeat", 1)))
    config = b"{}"
    blobs[digest_of(config)] = config
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config), "size": 2},
        "layers": layers,
    }
    if "manifest_padding" in spec:
        manifest["annotations"] = {"padding": "x" * int(spec["manifest_padding"])}
    return Image(json.dumps(manifest).encode(), blobs, content_length=bool(spec.get("content_length", True)))


class HostileRegistry:
    """A registry on 127.0.0.1 that answers with whatever :class:`Image` it is given; nothing else is reachable."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.requests: list[str] = []
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                registry.requests.append(self.path)
                image = registry.image
                manifest = re.fullmatch(rf"/v2/{REPOSITORY}/manifests/[^/]+", self.path)
                blob = re.fullmatch(rf"/v2/{REPOSITORY}/blobs/(sha256:[0-9a-f]+)", self.path)
                if self.path == "/v2/":
                    self._send(200, b"{}", "application/json", length=True)
                elif manifest:
                    self._send(200, image.manifest, MANIFEST, length=True)
                elif blob and blob.group(1) in image.blobs:
                    self._send(200, image.blobs[blob.group(1)], "application/octet-stream", length=image.content_length)
                else:
                    self._send(
                        404, b'{"errors": [{"code": "NOT_FOUND", "message": "no"}]}', "application/json", length=True
                    )

            def _send(self, status: int, body: bytes, kind: str, *, length: bool) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client stopped reading
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def reference(self) -> str:
        return f"oci://{self.host}/{REPOSITORY}:{TAG}"

    @contextmanager
    def running(self) -> Iterator[HostileRegistry]:
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
