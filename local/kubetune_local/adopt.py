"""Adopt the Nodes that real Karpenter (its KWOK cloud provider) creates, and run their pods.

Karpenter's KWOK provider launches a NodeClaim by creating a Node object itself
(``spec.providerID: kwok://<node name>``, label ``karpenter.sh/nodepool``, annotation
``kwok.x-k8s.io/node: fake``), with no conditions and, oddly, the claim's *requests* as its
capacity. Nothing makes it Ready: in a kwok cluster the kwok controller would. Here the node
daemon takes it over: it writes the node's status (the instance type's capacity from the
catalog, Ready, addresses, the kubelet endpoint), renews its Lease, lifts the claim's startup
taints (there is no GPU operator to wait for) and runs the pods bound to it, as it does for its
own nodes. Karpenter then marks the claim Initialized and Ready.

Termination is Karpenter's: it taints the Node ``karpenter.sh/disrupted:NoSchedule``, evicts
its pods (the pod watch stops them and removes the objects, as a kubelet would), deletes the
NodeClaim and finally lets the Node go. When the Node is gone the daemon stops its heartbeat
and anything still running there.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Final

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from kubetune_local.catalog import GPU_RESOURCE, capacity_of, lookup
from kubetune_local.kube import Obj
from kubetune_local.node import NodeAgent

if TYPE_CHECKING:
    from kubetune_local.node import Runtime

KWOK_PROVIDER_PREFIX: Final = "kwok://"
NODEPOOL_LABEL: Final = "karpenter.sh/nodepool"
KWOK_LABEL: Final = "kwok.x-k8s.io/node"
INSTANCE_TYPE_LABEL: Final = "node.kubernetes.io/instance-type"


def is_karpenter_node(node: Obj) -> bool:
    """A Node that Karpenter's KWOK provider created (and that no kubelet will ever run).

    The provider marks every node it creates with ``kwok://`` and the ``kwok.x-k8s.io/node``
    label, for a NodePool's claims and for bare NodeClaims (no ``karpenter.sh/nodepool``) alike.
    """
    provider_id = str((node.get("spec") or {}).get("providerID") or "")
    labels = node["metadata"].get("labels") or {}
    return provider_id.startswith(KWOK_PROVIDER_PREFIX) and labels.get(KWOK_LABEL) == "fake"


def node_resources(node: Obj) -> tuple[dict[str, str], dict[str, str]]:
    """(capacity, allocatable) for an adopted node.

    Capacity is the instance type's, from the catalog (the KWOK provider writes the claim's
    requests there). Allocatable is what Karpenter computed (capacity less its overhead), with
    any resource it lacks taken from the capacity.
    """
    labels = node["metadata"].get("labels") or {}
    status = node.get("status") or {}
    allocatable = {str(k): str(v) for k, v in (status.get("allocatable") or {}).items()}
    instance = lookup(labels.get(INSTANCE_TYPE_LABEL, ""))
    if instance is None:
        capacity = dict(allocatable) or {str(k): str(v) for k, v in (status.get("capacity") or {}).items()}
    else:
        capacity = capacity_of(instance)
    return capacity, {**capacity, **allocatable}


def without_startup_taints(taints: list[Obj], startup: list[Obj]) -> list[Obj]:
    """``taints`` less those matching a startup taint (same key and effect, as Karpenter matches)."""
    lifted = {(t.get("key"), t.get("effect")) for t in startup}
    return [t for t in taints if (t.get("key"), t.get("effect")) not in lifted]


class KarpenterNodeAdopter:
    """Watches Nodes; adopts Karpenter's as process-backed nodes, forgets them once deleted."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.core = client.CoreV1Api(runtime.api)
        self.custom = client.CustomObjectsApi(runtime.api)
        self.thread = threading.Thread(target=self._loop, name="karpenter-node-adopter", daemon=True)
        self._adopted: set[str] = set()
        self._startup: dict[str, list[Obj]] = {}

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while not self.runtime.stopping.is_set():
            try:
                listing = self.core.list_node(_preload_content=False)
                data = json.loads(listing.data)
                seen = set()
                for node in data["items"]:
                    seen.add(node["metadata"]["name"])
                    self._reconcile("ADDED", node)
                for gone in self._adopted - seen:
                    self._forget(gone)
                stream = watch.Watch().stream(
                    self.core.list_node, resource_version=data["metadata"]["resourceVersion"], timeout_seconds=60
                )
                for event in stream:
                    if self.runtime.stopping.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._reconcile(event["type"], event["raw_object"])
            except Exception as exc:
                self.runtime.log(f"karpenter node adopter: {exc!r}")
                time.sleep(1)

    def _reconcile(self, kind: str, node: Obj) -> None:
        if not is_karpenter_node(node):
            return
        name = node["metadata"]["name"]
        if kind == "DELETED":
            self._forget(name)
            return
        if node["metadata"].get("deletionTimestamp"):
            return
        if name not in self._adopted:
            self._adopt(node)
        # Karpenter adds the claim's startup taints when it registers the node (after we adopted it).
        if name not in self._startup:
            found = self._startup_taints(node)
            if found is not None:
                self._startup[name] = found
        startup = self._startup.get(name) or []
        taints = list((node.get("spec") or {}).get("taints") or [])
        if startup and len(without_startup_taints(taints, startup)) != len(taints):
            self._lift_startup_taints(name, startup)

    def _adopt(self, node: Obj) -> None:
        name = node["metadata"]["name"]
        labels = node["metadata"].get("labels") or {}
        capacity, allocatable = node_resources(node)
        extra: dict[str, str] = {}
        instance = lookup(labels.get(INSTANCE_TYPE_LABEL, ""))
        if instance is not None and instance.gpus:
            extra["nvidia.com/gpu.product"] = instance.gpu_model
            extra["nvidia.com/gpu.count"] = str(instance.gpus)
        agent = NodeAgent(
            self.runtime,
            name,
            capacity=capacity,
            allocatable=allocatable,
            labels=extra,
            provider_id=str(node["spec"]["providerID"]),
            adopt=True,
        )
        self._adopted.add(name)
        self.runtime.add_node(agent)
        self.runtime.log(
            f"adopted Karpenter node {name} (nodepool {labels.get(NODEPOOL_LABEL, '-')}, "
            f"{labels.get(INSTANCE_TYPE_LABEL)}, {capacity.get(GPU_RESOURCE, '0')} GPU)"
        )

    def _startup_taints(self, node: Obj) -> list[Obj] | None:
        """The startup taints of the node's NodeClaim; None while it cannot be read.

        The KWOK provider names the claim in the node's ``kubernetes.io/hostname`` label (the
        NodeClaim ownerReference only comes with registration); the providerID must match.
        """
        claim_name = (node["metadata"].get("labels") or {}).get("kubernetes.io/hostname", "")
        try:
            claim = self.custom.get_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", claim_name)
        except ApiException as exc:
            self.runtime.log(f"node {node['metadata']['name']}: reading NodeClaim {claim_name!r}: {exc.status}")
            return None
        if (claim.get("status") or {}).get("providerID") not in (None, node["spec"].get("providerID")):
            return None
        return list(claim["spec"].get("startupTaints") or [])

    def _lift_startup_taints(self, name: str, startup: list[Obj]) -> None:
        """Remove the claim's startup taints, as a GPU operator does once the devices are ready."""
        try:
            current: Obj = json.loads(self.core.read_node(name, _preload_content=False).data)
            taints = list((current.get("spec") or {}).get("taints") or [])
            kept = without_startup_taints(taints, startup)
            if len(kept) == len(taints):
                return
            # A merge patch replaces the list; the resourceVersion makes it fail rather than race Karpenter.
            body = {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]}, "spec": {"taints": kept}}
            self.core.patch_node(name, body)
            self.runtime.log(f"node {name}: startup taints lifted")
        except ApiException as exc:
            self.runtime.log(f"node {name}: lifting startup taints: {exc.status} (retried on the next event)")

    def _forget(self, name: str) -> None:
        if name not in self._adopted:
            return
        self._adopted.discard(name)
        self._startup.pop(name, None)
        self.runtime.remove_node(name)
        self.runtime.log(f"Karpenter node {name} is gone")
