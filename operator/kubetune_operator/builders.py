"""Pure builders: (spec, observed facts) → the manifests of a FineTuneJob's children.

Nothing here calls the API. Every function takes a :class:`Target` (the job, its resolved
numbers and the operator's settings) and returns plain dicts ready for server-side apply, so
each can be tested without a cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from kubetune_operator import names
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.config import (
    CONFIG_MOUNT,
    OUTPUT_MOUNT,
    SECRETS_MOUNT,
    SOURCES_MOUNT,
    FineTuneJobSpec,
    Mounts,
    TrainerConfig,
    parse_uri,
)
from kubetune_trainer.config.sources import DATASET_SCHEMES, MODEL_SCHEMES, OUTPUT_SCHEMES

Obj = dict[str, Any]

CONFIG_FILE: Final = "config.json"
TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"
INSTANCE_TYPE_LABEL: Final = "node.kubernetes.io/instance-type"
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
#: Exit code by which the trainer says "retrying will not help" (bad config, bad data).
PERMANENT_EXIT_CODE: Final = 2
NON_ROOT_UID: Final = 1000


@dataclass(frozen=True, slots=True)
class Target:
    """A FineTuneJob with everything the builders need resolved."""

    name: str
    namespace: str
    uid: str
    spec: FineTuneJobSpec
    settings: OperatorSettings
    gpus_per_node: int
    """GPUs each training pod requests (resolved from the spec, the NodeClaims or the byo default)."""
    attempt: int = 0

    @property
    def processes_per_node(self) -> int:
        return self.spec.distributed.processes_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.spec.distributed.nodes * self.processes_per_node

    @property
    def labels(self) -> dict[str, str]:
        return names.job_labels(self.namespace, self.name)

    @property
    def owner(self) -> Obj:
        return {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def meta(self, name: str, **extra_labels: str) -> Obj:
        """Metadata of a namespaced child: labels and the owner reference that garbage collection follows."""
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": {**self.labels, **extra_labels},
            "ownerReferences": [self.owner],
        }


# ------------------------------------------------------------------------------ provisioning


def build_node_claims(target: Target) -> list[Obj]:
    """One Karpenter NodeClaim per training node, of the spec's instance type, GPU-tainted."""
    spec = target.spec.resources
    assert spec.instance_type is not None, "provisioner karpenter requires an instance type (CRD rule)"
    node_class = target.settings.node_class
    return [
        {
            "apiVersion": "karpenter.sh/v1",
            "kind": "NodeClaim",
            "metadata": {
                "name": names.node_claim(target.namespace, target.name, index),
                # Cluster-scoped: no owner reference; the finalizer releases them. Karpenter copies
                # these labels onto the node, so the training pods can select exactly these nodes.
                "labels": {**target.labels, names.UID_LABEL: target.uid},
            },
            "spec": {
                "nodeClassRef": {"group": node_class.group, "kind": node_class.kind, "name": node_class.name},
                "requirements": [
                    {"key": INSTANCE_TYPE_LABEL, "operator": "In", "values": [spec.instance_type]},
                    {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                ],
                "taints": [
                    {"key": names.GPU_TAINT_KEY, "value": target.settings.gpu_taint_value, "effect": "NoSchedule"}
                ],
            },
        }
        for index in range(target.spec.distributed.nodes)
    ]


# ---------------------------------------------------------------------------------- staging


def build_pvc(target: Target) -> Obj | None:
    """The checkpoint and output volume, unless the spec names an existing claim."""
    storage = target.spec.resources.storage
    if storage.existing_claim:
        return None
    spec: Obj = {
        "accessModes": [storage.effective_access_mode(target.spec.distributed.nodes)],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class_name:
        spec["storageClassName"] = storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": target.meta(names.pvc(target.name)),
        "spec": spec,
    }


def workspace_claim(target: Target) -> str:
    return target.spec.resources.storage.existing_claim or names.pvc(target.name)


@dataclass(frozen=True, slots=True)
class _Volume:
    name: str
    source: Obj
    mount_path: str
    read_only: bool


def _source_volumes(target: Target) -> tuple[list[_Volume], Mounts]:
    """Volumes for pvc:// and configmap:// sources and for secretRefs, and where the trainer finds them."""
    volumes: list[_Volume] = []
    claims: dict[str, str] = {}
    config_maps: dict[str, str] = {}
    secrets: dict[str, str] = {}
    workspace = workspace_claim(target)
    spec = target.spec
    uris = [(spec.model.source, MODEL_SCHEMES), (spec.dataset.source, DATASET_SCHEMES)]
    if spec.output.destination:
        uris.append((spec.output.destination, OUTPUT_SCHEMES))
    for uri, schemes in uris:
        source = parse_uri(uri, schemes)
        if source.scheme == "pvc":
            claim = source.authority
            if claim == workspace:
                claims[claim] = OUTPUT_MOUNT
            elif claim not in claims:
                path = f"{SOURCES_MOUNT}/pvc/{claim}"
                claims[claim] = path
                volumes.append(
                    _Volume(f"pvc-{len(claims)}", {"persistentVolumeClaim": {"claimName": claim}}, path, False)
                )
        elif source.scheme == "configmap" and source.authority not in config_maps:
            path = f"{SOURCES_MOUNT}/configmap/{source.authority}"
            config_maps[source.authority] = path
            volumes.append(_Volume(f"cm-{len(config_maps)}", {"configMap": {"name": source.authority}}, path, True))
    for secret in (spec.model.secret_ref, spec.dataset.secret_ref, spec.output.secret_ref):
        if secret and secret not in secrets:
            path = f"{SECRETS_MOUNT}/{secret}"
            secrets[secret] = path
            volumes.append(_Volume(f"secret-{len(secrets)}", {"secret": {"secretName": secret}}, path, True))
    return volumes, Mounts(output=OUTPUT_MOUNT, claims=claims, config_maps=config_maps, secrets=secrets)


def build_trainer_config(target: Target) -> TrainerConfig:
    _, mounts = _source_volumes(target)
    return TrainerConfig(
        job_name=target.name,
        namespace=target.namespace,
        attempt=target.attempt,
        spec=target.spec,
        mounts=mounts,
        metrics_port=target.settings.trainer_metrics_port,
    )


def build_config_map(target: Target) -> Obj:
    """The rendered trainer config the pods read from /etc/kubetune/config.json."""
    config = build_trainer_config(target)
    text = json.dumps(config.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": target.meta(names.config_map(target.name)),
        "data": {CONFIG_FILE: text},
    }


def build_service(target: Target) -> Obj:
    """The headless Service that gives each training pod a DNS name (rank 0's is the master address)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": target.meta(names.service(target.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous happens before any pod is Ready
            "selector": {**target.labels, names.ROLE_LABEL: "trainer"},
            "ports": [{"name": "rendezvous", "port": target.spec.distributed.master_port}],
        },
    }


# ---------------------------------------------------------------------------------- launch


def _node_placement(target: Target) -> tuple[Obj, list[Obj]]:
    """Node selector and tolerations: the job's own claims' nodes, or the byo selector."""
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in target.spec.resources.tolerations]
    if target.spec.resources.provisioner == "karpenter":
        selector = {names.UID_LABEL: target.uid}
        tolerations.append({"key": names.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"})
    else:
        selector = dict(target.spec.resources.node_selector)
    return selector, tolerations


def trainer_command(target: Target) -> list[str]:
    """``kubetune train`` with the gang's shape; the node rank comes from the completion index."""
    distributed = target.spec.distributed
    return [
        "kubetune",
        "train",
        "--config",
        f"{CONFIG_MOUNT}/{CONFIG_FILE}",
        "--nnodes",
        str(distributed.nodes),
        "--node-rank",
        "$(JOB_COMPLETION_INDEX)",
        "--nproc-per-node",
        str(target.processes_per_node),
        "--master-addr",
        names.rank_zero_host(target.name, target.attempt, target.namespace),
        "--master-port",
        str(distributed.master_port),
    ]


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _thread_env(target: Target) -> list[Obj]:
    """OMP_NUM_THREADS from the pod's CPU request shared by its processes.

    torchrun sets it to 1 only with several processes per node; a single process per pod would
    otherwise start a thread per core of the machine, which oversubscribes shared nodes badly.
    """
    if not target.spec.resources.cpu:
        return []
    threads = max(1, int(_cpus(target.spec.resources.cpu) // target.processes_per_node))
    return [{"name": "OMP_NUM_THREADS", "value": str(threads)}]


def build_training_job(target: Target, *, suspend: bool = False) -> Obj:
    """The Indexed Job of one gang attempt: one pod per node, torchrun inside, fail-fast as a gang."""
    spec = target.spec
    resources = spec.resources
    volumes, _ = _source_volumes(target)
    gpu = resources.gpu_resource_name
    limits: Obj = {gpu: str(target.gpus_per_node)} if target.gpus_per_node else {}
    requests: Obj = dict(limits)
    if resources.cpu:
        requests["cpu"] = resources.cpu
    if resources.memory:
        requests["memory"] = resources.memory
        limits["memory"] = resources.memory
    selector, tolerations = _node_placement(target)
    pod_labels = {**target.labels, names.ATTEMPT_LABEL: str(target.attempt), names.ROLE_LABEL: "trainer"}
    container: Obj = {
        "name": names.TRAINER_CONTAINER,
        "image": target.settings.trainer_image,
        "command": trainer_command(target),
        "env": [
            {"name": "KUBETUNE_TERMINATION_MESSAGE_PATH", "value": TERMINATION_MESSAGE_PATH},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *_thread_env(target),
        ],
        "ports": [
            {"name": "metrics", "containerPort": target.settings.trainer_metrics_port},
            {"name": "rendezvous", "containerPort": spec.distributed.master_port},
        ],
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
        },
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "workspace", "mountPath": OUTPUT_MOUNT},
            {"name": "shm", "mountPath": "/dev/shm"},  # noqa: S108 - a memory emptyDir for NCCL and data loaders
            *({"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only} for v in volumes),
        ],
    }
    job_labels = {**target.labels, names.ATTEMPT_LABEL: str(target.attempt)}
    if spec.run_policy.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = spec.run_policy.queue_name
    job_spec: Obj = {
        "completionMode": "Indexed",
        "completions": spec.distributed.nodes,
        "parallelism": spec.distributed.nodes,
        # A gang: one failed pod fails the Job; the operator restarts the whole gang from a checkpoint.
        "backoffLimit": 0,
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": names.TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [PERMANENT_EXIT_CODE],
                    },
                }
            ]
        },
        "suspend": suspend or bool(spec.run_policy.queue_name),
        "template": {
            "metadata": {"labels": pod_labels},
            "spec": {
                "subdomain": names.service(target.name),
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": NON_ROOT_UID,
                    "runAsGroup": NON_ROOT_UID,
                    "fsGroup": NON_ROOT_UID,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                **({"nodeSelector": selector} if selector else {}),
                **({"tolerations": tolerations} if tolerations else {}),
                "containers": [container],
                "volumes": [
                    {"name": "config", "configMap": {"name": names.config_map(target.name)}},
                    {"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim(target)}},
                    {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shared_memory}},
                    *({"name": v.name, **v.source} for v in volumes),
                ],
            },
        },
    }
    if spec.run_policy.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**target.meta(names.training_job(target.name, target.attempt)), "labels": job_labels},
        "spec": job_spec,
    }
