"""A pod's volumes as folders on this machine, and its mount paths rewritten to them.

ConfigMap, Secret, downwardAPI and projected volumes (service-account tokens included) are
written out as files; a PVC maps to its bound PersistentVolume's folder, a hostPath to itself; an
emptyDir is created, a memory-backed one under /dev/shm. Containers see mount paths, not these
folders, so every mount path in a text file written to a volume (and, through
:func:`rewrite_paths`, in a command, argument, env value or working directory) is rewritten to
its folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_local.kube import Obj
from kubetune_local.pods.context import PodContext
from kubetune_local.pods.sources import VolumeNotReady, field, files_of, read


def rewrite_paths(text: str, mounts: dict[str, Path]) -> str:
    """Replace each mount path (longest first, at path boundaries) by its local folder."""
    for mount_path in sorted(mounts, key=len, reverse=True):
        pattern = re.compile(rf"(?<![\w./-]){re.escape(mount_path)}(?=/|$|[^\w.-])")
        text = pattern.sub(str(mounts[mount_path]).replace("\\", "\\\\"), text)
    return text


def rewrite_file(content: bytes, mounts: dict[str, Path]) -> bytes:
    """A file's content with its mount paths rewritten; binary content as it is."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return content  # binary data stays as it is
    return rewrite_paths(text, mounts).encode("utf-8")


class PodVolumes:
    """The folders of one pod's volumes, by volume name, and each container's mounts of them."""

    def __init__(self, pod: PodContext) -> None:
        self.pod = pod
        self.folders: dict[str, Path] = {}

    def prepare(self) -> None:
        """Give every volume its folder and write its files; VolumeNotReady while a source is missing."""
        base = self.pod.root / "volumes"
        written: dict[str, dict[str, bytes]] = {}
        for volume in self.pod.spec.get("volumes", []):
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                self.folders[name] = self._claim_directory(volume["persistentVolumeClaim"]["claimName"])
                continue
            if "hostPath" in volume:
                self.folders[name] = Path(volume["hostPath"]["path"])
                continue
            if (
                "emptyDir" in volume
                and (volume["emptyDir"] or {}).get("medium") == "Memory"
                and Path("/dev/shm").is_dir()  # noqa: S108 - a memory-backed emptyDir is what /dev/shm is for
            ):
                directory = Path("/dev/shm") / f"kubetune-{self.pod.uid}-{name}"  # noqa: S108 - named by pod uid
            else:
                directory = base / name
            directory.mkdir(parents=True, exist_ok=True)
            written[name] = self._volume_files(volume) or {}
            self.folders[name] = directory
        # Files are written once every volume has its folder: text files get their mount paths
        # rewritten like args and env, so a config file naming /workspace or a claim's mount path
        # (the operator's rendered trainer config does) points at the right folders here too.
        mounts: dict[str, Path] = {}
        for container in [*self.pod.spec.get("initContainers", []), *self.pod.spec.get("containers", [])]:
            mounts.update(self.mounts_of(container))
        for name, files in written.items():
            for relative, content in files.items():
                target = self.folders[name] / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(rewrite_file(content, mounts))

    def mounts_of(self, container: Obj) -> dict[str, Path]:
        """The container's mount paths and the folders behind them (subPath folders created)."""
        # The termination-message file is a mount too, so a path to it in env or args is rewritten.
        mounts: dict[str, Path] = {
            container.get("terminationMessagePath", "/dev/termination-log"): self.pod.termination_file(container)
        }
        for mount in container.get("volumeMounts", []):
            directory = self.folders[mount["name"]]
            if mount.get("subPath"):
                directory = directory / mount["subPath"]
                if not directory.exists() and not directory.suffix:
                    directory.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"].rstrip("/") or "/"] = directory
        return mounts

    def _downward_files(self, items: list[Obj]) -> dict[str, bytes]:
        return {
            item["path"]: field(self.pod, item["fieldRef"]["fieldPath"]).encode()
            for item in items
            if "fieldRef" in item
        }

    def _token(self, source: Obj) -> bytes:
        """A TokenRequest for the pod's service account, bound to the pod."""
        account = self.pod.spec.get("serviceAccountName", "default")
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[source["audience"]] if source.get("audience") else [],
                expiration_seconds=int(source.get("expirationSeconds", 3607)),
                bound_object_ref=client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=self.pod.name, uid=self.pod.uid
                ),
            )
        )
        response = self.pod.core.create_namespaced_service_account_token(account, self.pod.namespace, request)
        return str(response.status.token).encode()

    def _volume_files(self, volume: Obj) -> dict[str, bytes] | None:
        """Files of a ConfigMap, Secret, downwardAPI or projected volume; None for other kinds."""
        pod = self.pod
        if "configMap" in volume:
            source = volume["configMap"]
            return files_of(
                "ConfigMap", read(pod, "ConfigMap", source["name"], source.get("optional", False)), source.get("items")
            )
        if "secret" in volume:
            source = volume["secret"]
            obj = read(pod, "Secret", source["secretName"], source.get("optional", False))
            return files_of("Secret", obj, source.get("items"))
        if "downwardAPI" in volume:
            return self._downward_files(volume["downwardAPI"].get("items", []))
        if "projected" in volume:
            files: dict[str, bytes] = {}
            for source in volume["projected"].get("sources", []):
                if "configMap" in source:
                    cm = source["configMap"]
                    files.update(
                        files_of(
                            "ConfigMap", read(pod, "ConfigMap", cm["name"], cm.get("optional", False)), cm.get("items")
                        )
                    )
                elif "secret" in source:
                    secret = source["secret"]
                    obj = read(pod, "Secret", secret["name"], secret.get("optional", False))
                    files.update(files_of("Secret", obj, secret.get("items")))
                elif "downwardAPI" in source:
                    files.update(self._downward_files(source["downwardAPI"].get("items", [])))
                elif "serviceAccountToken" in source:
                    files[source["serviceAccountToken"]["path"]] = self._token(source["serviceAccountToken"])
            return files
        return None

    def _claim_directory(self, claim: str) -> Path:
        """The folder of the PersistentVolume bound to ``claim``; VolumeNotReady until it is bound."""
        try:
            pvc = self.pod.core.read_namespaced_persistent_volume_claim(claim, self.pod.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise VolumeNotReady(f'persistentvolumeclaim "{claim}" not found') from None
            raise
        if pvc.status.phase != "Bound" or not pvc.spec.volume_name:
            raise VolumeNotReady(f'persistentvolumeclaim "{claim}" is not bound yet')
        pv = self.pod.core.read_persistent_volume(pvc.spec.volume_name)
        path = (pv.spec.host_path and pv.spec.host_path.path) or (pv.spec.local and pv.spec.local.path)
        if not path:
            raise VolumeNotReady(f"persistentvolume {pv.metadata.name} has no local path")
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)
