"""Pure builders: (spec, observed facts) → the manifests of a FineTuneJob's children.

Nothing here calls the API. Every function takes a :class:`Target` (the job, its resolved
numbers and the operator's settings) and returns plain dicts ready for server-side apply, so
each can be tested without a cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from kubetune_api import (
    CONFIG_MOUNT,
    OUTPUT_MOUNT,
    SECRETS_MOUNT,
    SOURCES_MOUNT,
    FineTuneJobSpec,
    Mounts,
    TrainerConfig,
    parse_uri,
)
from kubetune_api.uris import DATASET_SCHEMES, MODEL_SCHEMES, OUTPUT_SCHEMES
from kubetune_operator import names
from kubetune_operator.settings import OperatorSettings

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


def _node_claim(target: Target, name: str, instance_type: str, role: str) -> Obj:
    """A Karpenter NodeClaim of ``instance_type``, GPU-tainted, labelled with the job and the ``role`` of its pods."""
    node_class = target.settings.node_class
    return {
        "apiVersion": "karpenter.sh/v1",
        "kind": "NodeClaim",
        "metadata": {
            "name": name,
            # Cluster-scoped: no owner reference; the finalizer releases them. Karpenter copies
            # these labels onto the node, so the job's pods can select exactly these nodes.
            "labels": {**target.labels, names.UID_LABEL: target.uid, names.ROLE_LABEL: role},
        },
        "spec": {
            "nodeClassRef": {"group": node_class.group, "kind": node_class.kind, "name": node_class.name},
            "requirements": [
                {"key": INSTANCE_TYPE_LABEL, "operator": "In", "values": [instance_type]},
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
            ],
            "taints": [{"key": names.GPU_TAINT_KEY, "value": target.settings.gpu_taint_value, "effect": "NoSchedule"}],
        },
    }


def build_node_claims(target: Target) -> list[Obj]:
    """One Karpenter NodeClaim per training node, of the spec's instance type."""
    instance_type = target.spec.resources.instance_type
    assert instance_type is not None, "provisioner karpenter requires an instance type (CRD rule)"
    return [
        _node_claim(target, names.node_claim(target.namespace, target.name, index), instance_type, names.ROLE_TRAINER)
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
        selector = {names.UID_LABEL: target.uid, names.ROLE_LABEL: names.ROLE_TRAINER}
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


def _pod_security() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": NON_ROOT_UID,
        "runAsGroup": NON_ROOT_UID,
        "fsGroup": NON_ROOT_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> Obj:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


# -------------------------------------------------------------------------------- publish


def result_folder(target: Target) -> str:
    """The folder the trainer leaves the result in: ``adapter`` (or ``model`` for full fine-tuning)."""
    return target.spec.method.result_folder


def default_result_uri(target: Target) -> str:
    """Where the result is when spec.output.destination is unset: the job's own volume."""
    return f"pvc://{workspace_claim(target)}/{result_folder(target)}"


def build_publish_job(target: Target) -> Obj:
    """The Job that publishes the trained result to spec.output.destination and reports its URI, digest and size.

    It runs on the training nodes (they are released only after it) with the job's volume, the
    trainer config and the output Secret; no GPU. Its termination message is the JSON result that
    the operator copies into status.adapter. Exit 2 (a wrong credential, say) fails it at once.
    """
    volumes, _ = _source_volumes(target)
    selector, tolerations = _node_placement(target)
    labels = {**target.labels, names.ROLE_LABEL: names.ROLE_PUBLISH}
    container: Obj = {
        "name": names.PUBLISH_CONTAINER,
        "image": target.settings.trainer_image,
        "command": [
            "kubetune",
            "publish",
            "--config",
            f"{CONFIG_MOUNT}/{CONFIG_FILE}",
            "--default-uri",
            default_result_uri(target),
        ],
        "env": [
            {"name": "KUBETUNE_TERMINATION_MESSAGE_PATH", "value": TERMINATION_MESSAGE_PATH},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "securityContext": _container_security(),
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "workspace", "mountPath": OUTPUT_MOUNT},
            *({"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only} for v in volumes),
        ],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": target.meta(names.publish_job(target.name), **{names.ROLE_LABEL: names.ROLE_PUBLISH}),
        "spec": {
            "backoffLimit": 3,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": names.PUBLISH_CONTAINER,
                            "operator": "In",
                            "values": [PERMANENT_EXIT_CODE],
                        },
                    }
                ]
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security(),
                    **({"nodeSelector": selector} if selector else {}),
                    **({"tolerations": tolerations} if tolerations else {}),
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": names.config_map(target.name)}},
                        {"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim(target)}},
                        *({"name": v.name, **v.source} for v in volumes),
                    ],
                },
            },
        },
    }


# -------------------------------------------------------------------------------- serving

#: Where a serving pod sees the base model and the adapter.
SERVE_MODEL_MOUNT: Final = "/var/run/kubetune/model"
SERVE_ADAPTER_MOUNT: Final = "/var/run/kubetune/adapter"
#: LoRA ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS: Final = (8, 16, 32, 64, 128, 256, 320, 512)


def serving_gpus(target: Target) -> int:
    serving = target.spec.serving
    if serving.gpus is not None:
        return serving.gpus
    return 1 if serving.runtime == "vllm" else 0


def serving_model_name(target: Target) -> str:
    return target.spec.serving.model_name or target.name


def endpoint_url(target: Target) -> str:
    """The in-cluster base URL of the OpenAI-compatible API."""
    return f"http://{names.serving(target.name)}.{target.namespace}.svc:{target.spec.serving.port}/v1"


def max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank ``r``."""
    for rank in VLLM_LORA_RANKS:
        if r <= rank:
            return rank
    raise ValueError(f"LoRA rank {r} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")


def build_serving_node_claims(target: Target) -> list[Obj]:
    """One NodeClaim per serving replica, of serving.instanceType (else the training instance type)."""
    instance_type = target.spec.serving.instance_type or target.spec.resources.instance_type
    assert instance_type is not None, "provisioner karpenter requires an instance type (CRD rule)"
    return [
        _node_claim(
            target, names.serving_node_claim(target.namespace, target.name, index), instance_type, names.ROLE_SERVER
        )
        for index in range(target.spec.serving.replicas)
    ]


@dataclass(frozen=True, slots=True)
class _ServingFiles:
    """How a serving pod gets the base model and the adapter: volumes, init containers and paths."""

    volumes: list[Obj]
    mounts: list[Obj]
    init_containers: list[Obj]
    model_path: str
    adapter_path: str | None
    """None when the merged model is served (vLLM with a DoRA adapter)."""


def _serving_files(target: Target, adapter_uri: str) -> _ServingFiles:
    spec = target.spec
    volumes: list[Obj] = [{"name": "config", "configMap": {"name": names.config_map(target.name)}}]
    mounts: list[Obj] = [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
    inits: list[Obj] = []
    claims: dict[str, str] = {}

    def claim_path(claim: str, path: str) -> str:
        if claim not in claims:
            claims[claim] = f"{SOURCES_MOUNT}/pvc/{claim}"
            name = f"pvc-{len(claims)}"
            volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
            mounts.append({"name": name, "mountPath": claims[claim], "readOnly": True})
        return f"{claims[claim]}/{path}".rstrip("/")

    def init(name: str, command: list[str], volume: str, mount: str) -> None:
        volumes.append({"name": volume, "emptyDir": {}})
        mounts.append({"name": volume, "mountPath": mount, "readOnly": True})
        inits.append(
            {
                "name": name,
                "image": target.settings.trainer_image,
                "command": command,
                "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": "/tmp"}],  # noqa: S108
                "securityContext": _container_security(),
                "volumeMounts": [
                    *(m for m in mounts if m["name"] != volume),
                    {"name": volume, "mountPath": mount},
                ],
            }
        )

    if spec.output.secret_ref:
        volumes.append({"name": "output-secret", "secret": {"secretName": spec.output.secret_ref}})
        mounts.append(
            {"name": "output-secret", "mountPath": f"{SECRETS_MOUNT}/{spec.output.secret_ref}", "readOnly": True}
        )

    merged = spec.serving.runtime == "vllm" and spec.method.type == "dora"
    if merged:
        # vLLM cannot apply DoRA: serve the merged model the trainer wrote (output.merge, a CRD rule).
        return _ServingFiles(volumes, mounts, inits, claim_path(workspace_claim(target), "merged"), None)

    result = parse_uri(adapter_uri, OUTPUT_SCHEMES)
    pull = ["kubetune", "pull", adapter_uri]
    docker_config = (
        ["--docker-config", f"{SECRETS_MOUNT}/{spec.output.secret_ref}/.dockerconfigjson"]
        if spec.output.secret_ref
        else []
    )
    if spec.method.type == "full":
        # A fully fine-tuned model is served on its own: it *is* the model.
        if result.scheme == "pvc":
            return _ServingFiles(volumes, mounts, inits, claim_path(result.authority, result.path), None)
        init("pull-model", [*pull, SERVE_MODEL_MOUNT, *docker_config], "model", SERVE_MODEL_MOUNT)
        return _ServingFiles(volumes, mounts, inits, SERVE_MODEL_MOUNT, None)

    model = parse_uri(spec.model.source, MODEL_SCHEMES)
    if model.scheme == "pvc":
        model_path = claim_path(model.authority, model.path)
    elif model.scheme == "hf" and spec.serving.runtime == "vllm" and not spec.model.secret_ref:
        model_path = model.location  # vLLM downloads public hub models itself
    else:
        if spec.model.secret_ref:
            volumes.append({"name": "model-secret", "secret": {"secretName": spec.model.secret_ref}})
            mounts.append(
                {"name": "model-secret", "mountPath": f"{SECRETS_MOUNT}/{spec.model.secret_ref}", "readOnly": True}
            )
        command = ["kubetune", "fetch-model", "--config", f"{CONFIG_MOUNT}/{CONFIG_FILE}", "--into", SERVE_MODEL_MOUNT]
        init("fetch-model", command, "model", SERVE_MODEL_MOUNT)
        model_path = SERVE_MODEL_MOUNT

    if result.scheme == "pvc":
        adapter_path = claim_path(result.authority, result.path)
    else:
        init("pull-adapter", [*pull, SERVE_ADAPTER_MOUNT, *docker_config], "adapter", SERVE_ADAPTER_MOUNT)
        adapter_path = SERVE_ADAPTER_MOUNT
    return _ServingFiles(volumes, mounts, inits, model_path, adapter_path)


def serving_command(target: Target, files: _ServingFiles) -> list[str]:
    """The server's command line: ``kubetune serve`` or ``vllm serve``."""
    serving = target.spec.serving
    name = serving_model_name(target)
    port = str(serving.port)
    if serving.runtime == "vllm":
        command = ["vllm", "serve", files.model_path, "--host", "0.0.0.0", "--port", port]  # noqa: S104
        if files.adapter_path is None:
            return [*command, "--served-model-name", name]
        lora = target.spec.method.effective_lora
        rank = max_lora_rank(lora.r if lora else 16)
        return [
            *command,
            "--enable-lora",
            "--lora-modules",
            f"{name}={files.adapter_path}",
            "--max-lora-rank",
            str(rank),
        ]
    command = ["kubetune", "serve", "--model", files.model_path, "--port", port]
    if files.adapter_path is None:
        return [*command, "--base-name", name]
    return [*command, "--adapter", f"{name}={files.adapter_path}"]


def _serving_placement(target: Target) -> tuple[Obj, list[Obj]]:
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in target.spec.resources.tolerations]
    if target.spec.resources.provisioner == "karpenter":
        tolerations.append({"key": names.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"})
        return {names.UID_LABEL: target.uid, names.ROLE_LABEL: names.ROLE_SERVER}, tolerations
    return dict(target.spec.resources.node_selector), tolerations


def serving_labels(target: Target) -> dict[str, str]:
    return {**target.labels, names.ROLE_LABEL: names.ROLE_SERVER}


def build_serving_deployment(target: Target, adapter_uri: str) -> Obj:
    """The Deployment of the OpenAI-compatible server for the published adapter."""
    spec = target.spec
    serving = spec.serving
    files = _serving_files(target, adapter_uri)
    gpus = serving_gpus(target)
    gpu = spec.resources.gpu_resource_name
    limits: Obj = {gpu: str(gpus)} if gpus else {}
    requests: Obj = dict(limits)
    if spec.resources.cpu:
        requests["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        requests["memory"] = spec.resources.memory
        limits["memory"] = spec.resources.memory
    vllm = serving.runtime == "vllm"
    ready_path, live_path = ("/health", "/health") if vllm else ("/readyz", "/healthz")
    selector, tolerations = _serving_placement(target)
    labels = serving_labels(target)
    env: list[Obj] = [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": "/tmp"}]  # noqa: S108
    if not vllm and spec.resources.cpu:
        env.append({"name": "OMP_NUM_THREADS", "value": str(max(1, int(_cpus(spec.resources.cpu))))})
    container: Obj = {
        "name": names.SERVER_CONTAINER,
        "image": target.settings.vllm_image if vllm else target.settings.trainer_image,
        "command": serving_command(target, files),
        "env": env,
        "ports": [{"name": "http", "containerPort": serving.port}],
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        "readinessProbe": {
            "httpGet": {"path": ready_path, "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 5,  # a CPU server answers probes between generated tokens
            "failureThreshold": 3,
        },
        # Loading a large model takes minutes: the startup probe holds the liveness probe off until then.
        "startupProbe": {"httpGet": {"path": live_path, "port": "http"}, "periodSeconds": 10, "failureThreshold": 90},
        "livenessProbe": {
            "httpGet": {"path": live_path, "port": "http"},
            "periodSeconds": 15,
            "timeoutSeconds": 5,
            "failureThreshold": 4,
        },
        "securityContext": _container_security(),
        "volumeMounts": [
            *files.mounts,
            *([{"name": "shm", "mountPath": "/dev/shm"}] if vllm else []),  # noqa: S108
        ],
    }
    volumes = [*files.volumes]
    if vllm:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": target.meta(names.serving(target.name), **{names.ROLE_LABEL: names.ROLE_SERVER}),
        "spec": {
            "replicas": serving.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security(),
                    **({"nodeSelector": selector} if selector else {}),
                    **({"tolerations": tolerations} if tolerations else {}),
                    **({"initContainers": files.init_containers} if files.init_containers else {}),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def build_serving_service(target: Target) -> Obj:
    """The ClusterIP Service in front of the serving pods (status.endpoint.url names it)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": target.meta(names.serving(target.name), **{names.ROLE_LABEL: names.ROLE_SERVER}),
        "spec": {
            "selector": serving_labels(target),
            "ports": [{"name": "http", "port": target.spec.serving.port, "targetPort": "http"}],
        },
    }
