"""``oci://host[:port]/repository[:tag][@sha256:…]`` references, and which scheme reaches a registry.

Transport rules: plain HTTP only for loopback registries (``localhost``, 127.0.0.0/8, ``::1``),
HTTPS (certificates verified) for every other host.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import oras.defaults

from kubetune_api import parse_uri


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
