"""Pod addresses and cluster DNS names on one machine.

Each pod gets its own loopback address (Linux routes all of 127.0.0.0/8 to ``lo``). Pods have no
resolver for cluster DNS, so the names of pods that the local runtime runs
(``<hostname>.<subdomain>[.<namespace>[.svc[.cluster.local]]]``) are replaced by their addresses
wherever they appear in a container's env and args. A name can be referred to before its pod
starts (rank 1 may start before rank 0), so an address is reserved for the name on first use.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from typing import Final

CLUSTER_DOMAIN: Final = "cluster.local"
_FIRST: Final = int(ipaddress.IPv4Address("127.1.0.1"))
_LAST: Final = int(ipaddress.IPv4Address("127.254.255.254"))


class AddressBook:
    """Loopback addresses for pods, keyed by their DNS identity ``hostname.subdomain.namespace``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = _FIRST
        self._by_name: dict[str, str] = {}
        self._by_pod: dict[str, str] = {}

    def _allocate(self) -> str:
        if self._next > _LAST:
            raise RuntimeError("the local runtime ran out of loopback addresses")
        address = str(ipaddress.IPv4Address(self._next))
        self._next += 1
        return address

    def address_for_pod(self, uid: str, hostname: str, subdomain: str | None, namespace: str) -> str:
        """The pod's address: the one reserved for its DNS name if referred to before, else a new one."""
        with self._lock:
            if uid in self._by_pod:
                return self._by_pod[uid]
            key = f"{hostname}.{subdomain}.{namespace}" if subdomain else None
            address = self._by_name.get(key) if key else None
            address = address or self._allocate()
            if key:
                self._by_name[key] = address
            self._by_pod[uid] = address
            return address

    def release_pod(self, uid: str, hostname: str, subdomain: str | None, namespace: str) -> None:
        with self._lock:
            address = self._by_pod.pop(uid, None)
            key = f"{hostname}.{subdomain}.{namespace}" if subdomain else None
            if key and address and self._by_name.get(key) == address:
                del self._by_name[key]

    def resolve(self, text: str, namespace: str, subdomains: set[str]) -> str:
        """Replace the cluster DNS names of pods under ``subdomains`` in ``text`` by their addresses.

        ``subdomains`` are the headless Services that pods of this runtime name as their
        ``spec.subdomain``; other names (external hosts, ClusterIP Services) are left alone.
        """
        if not subdomains or "." not in text:
            return text
        label = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
        alternatives = "|".join(re.escape(s) for s in sorted(subdomains, key=len, reverse=True))
        pattern = re.compile(
            rf"(?<![\w.-])(?P<host>{label})\.(?P<sub>{alternatives})"
            rf"(?:\.(?P<ns>{label})(?:\.svc(?:\.{re.escape(CLUSTER_DOMAIN)})?)?)?(?![\w-]|\.[A-Za-z0-9])"
        )

        def replace(match: re.Match[str]) -> str:
            key = f"{match['host']}.{match['sub']}.{match['ns'] or namespace}"
            with self._lock:
                if key not in self._by_name:
                    self._by_name[key] = self._allocate()
                return self._by_name[key]

        return pattern.sub(replace, text)
