"""What a pod's volumes and environment are filled from: ConfigMaps, Secrets and the downward API.

Both a volume (``configMap``, ``secret``, ``downwardAPI``, ``projected``) and the environment
(``envFrom``, ``configMapKeyRef``, ``secretKeyRef``, ``fieldRef``) read the same objects and
fields; a source that does not exist yet is :class:`VolumeNotReady`, a state the pod waits in.
"""

from __future__ import annotations

import base64
import re

from kubernetes.client.exceptions import ApiException

from kubetune_local.kube import Obj
from kubetune_local.pods.context import PodContext


class VolumeNotReady(Exception):  # noqa: N818 - a state to wait in, not an error
    """A volume's source (ConfigMap, Secret, PVC) does not exist or is not bound yet."""


def read(pod: PodContext, kind: str, name: str, optional: bool) -> Obj | None:
    """The pod's ConfigMap or Secret ``name``; None when it is missing and ``optional``."""
    try:
        if kind == "ConfigMap":
            obj = pod.core.read_namespaced_config_map(name, pod.namespace)
        else:
            obj = pod.core.read_namespaced_secret(name, pod.namespace)
    except ApiException as exc:
        if exc.status == 404:
            if optional:
                return None
            raise VolumeNotReady(f'{kind.lower()} "{name}" not found') from None
        raise
    data: Obj = pod.runtime.api.sanitize_for_serialization(obj)
    return data


def files_of(kind: str, obj: Obj | None, items: list[Obj] | None) -> dict[str, bytes]:
    """A ConfigMap's or Secret's keys as file contents, all of them or the ``items`` asked for."""
    if obj is None:
        return {}
    raw: dict[str, bytes] = {}
    for key, value in (obj.get("data") or {}).items():
        raw[key] = base64.b64decode(value) if kind == "Secret" else str(value).encode()
    for key, value in (obj.get("binaryData") or {}).items():
        raw[key] = base64.b64decode(value)
    if items:
        return {item["path"]: raw[item["key"]] for item in items if item["key"] in raw}
    return raw


def field(pod: PodContext, path: str) -> str:
    """A downward-API fieldRef value."""
    meta = pod.pod["metadata"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    values = {
        "metadata.name": pod.name,
        "metadata.namespace": pod.namespace,
        "metadata.uid": pod.uid,
        "spec.nodeName": pod.node_name,
        "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
        "status.podIP": pod.ip,
        "status.podIPs": pod.ip,
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
        "metadata.labels": "\n".join(f'{k}="{v}"' for k, v in (meta.get("labels") or {}).items()),
        "metadata.annotations": "\n".join(f'{k}="{v}"' for k, v in (meta.get("annotations") or {}).items()),
    }
    return str(values.get(path, ""))
