"""Registry credentials, read from a Docker config (the content of a ``kubernetes.io/dockerconfigjson`` Secret).

A Docker config names them per registry in ``auths[host]``: ``auth`` (base64 ``user:password``), or
``username`` and ``password``. They are sent as HTTP basic credentials, or exchanged for a bearer
token (see :mod:`.client`); they never appear in a message or a log line.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

#: The names Docker Hub goes by: an entry for any one of them serves them all.
_DOCKER_HUB: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


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


#: The keys of a kubernetes.io/dockerconfigjson Secret, and of the legacy kubernetes.io/dockercfg one.
DOCKER_CONFIG_KEYS: Final = (".dockerconfigjson", ".dockercfg")


def docker_config_in(mount: Path) -> Path | None:
    """The Docker config file of a registry Secret mounted at ``mount``, when it has one."""
    return next((mount / key for key in DOCKER_CONFIG_KEYS if (mount / key).is_file()), None)
