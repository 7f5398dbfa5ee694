"""Turn the spec's source URIs into local files and folders the trainer can open.

Every source is first *located* (a pure step: which mount, which URL, which hub repository and
token) so that problems such as an unmounted claim or a URL that points at a private address are
reported together, before any download starts; only then is it *fetched*. URL sources are
checked against every address their host resolves to and fetched from the checked address, so a
DNS answer that changes between the check and the download cannot reach an internal service.

A ``pvc://`` or ``configmap://`` source must stay inside the folder where its claim or ConfigMap
is mounted: a path whose real location (``..`` and symbolic links resolved) is outside it, or a
folder holding a symbolic link that leads outside it, is refused naming the field and the claim.
Archives (``.tar``, ``.tar.gz``, ``.tgz`` over http(s) or s3) are unpacked within the bounds of
:mod:`kubetune_trainer.archive`, and a download stops once it passes the same maximum size.

An ``s3://bucket/key`` source is one object (a dataset file, a model archive) and
``s3://bucket/prefix/`` every object under the prefix (a model or dataset folder), read with
boto3: credentials from the ``secretRef`` Secret (:data:`S3_REQUIRED_KEYS`, :data:`S3_OPTIONAL_KEYS`), else boto3's default chain
(IRSA, workload identity). A custom endpoint (``AWS_ENDPOINT_URL``) is checked like a URL source,
when located and again before the download, which a plain-http endpoint makes to the checked address.
A folder's keys become paths under the fetched folder only when every segment is a plain name (no
empty, ``.`` or ``..`` segment); its objects number at most :data:`~kubetune_trainer.archive.MAX_ENTRIES`
and, like any one object, add up to at most :func:`~kubetune_trainer.archive.max_unpacked_bytes`.
Objects are written into a staging folder that is renamed into the cache only once complete.

``kubetune train`` fetches the model and the dataset with it while preparing a run, and
``kubetune fetch-model`` the model for the serving pod.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from kubetune_api import TrainerConfig, parse_uri
from kubetune_api.uris import DATASET_SCHEMES, MODEL_SCHEMES, SOURCE_SECRET_KEYS, SourceURI, s3_key_segments
from kubetune_trainer.archive import MAX_ENTRIES, ArchiveError, escaping_links, human, max_unpacked_bytes, unpack
from kubetune_trainer.errors import ProblemList
from kubetune_trainer.oci.client import OciError
from kubetune_trainer.oci.credentials import Credentials, docker_config_in, load_credentials
from kubetune_trainer.oci.reference import Reference, scheme_for
from kubetune_trainer.oci.transfer import pull

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

SourceKind = Literal["model", "dataset"]

#: Env var naming a folder for downloaded sources; ``<output>/.cache`` when unset.
CACHE_DIR_ENV: Final = "KUBETUNE_CACHE_DIR"
_MAX_REDIRECTS: Final = 5
_TIMEOUT_S: Final = 60.0
_ARCHIVE_SUFFIXES: Final = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True, slots=True)
class LocalSource:
    """A file or folder already on this machine (a local path, a mounted claim or ConfigMap)."""

    path: Path
    root: Path | None = None
    """The real path of the mount that ``path`` must stay inside (a claim's, a ConfigMap's); ``None`` for a local path."""


@dataclass(frozen=True, slots=True)
class UrlSource:
    """An http(s) URL to download; a model must be a .tar/.tar.gz archive of its folder."""

    url: str
    allow_private: bool
    networks: tuple[str, ...] = ()
    """Private networks (CIDR) the operator lets URL sources reach (TrainerConfig.private_networks)."""


@dataclass(frozen=True, slots=True)
class HubSource:
    """A Hugging Face Hub repository to snapshot."""

    repo_id: str
    revision: str | None
    repo_type: Literal["model", "dataset"]
    token: str | None


@dataclass(frozen=True, slots=True)
class S3Credentials:
    """Keys read from a source's secretRef Secret (never shown in a repr)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class S3Source:
    """One object (``s3://bucket/key``) or every object under a prefix (``s3://bucket/prefix/``)."""

    uri: str
    bucket: str
    key: str
    """The object's key, or the prefix (empty or ending with ``/``) of a folder."""
    credentials: S3Credentials | None = None
    """``None``: boto3's default chain (environment, IRSA, workload identity)."""
    secret: str | None = None
    """The Secret the credentials came from, for error messages."""
    region: str | None = None
    endpoint: str | None = None
    """A custom endpoint (MinIO, another S3-compatible store); ``None`` for AWS."""
    allow_private: bool = False
    networks: tuple[str, ...] = ()

    @property
    def folder(self) -> bool:
        """Whether this names every object under a prefix rather than one object."""
        return self.key == "" or self.key.endswith("/")


@dataclass(frozen=True, slots=True)
class OciSource:
    """An image or artifact in an OCI registry: a model folder, or dataset files."""

    uri: str
    docker_config: Path | None = None
    """The mounted Docker config of the secretRef Secret; ``None`` pulls anonymously."""
    secret: str | None = None
    """That Secret's name, for error messages."""


Located = LocalSource | UrlSource | HubSource | S3Source | OciSource


def cache_dir(config: TrainerConfig) -> Path:
    """Where downloads go: ``$KUBETUNE_CACHE_DIR`` or ``<output>/.cache``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path(config.mounts.output) / ".cache")


def locate(  # noqa: PLR0911 - one return per scheme
    uri: str, *, kind: SourceKind, secret_ref: str | None, config: TrainerConfig, problems: ProblemList
) -> Located | None:
    """Where ``uri`` (the spec's model or dataset source) is, or ``None`` after recording why it cannot be used."""
    field = f"spec.{kind}.source"
    try:
        parsed = parse_uri(uri, (*(MODEL_SCHEMES if kind == "model" else DATASET_SCHEMES), "file"))
    except ValueError as exc:
        problems.add(field, str(exc))
        return None
    mounts = config.mounts
    if parsed.scheme == "file":
        return _existing(Path("/" + parsed.location.lstrip("/")), field, problems, hint="check the path")
    if parsed.scheme == "pvc":
        claim = parsed.authority
        if claim not in mounts.claims:
            problems.add(
                field,
                f"claim {claim!r} is not mounted in this pod (mounts.claims names {sorted(mounts.claims) or 'none'}); "
                "on a workstation use a local path instead of pvc://",
            )
            return None
        return _inside(
            Path(mounts.claims[claim]), parsed.path, field, problems, what=f"claim {claim}", uri=uri, hint="path"
        )
    if parsed.scheme == "configmap":
        name = parsed.authority
        if name not in mounts.config_maps:
            problems.add(
                field,
                f"ConfigMap {name!r} is not mounted in this pod (mounts.configMaps names "
                f"{sorted(mounts.config_maps) or 'none'})",
            )
            return None
        return _inside(
            Path(mounts.config_maps[name]), parsed.path, field, problems, what=f"ConfigMap {name}", uri=uri, hint="key"
        )
    if parsed.scheme in ("http", "https"):
        if kind == "model" and not parsed.path.endswith(_ARCHIVE_SUFFIXES):
            problems.add(
                field,
                f"a model over {parsed.scheme}:// must be a .tar or .tar.gz archive of the model folder; use hf:// or pvc:// for a folder",
            )
            return None
        networks = tuple(config.private_networks)
        reason = check_url(uri, allow_private=config.allow_private_addresses, networks=networks)
        if reason:
            problems.add(field, reason)
            return None
        return UrlSource(uri, allow_private=config.allow_private_addresses, networks=networks)
    if parsed.scheme == "s3":
        return _locate_s3(parsed, kind=kind, secret_ref=secret_ref, config=config, problems=problems)
    if parsed.scheme == "oci":
        return _locate_oci(parsed, kind=kind, secret_ref=secret_ref, config=config, problems=problems)
    # parse_uri accepted only the schemes above and hf://.
    repo, _, revision = parsed.location.partition("@")
    token, token_problem = hub_token(secret_ref, config)
    if token_problem:
        problems.add(f"spec.{kind}.secretRef", token_problem)
        return None
    return HubSource(repo_id=repo, revision=revision or None, repo_type=kind, token=token)


def _existing(path: Path, field: str, problems: ProblemList, *, hint: str) -> LocalSource | None:
    if not path.exists():
        problems.add(field, f"{path} does not exist; {hint}")
        return None
    return LocalSource(path)


def _inside(
    mount: Path, inner: str, field: str, problems: ProblemList, *, what: str, uri: str, hint: str
) -> LocalSource | None:
    """``inner`` under ``mount``, refused when its real path, or a link in it, leads outside the mount."""
    root = mount.resolve()
    path = mount / inner.lstrip("/")
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a link loop
        problems.add(field, f"{uri}: {path} cannot be resolved (a loop of symbolic links?); check the {hint} in {what}")
        return None
    if not real.is_relative_to(root):
        problems.add(
            field,
            f"{uri} leaves {what}: it leads to {real}, outside the folder where {what} is mounted ({root}); "
            f"name a {hint} inside {what}, without '..' and without symbolic links that point out of it",
        )
        return None
    if not path.exists():
        problems.add(field, f"{path} does not exist; check the {hint} inside {what}")
        return None
    escaping = escaping_links(path, root)
    if escaping:
        problems.add(
            field,
            f"{uri} holds symbolic links that lead outside {what} (mounted at {root}): {'; '.join(escaping)}; "
            f"a source may only link to files inside {what}",
        )
        return None
    return LocalSource(path, root=root)


def hub_token(secret_ref: str | None, config: TrainerConfig) -> tuple[str | None, str | None]:
    """The Hub token for a source: ``token`` of the mounted secretRef, else ``$HF_TOKEN``; and a problem, if any."""
    if secret_ref:
        mount = config.mounts.secrets.get(secret_ref)
        if mount is None:
            return (
                None,
                f"Secret {secret_ref!r} is not mounted in this pod (mounts.secrets names {sorted(config.mounts.secrets) or 'none'})",
            )
        token_file = Path(mount) / "token"
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError:
            return (
                None,
                f"Secret {secret_ref!r} has no key 'token' ({token_file} is missing); put the Hub token under key token",
            )
        return (token or None), None if token else f"key 'token' of Secret {secret_ref!r} is empty"
    return os.environ.get("HF_TOKEN") or None, None


# ---------------------------------------------------------------------------------------- URLs


def refused_address(address: str, networks: tuple[str, ...] = ()) -> str | None:
    """Why ``address`` may not be fetched from (loopback, private, link-local, metadata…), or ``None``.

    An address inside one of ``networks`` (CIDR, allowed by the operator's settings) is not refused.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in ipaddress.ip_network(network, strict=False) for network in networks):
        return None
    for test, what in (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local (cloud metadata lives here)"),
        (ip.is_private, "private"),
        (ip.is_multicast, "multicast"),
        (ip.is_reserved, "reserved"),
    ):
        if test:
            return what
    if not ip.is_global:
        return "not globally routable"
    return None


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def check_url(url: str, *, allow_private: bool, networks: tuple[str, ...] = ()) -> str | None:
    """Why ``url`` may not be fetched, or ``None``: every address its host resolves to must be public
    or inside one of ``networks``."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        addresses = _resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
    except OSError as exc:
        return f"cannot resolve {host!r}: {exc}; check the host name"
    if allow_private:
        return None
    for address in addresses:
        why = refused_address(address, networks)
        if why:
            return (
                f"{host} resolves to {address}, a {why} address; URL sources may only reach public addresses "
                "and the private networks the operator allows (a cluster admin allows one with "
                "`kubetune operator --allow-private-network CIDR`, chart value sources.allowPrivateNetworks)"
            )
    return None


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address while TLS verifies the certificate of the URL's host."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class FetchError(Exception):
    """A download failed; retryable unless ``permanent`` (a 4xx answer, a refused redirect)."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def download(url: str, target: Path, *, allow_private: bool, networks: tuple[str, ...] = ()) -> Path:
    """Fetch ``url`` into ``target`` (atomically), following redirects, each hop's addresses checked.

    A body above :func:`~kubetune_trainer.archive.max_unpacked_bytes` is refused (permanent), by its
    Content-Length when it gives one, else once that many bytes have arrived.
    """
    try:
        limit = max_unpacked_bytes()
    except ArchiveError as exc:
        raise FetchError(str(exc), permanent=True) from None
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        reason = check_url(current, allow_private=allow_private, networks=networks)
        if reason:
            raise FetchError(f"{current}: {reason}", permanent=True)
        parts = urllib.parse.urlsplit(current)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _resolve(host, port)[0]
        if not allow_private and refused_address(address, networks):  # resolution changed since the check
            raise FetchError(f"{current}: {host} now resolves to {address}; refused", permanent=True)
        cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        connection = cls(host, address, port, _TIMEOUT_S)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            connection.request("GET", path, headers={"User-Agent": "kubetune-trainer"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise FetchError(f"{current}: redirect without a Location", permanent=True)
                current = urllib.parse.urljoin(current, location)
                continue
            if response.status != 200:
                raise FetchError(
                    f"{current}: HTTP {response.status} {response.reason}",
                    permanent=400 <= response.status < 500 and response.status not in (408, 429),
                )
            _save(response, target, url=current, limit=limit)
            return target
        except OSError as exc:
            raise FetchError(f"{current}: {exc}", permanent=False) from exc
        finally:
            connection.close()
    raise FetchError(f"{url}: more than {_MAX_REDIRECTS} redirects", permanent=True)


def _save(response: http.client.HTTPResponse, target: Path, *, url: str, limit: int) -> None:
    """Write ``response``'s body to ``target`` atomically, refusing (permanent) a body above ``limit`` bytes."""
    too_big = FetchError(
        f"{url} is larger than {human(limit)}, the most a source may download "
        "(raise $KUBETUNE_MAX_UNPACKED_BYTES for larger sources)",
        permanent=True,
    )
    length = response.getheader("Content-Length")
    if length and length.strip().isdigit() and int(length) > limit:
        raise too_big
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".part-", delete=False) as part:
        try:
            received = 0
            while chunk := response.read(1 << 20):
                received += len(chunk)
                if received > limit:
                    raise too_big
                part.write(chunk)
        except BaseException:
            part.close()
            Path(part.name).unlink(missing_ok=True)
            raise
    os.replace(part.name, target)


# -------------------------------------------------------------------------------------- fetch


#: Weight files a hub snapshot leaves out when only the model's config and tokenizer are wanted.
WEIGHT_PATTERNS: Final = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.gguf", "*.h5", "*.msgpack")


def hub_files(located: HubSource) -> list[str]:
    """The file names of a hub repository at the source's revision (to check its weights without fetching them)."""
    from huggingface_hub import HfApi  # noqa: PLC0415 - only hf:// sources need it

    files: list[str] = HfApi().list_repo_files(
        located.repo_id, repo_type=located.repo_type, revision=located.revision, token=located.token
    )
    return files


def fetch(located: Located, *, cache: Path, weights: bool = True) -> Path:
    """A local path for ``located``, downloading it into ``cache`` when needed (reused when already there).

    ``weights=False`` leaves a hub model's weight files out (the pre-flight needs only its config and
    tokenizer); a local folder, an archive, an s3:// or an oci:// source comes whole.
    """
    if isinstance(located, LocalSource):
        return located.path
    if isinstance(located, S3Source):
        return _fetch_s3(located, cache)
    if isinstance(located, OciSource):
        return _fetch_oci(located, cache)
    if isinstance(located, UrlSource):
        digest = hashlib.sha256(located.url.encode()).hexdigest()[:16]
        name = Path(urllib.parse.urlsplit(located.url).path).name or "data"
        folder = cache / "url" / digest
        target = folder / name
        if not target.exists():
            log.info("downloading %s", located.url)
            download(located.url, target, allow_private=located.allow_private, networks=located.networks)
        if name.endswith(_ARCHIVE_SUFFIXES):
            return _unpack(target, folder / "unpacked", located.url)
        return target
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - only hf:// sources need it

    log.info(
        "fetching %s %s%s from the Hugging Face Hub",
        located.repo_type,
        located.repo_id,
        f"@{located.revision}" if located.revision else "",
    )
    path = snapshot_download(
        located.repo_id,
        repo_type=located.repo_type,
        revision=located.revision,
        cache_dir=cache / "hf",
        token=located.token,
        ignore_patterns=None if weights or located.repo_type != "model" else list(WEIGHT_PATTERNS),
    )
    return Path(path)


def _unpack(archive: Path, folder: Path, url: str) -> Path:
    """``archive`` unpacked into ``folder`` (within :mod:`kubetune_trainer.archive`'s bounds); refusals are permanent."""
    if not folder.exists():
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".unpack-"))
        try:
            unpack(archive, staging, name=f"the archive {url}")
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, ArchiveError):
                raise FetchError(f"{exc}; refused", permanent=True) from None
            raise
        os.replace(staging, folder)
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    # An archive of one folder (model/config.json) is that folder.
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else folder


# ----------------------------------------------------------------------------------------- s3

#: The keys read from an s3:// source's secretRef Secret, each a file where the Secret is mounted.
S3_REQUIRED_KEYS: Final = tuple(key.name for key in SOURCE_SECRET_KEYS["s3"] if key.required)
S3_OPTIONAL_KEYS: Final = tuple(key.name for key in SOURCE_SECRET_KEYS["s3"] if not key.required)
#: Env vars naming a custom endpoint when an s3:// source has no secretRef (boto3 reads the same).
_S3_ENDPOINT_ENV: Final = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
#: Error codes S3 (and S3-compatible stores) answer for a failure that may pass on a retry.
_S3_RETRYABLE_CODES: Final = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling", "ThrottlingException"}
)
_S3_DENIED_CODES: Final = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "403",
    }
)
#: The longest file name most file systems take, in bytes.
_MAX_NAME_BYTES: Final = 255


def s3_secret(secret_ref: str, config: TrainerConfig) -> tuple[dict[str, str], list[str]]:
    """The S3 settings in the mounted ``secret_ref`` Secret (:data:`S3_REQUIRED_KEYS` and
    :data:`S3_OPTIONAL_KEYS`, surrounding whitespace dropped), and the problems, if any."""
    mount = config.mounts.secrets.get(secret_ref)
    if mount is None:
        return {}, [
            f"Secret {secret_ref!r} is not mounted in this pod (mounts.secrets names {sorted(config.mounts.secrets) or 'none'})"
        ]
    values: dict[str, str] = {}
    problems: list[str] = []
    for key in (*S3_REQUIRED_KEYS, *S3_OPTIONAL_KEYS):
        path = Path(mount) / key
        try:
            value = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            if key in S3_REQUIRED_KEYS:
                problems.append(
                    f"Secret {secret_ref!r} has no key {key!r} ({path} is missing); an s3:// source's Secret holds "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (optionally AWS_SESSION_TOKEN, AWS_REGION and "
                    "AWS_ENDPOINT_URL); leave secretRef unset to use the pod's own AWS identity"
                )
            continue
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"key {key!r} of Secret {secret_ref!r} cannot be read ({path}: {exc})")
            continue
        if not value and key in S3_REQUIRED_KEYS:
            problems.append(f"key {key!r} of Secret {secret_ref!r} is empty")
        if value:
            values[key] = value
    return values, problems


def _endpoint_problem(endpoint: str, *, allow_private: bool, networks: tuple[str, ...]) -> str | None:
    """Why a custom S3 endpoint may not be used: not an http(s) URL, or an address URL sources may not reach."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http:// or https:// URL; expected e.g. https://minio.example.org:9000"
    return check_url(endpoint, allow_private=allow_private, networks=networks)


def _locate_s3(
    parsed: SourceURI, *, kind: SourceKind, secret_ref: str | None, config: TrainerConfig, problems: ProblemList
) -> S3Source | None:
    """An :class:`S3Source` for ``parsed``, its credentials read from the mounted Secret; ``None`` after recording why not."""
    field, uri, key = f"spec.{kind}.source", str(parsed), parsed.path
    if any(segment in ("", ".", "..") for segment in s3_key_segments(key)):  # refused at admission too
        problems.add(field, f"{uri}: an empty, '.' or '..' segment in the key; name a key of plain segments")
        return None
    folder = key == "" or key.endswith("/")
    if kind == "model" and not folder and not key.endswith(_ARCHIVE_SUFFIXES):
        problems.add(
            field,
            f"a model over s3:// is a folder named by its prefix with a trailing slash (s3://{parsed.authority}/{key}/) "
            "or a .tar or .tar.gz archive of the model folder",
        )
        return None
    values: dict[str, str] = {}
    if secret_ref:
        values, secret_problems = s3_secret(secret_ref, config)
        for problem in secret_problems:
            problems.add(f"spec.{kind}.secretRef", problem)
        if secret_problems:
            return None
        endpoint = values.get("AWS_ENDPOINT_URL")
        where, endpoint_field = f"AWS_ENDPOINT_URL of Secret {secret_ref!r}", f"spec.{kind}.secretRef"
    else:
        endpoint = next((os.environ[name] for name in _S3_ENDPOINT_ENV if os.environ.get(name)), None)
        where, endpoint_field = "$AWS_ENDPOINT_URL", field
    networks = tuple(config.private_networks)
    if endpoint:
        reason = _endpoint_problem(endpoint, allow_private=config.allow_private_addresses, networks=networks)
        if reason:
            problems.add(endpoint_field, f"the S3 endpoint {endpoint} ({where}): {reason}")
            return None
    credentials = (
        S3Credentials(
            values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"], values.get("AWS_SESSION_TOKEN") or None
        )
        if secret_ref
        else None
    )
    return S3Source(
        uri=uri,
        bucket=parsed.authority,
        key=key,
        credentials=credentials,
        secret=secret_ref,
        region=values.get("AWS_REGION") or values.get("AWS_DEFAULT_REGION") or None,
        endpoint=endpoint or None,
        allow_private=config.allow_private_addresses,
        networks=networks,
    )


def _s3_endpoint(source: S3Source) -> tuple[str | None, str | None]:
    """Where the client connects and the Host header it sends, the endpoint's addresses checked again
    (its name may resolve elsewhere by now, as a redirect hop's may).

    A plain-http endpoint is pinned to the checked address, as an http source is, its Host header
    keeping the name (signed with it); over https the client connects by name and TLS verifies it.
    """
    if not source.endpoint:
        return None, None
    reason = _endpoint_problem(source.endpoint, allow_private=source.allow_private, networks=source.networks)
    if reason:
        raise FetchError(f"the S3 endpoint {source.endpoint}: {reason}", permanent=True)
    parts = urllib.parse.urlsplit(source.endpoint)
    if parts.scheme != "http":
        return source.endpoint, None
    host, port = parts.hostname or "", parts.port or 80
    try:
        address = _resolve(host, port)[0]
    except OSError as exc:
        raise FetchError(f"the S3 endpoint {source.endpoint}: cannot resolve {host!r}: {exc}", permanent=False) from exc
    if not source.allow_private and refused_address(address, source.networks):
        raise FetchError(
            f"the S3 endpoint {source.endpoint}: {host} now resolves to {address}; refused", permanent=True
        )
    literal = f"[{address}]" if ":" in address else address
    return urllib.parse.urlunsplit(("http", f"{literal}:{port}", parts.path, "", "")), parts.netloc.rpartition("@")[2]


def _s3_client(source: S3Source, *, endpoint: str | None, host: str | None) -> S3Client:
    """A boto3 client for ``source`` connecting to ``endpoint`` (AWS when ``None``), sending ``host`` as the Host header."""
    import boto3  # noqa: PLC0415 - only s3:// sources need it
    from botocore.config import Config  # noqa: PLC0415

    credentials = source.credentials
    session = boto3.session.Session(
        aws_access_key_id=credentials.access_key_id if credentials else None,
        aws_secret_access_key=credentials.secret_access_key if credentials else None,
        aws_session_token=credentials.session_token if credentials else None,
        region_name=source.region,
    )
    config = Config(
        connect_timeout=_TIMEOUT_S,
        read_timeout=_TIMEOUT_S,
        retries={"mode": "standard", "max_attempts": 3},
        user_agent_extra="kubetune-trainer",
        # S3-compatible stores (MinIO) serve buckets under the path, not as host names.
        s3={"addressing_style": "path"} if source.endpoint else None,
    )
    client = session.client("s3", endpoint_url=endpoint, config=config)
    if host:

        def keep_the_name(request: Any, **_: Any) -> None:  # signed with the name, sent to the checked address
            request.headers["Host"] = host

        client.meta.events.register("before-sign.s3", keep_the_name)
    return client


def _s3_error(source: S3Source, exc: Exception, *, key: str) -> FetchError:  # noqa: PLR0911 - one return per kind of answer
    """``exc`` (from boto3) as a FetchError naming the URI and what to fix; permanent unless a retry may help."""
    from botocore.exceptions import (  # noqa: PLC0415
        ClientError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = f"{code} (HTTP {status})" + (f": {str(error['Message']).rstrip('.')}" if error.get("Message") else "")
        at = f" at {source.endpoint}" if source.endpoint else ""
        if code == "NoSuchBucket":
            return FetchError(
                f"{source.uri}: bucket {source.bucket!r} does not exist{at}; check the bucket name", permanent=True
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return FetchError(
                f"{source.uri}: no object with key {key!r} in bucket {source.bucket!r}{at}; check the key (keys are "
                "case-sensitive), or end the URI with '/' to fetch every object under a prefix",
                permanent=True,
            )
        if code in _S3_DENIED_CODES or status in (401, 403):
            who = (
                f"check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in Secret {source.secret!r}"
                if source.secret
                else "check the pod's AWS identity (IRSA, workload identity), or name a Secret with AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY in secretRef"
            )
            return FetchError(
                f"{source.uri}: access denied, {detail}; {who}, and that they may s3:GetObject "
                f"(and s3:ListBucket, for a prefix or to tell a missing key) on bucket {source.bucket!r}",
                permanent=True,
            )
        if status >= 500 or status in (408, 429) or code in _S3_RETRYABLE_CODES:
            return FetchError(f"{source.uri}: {detail}", permanent=False)
        return FetchError(f"{source.uri}: {detail}", permanent=400 <= status < 500)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return FetchError(
            f"{source.uri}: no AWS credentials ({exc}); name a Secret with AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY in secretRef, or give the pod an AWS identity (IRSA, workload identity)",
            permanent=True,
        )
    if isinstance(exc, ParamValidationError):
        return FetchError(f"{source.uri}: {exc}", permanent=True)
    return FetchError(f"{source.uri}: {type(exc).__name__}: {exc}", permanent=False)


def _s3_key_problem(relative: str) -> str | None:
    """Why an object's key, relative to the prefix being fetched, cannot name a file under the fetched folder."""
    segments = relative.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return (
            "has an empty, '.' or '..' segment (or starts with '/'), which would name a file outside the fetched folder"
        )
    if "\x00" in relative:
        return "holds a NUL character"
    if any(len(segment.encode()) > _MAX_NAME_BYTES for segment in segments):
        return f"has a segment longer than {_MAX_NAME_BYTES} bytes"
    return None


def _too_big(what: str, limit: int) -> FetchError:
    return FetchError(
        f"{what} {human(limit)}, the most a source may download "
        "(raise $KUBETUNE_MAX_UNPACKED_BYTES for larger sources)",
        permanent=True,
    )


def _s3_list(client: S3Client, source: S3Source, limit: int) -> list[tuple[str, str]]:
    """The objects under ``source``'s prefix as (key, path relative to the fetched folder), within the bounds."""
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    objects: list[tuple[str, str]] = []
    total = 0
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=source.bucket, Prefix=source.key):
            for item in page.get("Contents", []):
                key, size = item["Key"], int(item.get("Size", 0))
                relative = key[len(source.key) :]
                if not relative or (relative.endswith("/") and size == 0):
                    continue  # a "folder" marker, as consoles create
                problem = _s3_key_problem(relative)
                if problem:
                    raise FetchError(
                        f"{source.uri}: the key {key!r} {problem}; refused (every key under the prefix must be a "
                        "relative path of plain names)",
                        permanent=True,
                    )
                objects.append((key, relative))
                total += size
                if len(objects) > MAX_ENTRIES:
                    raise FetchError(
                        f"{source.uri}: more than {MAX_ENTRIES:,} objects under the prefix, the most a source folder "
                        "may hold; name a narrower prefix",
                        permanent=True,
                    )
                if total > limit:
                    raise _too_big(f"{source.uri}: the objects under the prefix add up to more than", limit)
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(source, exc, key=source.key) from exc
    if not objects:
        raise FetchError(
            f"{source.uri}: no objects under the prefix {source.key!r} in bucket {source.bucket!r}; check the prefix "
            "(keys are case-sensitive), or drop the trailing '/' to fetch a single object",
            permanent=True,
        )
    names = {relative for _, relative in objects}
    folders = {"/".join(relative.split("/")[:i]) for relative in names for i in range(1, relative.count("/") + 1)}
    clash = sorted(names & folders)
    if clash:
        raise FetchError(
            f"{source.uri}: {source.key + clash[0]!r} is both an object and a folder of other objects; refused",
            permanent=True,
        )
    return objects


def _s3_get(client: S3Client, source: S3Source, key: str, target: Path, *, budget: int, limit: int) -> int:
    """Write object ``key`` to the new file ``target``; refuse (permanent) more than ``budget`` bytes. Returns its size."""
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    too_big = _too_big(
        f"s3://{source.bucket}/{key} is larger than"
        if budget == limit
        else f"{source.uri}: the objects under the prefix add up to more than",
        limit,
    )
    try:
        response = client.get_object(Bucket=source.bucket, Key=key)
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(source, exc, key=key) from exc
    body = response["Body"]
    received = 0
    try:
        if int(response.get("ContentLength", 0)) > budget:
            raise too_big
        with target.open("xb") as out:
            while chunk := body.read(1 << 20):
                received += len(chunk)
                if received > budget:
                    raise too_big
                out.write(chunk)
    except (BotoCoreError, ClientError) as exc:
        raise _s3_error(source, exc, key=key) from exc
    except OSError as exc:
        raise FetchError(f"{source.uri}: {key}: {exc}", permanent=False) from exc
    finally:
        body.close()
    return received


def _fetch_s3(source: S3Source, cache: Path) -> Path:
    """``source`` downloaded into ``cache`` (reused when a complete copy is there); an archive is unpacked."""
    try:
        limit = max_unpacked_bytes()
    except ArchiveError as exc:
        raise FetchError(str(exc), permanent=True) from None
    digest = hashlib.sha256(f"{source.endpoint or ''} {source.uri}".encode()).hexdigest()[:16]
    folder = cache / "s3" / digest
    target = folder / "files" if source.folder else folder / source.key.rsplit("/", 1)[-1]
    if not target.exists():
        endpoint, host = _s3_endpoint(source)
        from botocore.exceptions import BotoCoreError  # noqa: PLC0415 - only s3:// sources need it

        try:
            client = _s3_client(source, endpoint=endpoint, host=host)
        except (BotoCoreError, ValueError) as exc:  # a malformed region or endpoint: the same on every retry
            raise FetchError(
                f"{source.uri}: no S3 client can be made ({exc}); check AWS_REGION and AWS_ENDPOINT_URL"
                + (f" in Secret {source.secret!r}" if source.secret else ""),
                permanent=True,
            ) from None
        folder.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s", source.uri)
        # Everything goes to a staging name, renamed into place once complete: a half download is never reused.
        if source.folder:
            _s3_fetch_folder(client, source, folder, target, limit)
        else:
            part = Path(tempfile.mkdtemp(dir=folder, prefix=".part-")) / "object"
            try:
                _s3_get(client, source, source.key, part, budget=limit, limit=limit)
                os.replace(part, target)
            finally:
                shutil.rmtree(part.parent, ignore_errors=True)
    if not source.folder and target.name.endswith(_ARCHIVE_SUFFIXES):
        return _unpack(target, folder / "unpacked", source.uri)
    return target


def _s3_fetch_folder(client: S3Client, source: S3Source, folder: Path, target: Path, limit: int) -> None:
    objects = _s3_list(client, source, limit)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".part-"))
    try:
        root = staging.resolve()
        total = 0
        for key, relative in objects:
            path = staging / relative
            if not path.resolve().is_relative_to(root):  # _s3_key_problem refused this already
                raise FetchError(
                    f"{source.uri}: the key {key!r} leads outside the fetched folder; refused", permanent=True
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            total += _s3_get(client, source, key, path, budget=limit - total, limit=limit)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():  # else another process completed the same download first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("fetched %d objects under %s", len(objects), source.uri)


# ---------------------------------------------------------------------------------------- oci


def _locate_oci(
    parsed: SourceURI, *, kind: SourceKind, secret_ref: str | None, config: TrainerConfig, problems: ProblemList
) -> OciSource | None:
    """An :class:`OciSource` for ``parsed``: the registry checked like a URL source's host, the Secret's Docker config found."""
    field, uri = f"spec.{kind}.source", str(parsed)
    try:
        ref = Reference.parse(uri)
    except ValueError as exc:
        problems.add(field, str(exc))
        return None
    # Only a literal loopback registry is spoken to in plain HTTP (names are not resolved for that).
    reason = check_url(
        f"{scheme_for(ref.host)}://{ref.host}/",
        allow_private=config.allow_private_addresses,
        networks=tuple(config.private_networks),
    )
    if reason:
        problems.add(field, f"the registry {ref.host}: {reason}")
        return None
    if not secret_ref:
        return OciSource(uri)
    mount = config.mounts.secrets.get(secret_ref)
    if mount is None:
        problems.add(
            f"spec.{kind}.secretRef",
            f"Secret {secret_ref!r} is not mounted in this pod (mounts.secrets names {sorted(config.mounts.secrets) or 'none'})",
        )
        return None
    docker_config = docker_config_in(Path(mount))
    if docker_config is None:
        problems.add(
            f"spec.{kind}.secretRef",
            f"Secret {secret_ref!r} has no key .dockerconfigjson; an oci:// source's Secret is a "
            f"kubernetes.io/dockerconfigjson one (kubectl create secret docker-registry {secret_ref} "
            f"--docker-server={ref.host} --docker-username=… --docker-password=…)",
        )
        return None
    return OciSource(uri, docker_config, secret_ref)


def _fetch_oci(source: OciSource, cache: Path) -> Path:
    """``source`` pulled into ``cache`` (reused when a complete copy is there): the model folder or the data.

    The pull (:func:`kubetune_trainer.oci.transfer.pull`) checks every layer's digest and size and
    unpacks tar layers within the archive bounds; the files land in a staging folder renamed into
    place once complete. Of a container image whose files are not at its root (Kaito's model
    images), the one folder holding a ``config.json`` is the model.
    """
    ref = Reference.parse(source.uri)
    credentials: Credentials | None = None
    where = f"Secret {source.secret!r}" if source.secret else "no secretRef (anonymous pull)"
    if source.docker_config is not None:
        try:
            credentials = load_credentials(source.docker_config, ref.host)
        except ValueError as exc:
            raise FetchError(f"{source.uri}: {where}: {exc}", permanent=True) from None
        if credentials is None:
            raise FetchError(
                f"{source.uri}: {where} has no credentials for registry {ref.host} in its .dockerconfigjson; "
                f"add an entry for {ref.host} (--docker-server={ref.host})",
                permanent=True,
            )
    folder = cache / "oci" / hashlib.sha256(source.uri.encode()).hexdigest()[:16]
    target = folder / "files"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".part-"))
        try:
            log.info("pulling %s", source.uri)
            pull(ref, staging / "files", credentials=credentials, credential_source=where)
            os.replace(staging / "files", target)
        except OciError as exc:
            raise FetchError(str(exc), permanent=exc.permanent) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _content(target)


def _content(folder: Path) -> Path:
    """What a pulled folder holds: a model folder (the one folder with a config.json), one file, or the folder."""
    if (folder / "config.json").is_file():
        return folder
    models = sorted(p.parent for p in folder.rglob("config.json") if p.is_file())
    if len(models) == 1:
        return models[0]
    files = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return files[0] if len(files) == 1 and files[0].is_file() else folder
