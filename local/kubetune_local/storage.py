"""Local storage: a default StorageClass whose PersistentVolumes are folders on this machine.

Like Rancher's local-path provisioner, but the folders are shared by every process-backed node,
so a claim can be ReadWriteMany: all pods of a multi-node training see the same checkpoints.
Data outlives the pods; a released volume's folder is removed when its reclaim policy is Delete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from kubetune_local.kube import Obj

if TYPE_CHECKING:
    from kubetune_local.node import Runtime

STORAGE_CLASS: Final = "kubetune-local"
PROVISIONER: Final = "kubetune.io/local-path"


def storage_class() -> Obj:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }


class LocalPathProvisioner:
    """Creates a PersistentVolume (a folder) for each pending claim of the local StorageClass."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.core = client.CoreV1Api(runtime.api)
        self.root = runtime.home / "volumes"
        self.thread = threading.Thread(target=self._loop, name="local-path-provisioner", daemon=True)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.runtime.stopping.is_set():
            try:
                self._sync()
                stream = watch.Watch().stream(
                    self.core.list_persistent_volume_claim_for_all_namespaces, timeout_seconds=10
                )
                for event in stream:
                    if self.runtime.stopping.is_set():
                        return
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._provision(event["raw_object"])
                    self._reclaim()
            except Exception as exc:
                self.runtime.log(f"local-path provisioner: {exc!r}")
                time.sleep(1)

    def _sync(self) -> None:
        claims = json.loads(self.core.list_persistent_volume_claim_for_all_namespaces(_preload_content=False).data)
        for claim in claims["items"]:
            self._provision(claim)
        self._reclaim()

    def _provision(self, claim: Obj) -> None:
        spec, meta = claim["spec"], claim["metadata"]
        if spec.get("storageClassName") != STORAGE_CLASS or spec.get("volumeName") or meta.get("deletionTimestamp"):
            return
        name = f"pvc-{meta['uid']}"
        directory = self.root / f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
            "spec": {
                "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": STORAGE_CLASS,
                "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        try:
            self.core.create_persistent_volume(volume)
            self.runtime.log(f"provisioned {name} at {directory} for {meta['namespace']}/{meta['name']}")
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _reclaim(self) -> None:
        """Delete released volumes of ours (folder and object) whose policy says Delete."""
        volumes = json.loads(self.core.list_persistent_volume(_preload_content=False).data)
        for volume in volumes["items"]:
            meta, spec = volume["metadata"], volume["spec"]
            if (meta.get("annotations") or {}).get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
                continue
            if (
                volume.get("status", {}).get("phase") != "Released"
                or spec.get("persistentVolumeReclaimPolicy") != "Delete"
            ):
                continue
            path = Path(spec["hostPath"]["path"])
            if path.is_relative_to(self.root):
                shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(ApiException):
                self.core.delete_persistent_volume(meta["name"])
            self.runtime.log(f"reclaimed {meta['name']} ({path})")
