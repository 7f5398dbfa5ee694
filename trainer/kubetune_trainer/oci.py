"""Push a folder to an OCI registry as a Kaito-compatible adapter image, and pull one back.

Torch-free: this runs in the short publish pod and in the serving pod's init container. The
registry transport is the ``oras`` package's (blob uploads, chunked for large layers); credentials,
retries and error mapping are kubetune's own, so that every failure is either *permanent* (bad
credentials, a refused reference) or *retryable* (the registry cannot be reached, or answers 5xx).

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
  spec's model source) and ``io.kubetune.method``, when known. No timestamp, for the reason above.

``pull`` reads this layout and also plain ``oras push`` artifacts: tar layers are unpacked, other
layers are written under their ``org.opencontainers.image.title``; when the result has a ``data/``
folder, its content is what lands in the target folder.

Transport rules: plain HTTP only for loopback registries (``localhost``, 127.0.0.0/8, ``::1``),
HTTPS (certificates verified) for every other host. Credentials come from a Docker config
(``.dockerconfigjson``: ``auths[host].auth``, base64 ``user:password``, or ``username`` and
``password``) and are sent as HTTP basic credentials, or exchanged for a bearer token at the realm
the registry names; they never appear in a message or a log line.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final, Protocol

import oras.container
import oras.defaults
import oras.provider
import requests

from kubetune_api import parse_uri

log = logging.getLogger("kubetune.oci")

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

#: Layers above this size are uploaded in chunks of this size (oras reads a plain upload into memory).
CHUNK_BYTES: Final = 64 << 20
_GZIP_LEVEL: Final = 1  # safetensors barely compress; level 1 is several times faster than 9
_CONNECT_TIMEOUT_S: Final = 15.0
_READ_TIMEOUT_S: Final = 300.0
#: Tries of one request when the registry cannot be reached or answers 5xx/429, and the pause before each retry.
ATTEMPTS: Final = 3
_BACKOFF_S: Final = 1.0
_DOCKER_HUB: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


class OciError(Exception):
    """A push or pull failed: ``permanent`` when retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class OciAuthError(OciError):
    """The registry refused the request (401 or 403); always permanent."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, permanent=True)
        self.status = status


# ------------------------------------------------------------------------------- references


@dataclass(frozen=True, slots=True)
class Reference:
    """``oci://host[:port]/repository[:tag][@sha256:…]``, parsed."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, uri: str) -> Reference:
        """Parse an ``oci://`` URI; raise ``ValueError`` naming the expected form."""
        parsed = parse_uri(uri, ("oci",))
        rest, _, digest = parsed.path.partition("@")
        repository, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
        return cls(host=parsed.authority, repository=repository, tag=tag or None, digest=digest or None)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest, else the tag, else ``latest``."""
        return self.digest or self.tag or oras.defaults.default_tag

    def with_tag(self) -> Reference:
        """This reference with ``latest`` spelled out when it names neither tag nor digest."""
        return self if self.tag or self.digest else Reference(self.host, self.repository, oras.defaults.default_tag)

    def __str__(self) -> str:
        text = f"oci://{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (``name``, ``name:port``, ``[v6]:port`` or a bare IPv6 address) is this machine.

    Only ``localhost`` and literal loopback addresses count; names are not resolved, so DNS cannot
    turn a remote registry into a plain-HTTP one.
    """
    name = host
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def scheme_for(host: str) -> str:
    """``http`` for a loopback registry, ``https`` for any other."""
    return "http" if is_loopback_host(host) else "https"


# ------------------------------------------------------------------------------ credentials


@dataclass(frozen=True, slots=True)
class Credentials:
    """A registry user name and password (or token); the password is never shown."""

    username: str
    password: str = field(repr=False)

    @property
    def basic(self) -> str:
        """The value of an ``Authorization: Basic`` header."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def parse_docker_config(text: str) -> dict[str, Any]:
    """The ``auths`` map of a Docker config (``.dockerconfigjson``, or a legacy ``.dockercfg``); ``ValueError`` if malformed."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(document, dict):
        raise ValueError("is not a JSON object")
    if "auths" in document:
        auths = document["auths"]
    else:  # a legacy .dockercfg: the registries at the top level
        auths = {k: v for k, v in document.items() if isinstance(v, dict) and ("auth" in v or "username" in v)}
    if not isinstance(auths, dict):
        raise ValueError("has an 'auths' that is not an object")
    return auths


def _registry_key(key: str) -> str:
    """A Docker config key (``https://host:port/v1/``, ``host``…) as ``host[:port]``, lower-case."""
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc or key
    return key.split("/", 1)[0].lower()


def credentials_for(auths: Mapping[str, Any], host: str) -> Credentials | None:
    """The credentials that ``auths`` (a Docker config's) holds for ``host``, or ``None``.

    Raise ``ValueError`` (naming the entry, never its content) when the entry exists but holds no
    usable user name and password.
    """
    wanted = {host.lower()} | (set(_DOCKER_HUB) if host.lower() in _DOCKER_HUB else set())
    for key, entry in auths.items():
        if _registry_key(str(key)) not in wanted:
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"auths[{key!r}] is not an object")
        username, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise ValueError(f"auths[{key!r}].auth is not base64 of 'user:password'") from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise ValueError(f"auths[{key!r}].auth does not decode to 'user:password'")
        if isinstance(username, str) and isinstance(password, str) and username and password:
            return Credentials(username, password)
        raise ValueError(f"auths[{key!r}] has neither 'auth' nor 'username' and 'password'")
    return None


def load_credentials(path: Path, host: str) -> Credentials | None:
    """The credentials for ``host`` in the Docker config file ``path``; ``ValueError`` naming the problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return credentials_for(parse_docker_config(text), host)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------------- client


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` as ``("bearer", {"realm": …, "service": …})``."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {k.lower(): v for k, v in re.findall(r'([A-Za-z]+)="([^"]*)"', rest)}


def _short(exc: BaseException) -> str:
    """A one-line reason for a connection error, without the library's nested repr."""
    text = str(exc)
    found = re.search(r"\[Errno [-0-9]+\] [^'\")]+|Connection refused|timed out|Name or service not known", text)
    return found.group(0) if found else type(exc).__name__


class RegistryClient(oras.provider.Registry):  # type: ignore[misc]  # oras ships no annotations
    """oras's registry client with kubetune's authentication, timeouts, retries and error mapping."""

    def __init__(self, host: str, credentials: Credentials | None, *, credential_source: str, fix: str = "") -> None:
        super().__init__(hostname=host, insecure=scheme_for(host) == "http", auth_backend="basic")
        self.host = host
        self.credentials = credentials
        self.credential_source = credential_source
        self.fix = fix
        self.authorization: str | None = None
        self.session.headers["User-Agent"] = "kubetune"

    def container(self, ref: Reference) -> oras.container.Container:
        """An oras Container for ``ref`` (set field by field: oras's parser would take ``a.b/c`` for a registry)."""
        container = oras.container.Container("kubetune/placeholder:latest", registry=self.host)
        namespace, _, repository = ref.repository.rpartition("/")
        container.registry = self.host
        container.namespace = namespace or None
        container.repository = repository
        container.tag = ref.tag or oras.defaults.default_tag
        container.digest = ref.digest
        return container

    def do_request(  # noqa: PLR0917 - oras's signature; it passes these positionally
        self,
        url: str,
        method: str = "GET",
        data: Any = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
    ) -> requests.Response:
        """Send one request: authenticate on a 401, retry unreachable and 5xx, raise on 401/403."""
        last: OciError | None = None
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(_BACKOFF_S * attempt)
            try:
                response = self._send(method, url, data=data, headers=dict(headers or {}), json=json, stream=stream)
            except requests.exceptions.SSLError as exc:
                raise OciError(
                    f"TLS with registry {self.host} failed ({_short(exc)}); kubetune speaks HTTPS to every registry "
                    "but a loopback one: give the registry a certificate this pod trusts (REQUESTS_CA_BUNDLE)",
                    permanent=True,
                ) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                last = OciError(
                    f"cannot reach registry {self.host} over {scheme_for(self.host).upper()} ({_short(exc)})",
                    permanent=False,
                )
                continue
            if response.status_code >= 500 or response.status_code == 429:
                last = OciError(
                    f"registry {self.host} answered HTTP {response.status_code} {response.reason} to {method} "
                    f"{urllib.parse.urlsplit(url).path}",
                    permanent=False,
                )
                response.close()
                continue
            if response.status_code in (401, 403):
                raise self._refused(response.status_code)
            return response
        assert last is not None
        raise last

    def _send(
        self, method: str, url: str, *, data: Any, headers: dict[str, str], json: Any, stream: bool
    ) -> requests.Response:
        def send() -> requests.Response:
            if self.authorization:
                headers["Authorization"] = self.authorization
            response: requests.Response = self.session.request(
                method,
                url,
                data=data,
                json=json,
                headers=headers,
                stream=stream,
                verify=self._tls_verify,
                timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S),
            )
            return response

        response = send()
        if response.status_code == 401 and self._authenticate(response):
            response.close()
            response = send()
        return response

    def _authenticate(self, response: requests.Response) -> bool:
        """Set ``authorization`` as the 401's challenge asks; ``False`` when there is nothing new to try."""
        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if self.credentials is None or self.authorization == self.credentials.basic:
                return False
            self.authorization = self.credentials.basic
            return True
        if scheme != "bearer" or not params.get("realm"):
            return False
        realm = params["realm"]
        realm_parts = urllib.parse.urlsplit(realm)
        if realm_parts.scheme != "https" and not is_loopback_host(realm_parts.netloc):
            raise OciError(
                f"registry {self.host} sends clients to the token service {realm_parts.netloc} over plain HTTP; "
                "kubetune sends credentials only over HTTPS",
                permanent=True,
            )
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        token_headers = {"Authorization": self.credentials.basic} if self.credentials else {}
        try:
            answer = self.session.get(
                realm,
                params=query,
                headers=token_headers,
                verify=self._tls_verify,
                timeout=(_CONNECT_TIMEOUT_S, 60.0),
            )
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise OciError(
                f"cannot reach the token service of registry {self.host} ({_short(exc)})", permanent=False
            ) from None
        if answer.status_code in (401, 403):
            raise self._refused(answer.status_code)
        if answer.status_code >= 500:
            raise OciError(
                f"the token service of registry {self.host} answered HTTP {answer.status_code}", permanent=False
            )
        try:
            body = answer.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            return False
        bearer = f"Bearer {token}"
        if bearer == self.authorization:
            return False
        self.authorization = bearer
        return True

    def _refused(self, status: int) -> OciAuthError:
        if self.credentials is None:
            message = (
                f"registry {self.host} asks for credentials (HTTP {status}) and none were given; "
                f"use {self.credential_source} with an entry for {self.host}"
            )
            if self.fix:
                message += f"; {self.fix}"
        elif status == 401:
            message = (
                f"registry {self.host} refused the credentials of user {self.credentials.username!r} from "
                f"{self.credential_source} (HTTP 401); fix the user name and password for {self.host} there"
            )
            if self.fix:
                message += f"; {self.fix}"
        else:
            message = (
                f"registry {self.host} denied user {self.credentials.username!r} from {self.credential_source} "
                f"(HTTP 403); grant that user access to the repository, or use credentials that have it"
            )
        return OciAuthError(message, status=status)

    def check(self, response: requests.Response, what: str) -> None:
        """Raise a permanent :class:`OciError` naming ``what`` and the registry's own words unless 2xx."""
        if 200 <= response.status_code < 300:
            return
        detail = ""
        try:
            errors = response.json().get("errors") or []
            detail = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}" for e in errors if isinstance(e, dict))
        except (ValueError, AttributeError):
            detail = response.text[:200]
        raise OciError(
            f"registry {self.host} answered HTTP {response.status_code} {response.reason} to {what}"
            + (f" ({detail})" if detail else ""),
            permanent=True,
        )


# ------------------------------------------------------------------------------------- push


@dataclass(frozen=True, slots=True)
class Pushed:
    """What a push left in the registry."""

    reference: Reference
    digest: str
    """The manifest's digest (``sha256:…``), as the registry reports it in Docker-Content-Digest."""
    size_bytes: int
    """Total size of the published files (uncompressed)."""
    manifest: dict[str, Any]


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
    """Push ``files`` (relative path → file) as the adapter image ``ref``; see the module's docstring."""
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
        raise OciError(f"the download of {digest} from {ref.host} broke off ({_short(exc)})", permanent=False) from None
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


def move_into(source: Path, into: Path) -> None:
    """Move each entry of ``source`` into ``into``, replacing same-named entries there (others stay)."""
    for entry in sorted(source.iterdir()):
        target = into / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
