"""A ModelServer's children: the adapters ConfigMap, the server's Deployment and its Service.

Every replica mounts the base model and the adapter claim read-only. The built-in server reads the
adapters ConfigMap once at start and loads each adapter in it before ``/readyz`` answers, so a
restarted replica comes back whole; the operator loads and unloads adapters on running replicas
through their HTTP API (:mod:`kubetune_operator.servers`). vLLM runs with runtime LoRA updating on.
"""

from __future__ import annotations

import json
from typing import Final

from kubetune_api import SOURCES_MOUNT, parse_uri
from kubetune_api.instances import instance_shape
from kubetune_api.modelserver import MS_KIND, ModelServer
from kubetune_api.objects import Obj
from kubetune_api.resource import API_VERSION
from kubetune_api.uris import MODEL_SCHEMES
from kubetune_operator import names
from kubetune_operator.children import pod
from kubetune_operator.children.nodes import KARPENTER_API_VERSION, NODE_POOL_KIND, pool_template
from kubetune_operator.children.serving import max_lora_rank, server_probes
from kubetune_operator.settings import OperatorSettings

#: Where every replica sees the adapter claim, and the adapters file.
ADAPTERS_MOUNT: Final = "/var/run/kubetune/adapters"
ADAPTERS_FILE_MOUNT: Final = "/etc/kubetune/adapters"
ADAPTERS_FILE: Final = "adapters.json"


def server_gpus(server: ModelServer) -> int:
    """GPUs per replica: spec.gpus, else 1 for vLLM and 0 for the built-in server."""
    spec = server.spec
    if spec.gpus is not None:
        return spec.gpus
    return 1 if spec.runtime == "vllm" else 0


def server_url(server: ModelServer) -> str:
    """The in-cluster base URL of the shared server's OpenAI-compatible API."""
    return f"http://{names.model_server(server.name)}.{server.namespace}.svc:{server.spec.port}/v1"


def adapter_path(server: ModelServer, uri: str) -> str | None:
    """Where the replicas read an adapter published at ``uri``, relative to the adapter claim's mount
    (``./team/bot``); None unless it lies on the adapter claim.

    Relative, because both servers resolve it against that mount: the built-in server against
    ``--runtime-adapters`` (and refuses what leads out of it), vLLM against its working directory,
    which is the mount. The leading ``./`` keeps vLLM from reading a missing folder as a hub name.
    """
    try:
        parsed = parse_uri(uri, ("pvc",))
    except ValueError:
        return None
    path = parsed.path.strip("/")
    if parsed.authority != server.spec.adapter_claim or not path:
        return None
    return f"./{path}"


def _owner(server: ModelServer, uid: str) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": MS_KIND,
        "name": server.name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(server: ModelServer, uid: str, name: str) -> Obj:
    return {
        "name": name,
        "namespace": server.namespace,
        "labels": names.server_labels(server.namespace, server.name),
        "ownerReferences": [_owner(server, uid)],
    }


def build_adapters_config_map(server: ModelServer, uid: str, adapters: dict[str, str]) -> Obj:
    """The adapters a (re)starting replica loads before it reports ready: ``{model name: path in the claim}``."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(server, uid, names.server_adapters(server.name)),
        "data": {ADAPTERS_FILE: json.dumps(dict(sorted(adapters.items())), indent=1)},
    }


def _model_path(server: ModelServer, volumes: list[Obj], mounts: list[Obj]) -> tuple[str, list[str]]:
    """The base model's path in the server (a claim mounted read-only, or a hub name vLLM fetches) and vLLM's revision flags."""
    model = parse_uri(server.spec.model.source, MODEL_SCHEMES)
    if model.scheme == "hf":
        location, _, revision = model.location.partition("@")
        return location, (["--revision", revision, "--tokenizer-revision", revision] if revision else [])
    if model.authority == server.spec.adapter_claim:
        return f"{ADAPTERS_MOUNT}/{model.path}".rstrip("/"), []
    mount = f"{SOURCES_MOUNT}/pvc/{model.authority}"
    volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": model.authority, "readOnly": True}})
    mounts.append({"name": "model", "mountPath": mount, "readOnly": True})
    return f"{mount}/{model.path}".rstrip("/"), []


def server_command(server: ModelServer, model_path: str, revision: list[str]) -> list[str]:
    """``kubetune serve`` with runtime adapters from the claim, or ``vllm serve`` with runtime LoRA updating."""
    spec = server.spec
    port = str(spec.port)
    if spec.runtime == "vllm":
        return pod.argv(
            "vllm",
            "serve",
            model_path,
            *revision,
            "--host",
            "0.0.0.0",  # noqa: S104
            "--port",
            port,
            "--served-model-name",
            server.name,
            "--enable-lora",
            "--max-loras",
            str(spec.max_adapters),
            "--max-lora-rank",
            str(max_lora_rank(spec.max_lora_rank)),
        )
    return pod.argv(
        "kubetune",
        "serve",
        "--model",
        model_path,
        "--base-name",
        server.name,
        "--port",
        port,
        "--runtime-adapters",
        ADAPTERS_MOUNT,
        "--adapters-file",
        f"{ADAPTERS_FILE_MOUNT}/{ADAPTERS_FILE}",
    )


def _resources(server: ModelServer) -> Obj:
    gpus = server_gpus(server)
    limits: Obj = {server.spec.gpu_resource_name: str(gpus)} if gpus else {}
    requests: Obj = dict(limits)
    if server.spec.cpu:
        requests["cpu"] = server.spec.cpu
    if server.spec.memory:
        requests["memory"] = server.spec.memory
        limits["memory"] = server.spec.memory
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def build_server_deployment(server: ModelServer, uid: str, settings: OperatorSettings) -> Obj:
    """The shared server's Deployment: every replica mounts the base, the adapter claim and the adapters file."""
    spec = server.spec
    vllm = spec.runtime == "vllm"
    volumes: list[Obj] = [
        {"name": "adapters", "persistentVolumeClaim": {"claimName": spec.adapter_claim, "readOnly": True}},
        {"name": "adapters-file", "configMap": {"name": names.server_adapters(server.name)}},
    ]
    mounts: list[Obj] = [
        {"name": "adapters", "mountPath": ADAPTERS_MOUNT, "readOnly": True},
        {"name": "adapters-file", "mountPath": ADAPTERS_FILE_MOUNT, "readOnly": True},
    ]
    model_path, revision = _model_path(server, volumes, mounts)
    env: list[Obj] = [*pod.base_env(), {"name": "HOME", "value": "/tmp"}]  # noqa: S108
    if vllm:
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}})
        mounts.append(pod.shm_mount())
    elif spec.cpu:
        env.append({"name": "OMP_NUM_THREADS", "value": str(max(1, int(pod.cpus(spec.cpu))))})
    labels = names.server_labels(server.namespace, server.name)
    container: Obj = {
        "name": names.SERVER_CONTAINER,
        "image": settings.vllm_image if vllm else settings.trainer_image,
        "command": server_command(server, model_path, revision),
        # vLLM resolves a relative lora_path against its working directory (see adapter_path).
        **({"workingDir": ADAPTERS_MOUNT} if vllm else {}),
        "env": env,
        "ports": [{"name": "http", "containerPort": spec.port}],
        "resources": _resources(server),
        **server_probes(vllm=vllm),
        "securityContext": pod.container_security(),
        "volumeMounts": mounts,
    }
    node_selector, tolerations = _placement(server, uid)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(server, uid, names.model_server(server.name)),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": pod.pod_security(),
                    **({"nodeSelector": node_selector} if node_selector else {}),
                    **({"tolerations": tolerations} if tolerations else {}),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def _placement(server: ModelServer, uid: str) -> tuple[dict[str, str], list[Obj]]:
    """Node selector and tolerations: the nodes of the server's own NodePool (instanceType; this server's, by its uid,
    not a deleted namesake's), else spec.nodeSelector."""
    gpu_toleration = {"key": names.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
    if server.spec.instance_type:
        # The pool's nodes carry the GPU taint (CPU instance types too), so the replicas tolerate it.
        return {names.NODEPOOL_LABEL: server_pool_name(server), names.UID_LABEL: uid}, [gpu_toleration]
    return dict(server.spec.node_selector), [gpu_toleration] if server_gpus(server) else []


def server_pool_name(server: ModelServer) -> str:
    return names.server_node_pool(server.namespace, server.name)


def build_server_node_pool(server: ModelServer, uid: str, settings: OperatorSettings) -> Obj:
    """The server's Karpenter NodePool: up to replicas + 1 nodes of spec.instanceType (one more for a rollout).

    Cluster-scoped, so no owner reference reaches it: the operator's finalizer on the ModelServer
    deletes it, and the sweep deletes one whose server is gone. Nodes are consolidated once empty.
    """
    spec = server.spec
    assert spec.instance_type is not None, "only a server with spec.instanceType gets a pool"
    labels = {**names.server_labels(server.namespace, server.name), names.UID_LABEL: uid}
    nodes = spec.replicas + 1
    limits: Obj = {"nodes": str(nodes)}
    shape = instance_shape(spec.instance_type)
    if shape is not None and shape.gpus:
        limits[spec.gpu_resource_name] = str(shape.gpus * nodes)
    return {
        "apiVersion": KARPENTER_API_VERSION,
        "kind": NODE_POOL_KIND,
        "metadata": {"name": server_pool_name(server), "labels": labels},
        "spec": {
            "template": pool_template(settings, labels, spec.instance_type, "on-demand"),
            "limits": limits,
            "disruption": {
                "consolidationPolicy": "WhenEmpty",
                "consolidateAfter": settings.consolidate_after,
                "budgets": [{"nodes": "100%"}],
            },
        },
    }


def build_server_service(server: ModelServer, uid: str) -> Obj:
    """The ClusterIP Service in front of the replicas (status.url and the jobs' status.endpoint name it)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(server, uid, names.model_server(server.name)),
        "spec": {
            "selector": names.server_labels(server.namespace, server.name),
            "ports": [{"name": "http", "port": server.spec.port, "targetPort": "http"}],
        },
    }
