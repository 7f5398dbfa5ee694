"""The pod as its runner and the runner's helpers see it, and each of its containers' runs.

:class:`PodContext` is what every part of running a pod needs: the pod's identity and spec, its
node, its loopback address, its folder on this machine and an API client. :class:`NodeRuntime`
is what a pod needs from the node runtime that runs it (:class:`kubetune_local.node.Runtime`),
so the pods package does not depend on the node module.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kubernetes import client

from kubetune_local.kube import Obj
from kubetune_local.network import AddressBook


class NodeRuntime(Protocol):
    """What a pod uses of the node runtime: its home, the API, pod addresses and its process log."""

    home: Path
    api: client.ApiClient
    apiserver_port: int
    addresses: AddressBook

    def log(self, message: str) -> None: ...

    def track(self, uid: str, pid: int) -> None: ...

    def untrack(self, uid: str, pid: int) -> None: ...

    def subdomains(self, namespace: str) -> set[str]: ...

    def ports_being_released(self, uid: str) -> set[int]: ...


class PodContext:
    """One pod bound to a node of this runtime: who it is, where it lives and how to reach the API.

    Creating it reserves the pod's loopback address.
    """

    def __init__(self, runtime: NodeRuntime, node_name: str, pod: Obj) -> None:
        meta = pod["metadata"]
        self.runtime = runtime
        self.node_name = node_name
        self.pod = pod
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.spec: Obj = pod["spec"]
        self.root: Path = runtime.home / "pods" / self.uid
        self.logs: Path = self.root / "logs"
        self.core = client.CoreV1Api(runtime.api)
        self.hostname: str = self.spec.get("hostname") or self.name
        self.subdomain: str | None = self.spec.get("subdomain")
        self.ip = runtime.addresses.address_for_pod(self.uid, self.hostname, self.subdomain, self.namespace)

    def log_file(self, container_name: str) -> Path:
        """Where a container's stdout and stderr go (``kubectl logs`` reads it)."""
        return self.logs / f"{container_name}.log"

    def termination_file(self, container: Obj) -> Path:
        """The local file behind a container's ``terminationMessagePath``."""
        return self.root / f"termination-{container['name']}.log"


@dataclass
class ContainerRun:
    """One container of the pod: its spec, its process and what the status reports."""

    spec: Obj
    init: bool = False
    process: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    restart_count: int = 0
    last_state: Obj = field(default_factory=dict)
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    ready: bool = False
    next_probe: float = 0.0
    restart_at: float = 0.0

    @property
    def name(self) -> str:
        return str(self.spec["name"])
