"""Turn the spec's source URIs into local files and folders the trainer can open.

Every source is first *located* (a pure step: which mount, which URL, which hub repository and
token) so that problems such as an unmounted claim or a URL that points at a private address are
reported together, before any download starts; only then is it *fetched*. URL sources are
checked against every address their host resolves to and fetched from the checked address, so a
DNS answer that changes between the check and the download cannot reach an internal service.

A ``pvc://`` or ``configmap://`` source must stay inside the folder where its claim or ConfigMap
is mounted: a path whose real location (``..`` and symbolic links resolved) is outside it, or a
folder holding a symbolic link that leads outside it, is refused naming the field and the claim.
Archives (``.tar``, ``.tar.gz``, ``.tgz`` over http(s)) are unpacked within the bounds of
:mod:`kubetune_trainer.archive`, and a download stops once it passes the same maximum size.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from kubetune_api import TrainerConfig, parse_uri
from kubetune_api.uris import DATASET_SCHEMES, MODEL_SCHEMES
from kubetune_trainer.archive import ArchiveError, escaping_links, human, max_unpacked_bytes, unpack
from kubetune_trainer.errors import ProblemList

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


Located = LocalSource | UrlSource | HubSource


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
    # parse_uri accepted only the schemes above and hf:// (s3:// and oci:// sources are refused at admission).
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
    tokenizer); a local folder or an archive comes whole.
    """
    if isinstance(located, LocalSource):
        return located.path
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
