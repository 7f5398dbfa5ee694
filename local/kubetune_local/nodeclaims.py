"""Fulfil Karpenter NodeClaims with process-backed nodes, the way Karpenter does in a cloud.

A claim names an instance type through its requirements; the local provisioner looks it up in
the catalog, registers a node with the claim's labels and taints and the type's capacity
(``nvidia.com/gpu`` included), and walks the claim through Launched, Registered, Initialized
and Ready. Deleting a claim terminates its node: the pods stop and the Node goes away.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Final

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from kubetune_local.catalog import FAILURES_CONFIGMAP, InstanceType, capacity_of, lookup
from kubetune_local.kube import Obj, stamp
from kubetune_local.node import NodeAgent

if TYPE_CHECKING:
    from kubetune_local.node import Runtime

GROUP: Final = "karpenter.sh"
VERSION: Final = "v1"
PLURAL: Final = "nodeclaims"
FINALIZER: Final = "karpenter.sh/termination"
INSTANCE_TYPE_LABEL: Final = "node.kubernetes.io/instance-type"
PROVIDER: Final = "kubetune-local"


def _condition(kind: str, ok: bool, reason: str, message: str = "") -> Obj:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": stamp(),
    }


def requested_instance_type(claim: Obj) -> str | None:
    for requirement in claim["spec"].get("requirements", []):
        if requirement.get("key") == INSTANCE_TYPE_LABEL and requirement.get("operator") == "In":
            values = requirement.get("values") or []
            return str(values[0]) if values else None
    return None


class NodeClaimProvisioner:
    """Watches NodeClaims and launches or terminates process-backed nodes for them."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.custom = client.CustomObjectsApi(runtime.api)
        self.core = client.CoreV1Api(runtime.api)
        self.thread = threading.Thread(target=self._loop, name="nodeclaim-provisioner", daemon=True)
        self._launched: set[str] = set()

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        while not self.runtime.stopping.is_set():
            try:
                listing = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
                for claim in listing["items"]:
                    self._reconcile(claim)
                stream = watch.Watch().stream(
                    self.custom.list_cluster_custom_object,
                    GROUP,
                    VERSION,
                    PLURAL,
                    resource_version=listing["metadata"]["resourceVersion"],
                    timeout_seconds=30,
                )
                for event in stream:
                    if self.runtime.stopping.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._reconcile(event["object"])
            except Exception as exc:
                self.runtime.log(f"nodeclaim provisioner: {exc!r}")
                time.sleep(1)

    def _failure(self, instance_type: str) -> tuple[str, str] | None:
        """A configured failure for this instance type: (reason, message)."""
        try:
            configmap = self.core.read_namespaced_config_map(FAILURES_CONFIGMAP, "kube-system")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        entry = (configmap.data or {}).get(instance_type)
        if not entry:
            return None
        reason, _, message = entry.partition(":")
        return reason.strip(), message.strip() or reason.strip()

    def _set_status(self, name: str, status: Obj) -> None:
        self.custom.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, name, {"status": status})

    def _reconcile(self, claim: Obj) -> None:
        meta = claim["metadata"]
        name = meta["name"]
        if meta.get("deletionTimestamp"):
            self._terminate(claim)
            return
        if name in self._launched:
            return
        instance_name = requested_instance_type(claim) or "local-cpu"
        instance = lookup(instance_name)
        failure = self._failure(instance_name)
        if instance is None:
            failure = ("InstanceTypeNotFound", f"instance type {instance_name!r} is not offered by the local catalog")
        if failure is not None:
            conditions = claim.get("status", {}).get("conditions") or []
            if not any(c["type"] == "Launched" and c["reason"] == failure[0] for c in conditions):
                self._set_status(name, {"conditions": [_condition("Launched", False, *failure)]})
                self.runtime.log(f"nodeclaim {name}: launch failed: {failure[0]}: {failure[1]}")
            return
        assert instance is not None
        self._launch(claim, instance)

    def _launch(self, claim: Obj, instance: InstanceType) -> None:
        meta, spec = claim["metadata"], claim["spec"]
        name = meta["name"]
        finalizers = meta.get("finalizers") or []
        if FINALIZER not in finalizers:
            self.custom.patch_cluster_custom_object(
                GROUP, VERSION, PLURAL, name, {"metadata": {"finalizers": [*finalizers, FINALIZER]}}
            )
        provider_id = f"{PROVIDER}:///{instance.zone}/{name}"
        capacity = capacity_of(instance)
        # Karpenter labels the claim with what it launched (kubectl get nodeclaims shows them).
        launched = {
            INSTANCE_TYPE_LABEL: instance.name,
            "topology.kubernetes.io/zone": instance.zone,
            "karpenter.sh/capacity-type": instance.capacity_type,
        }
        self.custom.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, {"metadata": {"labels": launched}})
        self._set_status(
            name,
            {
                "providerID": provider_id,
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [_condition("Launched", True, "Launched")],
            },
        )
        labels = {
            **(meta.get("labels") or {}),
            **launched,
            "karpenter.sh/registered": "true",
            "karpenter.sh/initialized": "true",
        }
        for requirement in spec.get("requirements", []):
            values = requirement.get("values") or []
            if requirement.get("operator") == "In" and len(values) == 1:
                labels.setdefault(requirement["key"], values[0])
        if instance.gpus:
            labels["nvidia.com/gpu.product"] = instance.gpu_model
            labels["nvidia.com/gpu.count"] = str(instance.gpus)
        agent = NodeAgent(
            self.runtime,
            name,
            capacity=capacity,
            labels=labels,
            taints=list(spec.get("taints") or []),  # startup taints are lifted at once: no GPU operator to wait for
            provider_id=provider_id,
        )
        self.runtime.add_node(agent)
        self._launched.add(name)
        self._set_status(
            name,
            {
                "nodeName": name,
                "providerID": provider_id,
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [
                    _condition("Launched", True, "Launched"),
                    _condition("Registered", True, "Registered"),
                    _condition("Initialized", True, "Initialized"),
                    _condition("Ready", True, "Ready"),
                ],
            },
        )
        self.runtime.log(f"nodeclaim {name}: node ready ({instance.name}, {instance.gpus} GPU)")

    def _terminate(self, claim: Obj) -> None:
        meta = claim["metadata"]
        name = meta["name"]
        if FINALIZER not in (meta.get("finalizers") or []):
            return
        self.runtime.remove_node(name)
        self._launched.discard(name)
        remaining = [f for f in meta["finalizers"] if f != FINALIZER]
        with contextlib.suppress(ApiException):
            self.custom.patch_cluster_custom_object(
                GROUP,
                VERSION,
                PLURAL,
                name,
                {"metadata": {"finalizers": remaining or None, "resourceVersion": meta["resourceVersion"]}},
            )
        self.runtime.log(f"nodeclaim {name}: terminated")
