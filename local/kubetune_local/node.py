"""Process-backed nodes: Node objects with heartbeats, and the pods bound to them run locally.

One :class:`Runtime` per local cluster holds what the nodes share (the API client, pod
addresses, the pod watch); each :class:`NodeAgent` registers one Node with its capacity, labels
and taints, renews its Lease and runs the pods the scheduler binds to it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from kubetune_local.kube import Obj, stamp
from kubetune_local.network import AddressBook
from kubetune_local.pods import PodRunner

LOCAL_NODE_LABEL: Final = "kubetune.io/local-node"
LEASE_SECONDS: Final = 40
HEARTBEAT_SECONDS: Final = 10.0


class Runtime:
    """What the process-backed nodes of one local cluster share."""

    def __init__(self, *, home: Path, api: client.ApiClient, apiserver_port: int, kubelet_port: int) -> None:
        self.home = home
        self.api = api
        self.apiserver_port = apiserver_port
        self.kubelet_port = kubelet_port
        self.addresses = AddressBook()
        self.core = client.CoreV1Api(api)
        self.agents: dict[str, NodeAgent] = {}
        self.runners: dict[str, PodRunner] = {}
        self.pods: dict[str, Obj] = {}
        self._lock = threading.RLock()
        self._pids: dict[str, set[int]] = {}
        self._deleting: set[str] = set()
        self.stopping = threading.Event()
        self._log_file = open(home / "logs" / "nodes.log", "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    # --------------------------------------------------------------------------- helpers

    def log(self, message: str) -> None:
        self._log_file.write(f"{stamp()} {message}\n")

    def track(self, uid: str, pid: int) -> None:
        with self._lock:
            self._pids.setdefault(uid, set()).add(pid)

    def untrack(self, uid: str, pid: int) -> None:
        with self._lock:
            self._pids.get(uid, set()).discard(pid)

    def subdomains(self, namespace: str) -> set[str]:
        """The ``spec.subdomain`` values of known pods in ``namespace``: the names DNS rewriting knows."""
        with self._lock:
            return {
                p["spec"]["subdomain"]
                for p in self.pods.values()
                if p["metadata"]["namespace"] == namespace and p["spec"].get("subdomain")
            }

    def ports_being_released(self, uid: str) -> set[int]:
        """Container ports declared by the other pods whose processes are being stopped and still run."""
        with self._lock:
            stopping = [
                r for u, r in self.runners.items() if u != uid and r.stopping.is_set() and not r.finished.is_set()
            ]
        return {port for runner in stopping for port in runner.declared_ports()}

    def runner_for(self, namespace: str, name: str) -> PodRunner | None:
        with self._lock:
            for runner in self.runners.values():
                if runner.namespace == namespace and runner.pod_name == name:
                    return runner
        return None

    # ------------------------------------------------------------------------------ nodes

    def add_node(self, agent: NodeAgent) -> None:
        with self._lock:
            self.agents[agent.name] = agent
        agent.register()
        # Pods bound before the node was ours (the scheduler may bind to an adopted Karpenter node
        # before its first status) start now. Pods already past Pending are left as they are.
        with self._lock:
            waiting = [
                p
                for p in self.pods.values()
                if p["spec"].get("nodeName") == agent.name
                and (p.get("status") or {}).get("phase", "Pending") == "Pending"
            ]
        for pod in waiting:
            self._on_pod("MODIFIED", pod)

    def remove_node(self, name: str) -> None:
        """Stop the node's pods (as on a terminated instance) and delete its Node."""
        with self._lock:
            agent = self.agents.pop(name, None)
            runners = [r for r in self.runners.values() if r.node_name == name]
        for runner in runners:
            runner.stop(grace=min(runner.grace, 5.0), reason="NodeTerminated", message=f"node {name} was terminated")
        for runner in runners:
            runner.finished.wait(15)
        if agent is not None:
            agent.unregister()

    # ------------------------------------------------------------------------------- pods

    def watch_pods(self) -> None:
        """Follow every pod; run those bound to our nodes, stop and remove those being deleted."""
        resource_version = ""
        while not self.stopping.is_set():
            try:
                if not resource_version:
                    listing = self.core.list_pod_for_all_namespaces(_preload_content=False)
                    data = json.loads(listing.data)
                    resource_version = data["metadata"]["resourceVersion"]
                    for pod in data["items"]:
                        self._on_pod("ADDED", pod)
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=resource_version,
                    timeout_seconds=60,
                    allow_watch_bookmarks=True,
                )
                for event in stream:
                    if self.stopping.is_set():
                        return
                    raw = event["raw_object"]
                    resource_version = raw["metadata"].get("resourceVersion", resource_version)
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._on_pod(event["type"], raw)
            except ApiException as exc:
                if exc.status == 410:  # history compacted: list again
                    resource_version = ""
                else:
                    self.log(f"pod watch: {exc}")
                    time.sleep(1)
            except Exception as exc:
                self.log(f"pod watch: {exc!r}")
                resource_version = ""
                time.sleep(1)

    def _on_pod(self, kind: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            if kind == "DELETED":
                self.pods.pop(uid, None)
            else:
                self.pods[uid] = pod
            node = pod["spec"].get("nodeName")
            if node not in self.agents:
                return
            runner = self.runners.get(uid)
            deleting = pod["metadata"].get("deletionTimestamp") is not None
            if kind == "DELETED":
                self._deleting.discard(uid)
                if runner is not None:
                    runner.stop(grace=0)
                return
            if runner is None and not deleting and pod.get("status", {}).get("phase") not in ("Succeeded", "Failed"):
                runner = PodRunner(self, node, pod)
                self.runners[uid] = runner
                runner.start()
            if deleting and uid in self._deleting:
                return  # the deletion is under way (or done, and the object waits for its finalizers)
            if deleting:
                self._deleting.add(uid)
        if deleting:
            if runner is not None:
                # Stopping now, before a later event starts a replacement that waits for its ports.
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                runner.stop(None if grace is None else float(grace), deleting=True)
            threading.Thread(target=self._delete, args=(pod, runner), daemon=True).start()

    def _delete(self, pod: Obj, runner: PodRunner | None) -> None:
        """Finish a graceful deletion: wait for the processes, report the final phase, remove the pod object.

        As a kubelet does, the pod ends in a terminal phase before its object is removed: a
        finalizer that waits for one (a Job's pod tracking) then lets it go.
        """
        if runner is not None:
            runner.finished.wait()
            self.addresses.release_pod(runner.uid, runner.hostname, runner.subdomain, runner.namespace)
        elif (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            self._fail_unstarted(pod)
        self._remove(pod)

    def _fail_unstarted(self, pod: Obj) -> None:
        """A pod deleted before this runtime ran it (or after a restart of the runtime) ends Failed."""
        meta = pod["metadata"]
        status = {"phase": "Failed", "reason": "Terminated", "message": "the pod was deleted before it ended"}
        with contextlib.suppress(ApiException):
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})

    def _remove(self, pod: Obj) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                grace_period_seconds=0,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
                ),
            )

    def shutdown(self) -> None:
        """Stop every pod (SIGTERM, then SIGKILL after a short grace) and every heartbeat."""
        self.stopping.set()
        with self._lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.stop(grace=min(runner.grace, 5.0))
        for runner in runners:
            runner.finished.wait(10)
        for agent in list(self.agents.values()):
            agent.stop()


class NodeAgent:
    """One process-backed node: its Node object, its Lease and its heartbeat."""

    def __init__(
        self,
        runtime: Runtime,
        name: str,
        *,
        capacity: dict[str, str],
        labels: dict[str, str] | None = None,
        taints: list[Obj] | None = None,
        provider_id: str | None = None,
        on_ready: Callable[[NodeAgent], None] | None = None,
        allocatable: dict[str, str] | None = None,
        adopt: bool = False,
    ) -> None:
        """``adopt``: the Node exists already (Karpenter created it); register() adds ``labels``
        to it and takes over its status and Lease, but leaves its other labels and its taints."""
        self.runtime = runtime
        self.name = name
        self.capacity = capacity
        self.allocatable = allocatable or capacity
        self.adopt = adopt
        self.extra_labels = {LOCAL_NODE_LABEL: "true", **(labels or {})}
        self.labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64" if platform.machine() in ("x86_64", "AMD64") else platform.machine(),
            LOCAL_NODE_LABEL: "true",
            **(labels or {}),
        }
        self.taints = taints or []
        self.provider_id = provider_id
        self.on_ready = on_ready
        self.core = client.CoreV1Api(runtime.api)
        self.coordination = client.CoordinationV1Api(runtime.api)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"node-{name}", daemon=True)

    def _status(self) -> Obj:
        now = stamp()
        return {
            "capacity": self.capacity,
            "allocatable": self.allocatable,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubetune process-backed node is posting ready status",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                },
                *(
                    {
                        "type": kind,
                        "status": "False",
                        "reason": f"KubeletHasSufficient{kind.removesuffix('Pressure')}",
                        "message": "",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                    for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")
                ),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.runtime.kubelet_port}},
            "nodeInfo": {
                "architecture": self.labels["kubernetes.io/arch"],
                "bootID": "",
                "containerRuntimeVersion": f"kubetune-local://python{sys.version_info.major}.{sys.version_info.minor}",
                "kernelVersion": platform.release(),
                "kubeProxyVersion": "",
                "kubeletVersion": "v1.35.4",
                "machineID": "",
                "operatingSystem": "linux",
                "osImage": f"{platform.system()} (process-backed)",
                "systemUUID": "",
            },
        }

    def register(self) -> None:
        """Create (or take over) the Node, write its status, and start heartbeats."""
        if self.adopt:
            self.core.patch_node(self.name, {"metadata": {"labels": self.extra_labels}})
            self._start()
            return
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": self.labels},
            "spec": {"taints": self.taints, **({"providerID": self.provider_id} if self.provider_id else {})},
        }
        try:
            self.core.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_node(self.name, {"metadata": {"labels": self.labels}, "spec": {"taints": self.taints}})
        self._start()

    def _start(self) -> None:
        self.core.patch_node_status(self.name, {"status": self._status()})
        self._renew_lease()
        self._thread.start()
        if self.on_ready is not None:
            self.on_ready(self)

    def _renew_lease(self) -> None:
        renew = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # a MicroTime, not a Time
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": renew}
        try:
            self.coordination.patch_namespaced_lease(self.name, "kube-node-lease", {"spec": spec})
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": self.name, "namespace": "kube-node-lease"}, "spec": spec}
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    def _heartbeat(self) -> None:
        beats = 0
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._renew_lease()
                beats += 1
                if beats % 3 == 0:
                    self.core.patch_node_status(self.name, {"status": self._status()})
            except Exception as exc:
                self.runtime.log(f"node {self.name} heartbeat: {exc!r}")

    def stop(self) -> None:
        self._stop.set()

    def unregister(self) -> None:
        self.stop()
        with contextlib.suppress(ApiException):
            self.core.delete_node(self.name)
        with contextlib.suppress(ApiException):
            self.coordination.delete_namespaced_lease(self.name, "kube-node-lease")


def default_capacity() -> dict[str, str]:
    """Capacity of the runtime's own CPU node: generous, since pods share this machine's cores."""
    memory_kib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    return {
        "cpu": str(max(os.cpu_count() or 1, 8)),
        "memory": f"{memory_kib}Ki",
        "pods": "110",
        "ephemeral-storage": "100Gi",
    }
