"""The training children: the workspace volume, the rendered trainer config, the headless Service and the gang's Job."""

from __future__ import annotations

import json
from typing import Final

from kubetune_api import CONFIG_MOUNT, METRICS_ADDRESS_ENV, MLFLOW_CREDENTIAL_KEYS, TrainerConfig
from kubetune_api.objects import Obj
from kubetune_operator import names
from kubetune_operator.children import pod
from kubetune_operator.children.target import Target

KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"


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


def build_trainer_config(target: Target) -> TrainerConfig:
    """The config of this attempt, with where the pods find the mounted sources."""
    _, mounts = pod.source_volumes(target)
    return TrainerConfig(
        job_name=target.name,
        namespace=target.namespace,
        attempt=target.attempt,
        spec=target.spec,
        mounts=mounts,
        metrics_port=target.settings.trainer_metrics_port,
        private_networks=list(target.settings.private_networks),
        reuse_prepared_data=target.reuse_prepared_data,
    )


def build_config_map(target: Target) -> Obj:
    """The rendered trainer config the pods read from /etc/kubetune/config.json."""
    config = build_trainer_config(target)
    text = json.dumps(config.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": target.meta(names.config_map(target.name)),
        "data": {pod.CONFIG_FILE: text},
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
            "selector": {**target.labels, names.ROLE_LABEL: names.ROLE_TRAINER},
            "ports": [{"name": "rendezvous", "port": target.spec.distributed.master_port}],
        },
    }


def trainer_command(target: Target) -> list[str]:
    """``kubetune train`` with the gang's shape; the node rank comes from the completion index."""
    distributed = target.spec.distributed
    return pod.argv(
        "kubetune",
        "train",
        "--config",
        f"{CONFIG_MOUNT}/{pod.CONFIG_FILE}",
        "--nnodes",
        str(distributed.nodes),
        "--node-rank",
        pod.EnvRef("JOB_COMPLETION_INDEX"),
        "--nproc-per-node",
        str(target.processes_per_node),
        "--master-addr",
        names.rank_zero_host(target.name, target.attempt, target.namespace),
        "--master-port",
        str(distributed.master_port),
    )


def tracking_env(target: Target) -> list[Obj]:
    """The MLflow credentials of training.tracking.secretRef, by reference: one optional secretKeyRef per key.

    Only with ``reportTo: [mlflow]`` and a secretRef. The values stay in the Secret (never in the
    ConfigMap or the pod spec); a key the Secret lacks, or a missing Secret, leaves its variable
    unset, and the tracking server's refusal then shows in the trainer's log. The tracking URI and
    the experiment come from the rendered config, not from the environment.
    """
    training = target.spec.training
    secret = training.tracking.secret_ref
    if "mlflow" not in training.report_to or secret is None:
        return []
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
        for key in MLFLOW_CREDENTIAL_KEYS
    ]


def build_training_job(target: Target, *, suspend: bool = False) -> Obj:
    """The Indexed Job of one gang attempt: one pod per node, torchrun inside, fail-fast as a gang."""
    spec = target.spec
    sources, _ = pod.source_volumes(target)
    container: Obj = {
        "name": names.TRAINER_CONTAINER,
        "image": target.settings.trainer_image,
        "command": trainer_command(target),
        "env": [
            *pod.base_env(termination_message=True),
            *pod.thread_env(target, target.processes_per_node),
            # Rank 0 serves its metrics on the pod's own address, the one the operator scrapes.
            {"name": METRICS_ADDRESS_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            *tracking_env(target),
        ],
        "ports": [
            {"name": "metrics", "containerPort": target.settings.trainer_metrics_port},
            {"name": "rendezvous", "containerPort": spec.distributed.master_port},
        ],
        "resources": pod.resources(target, target.gpus_per_node),
        "securityContext": pod.container_security(),
        **pod.termination_message(),
        "volumeMounts": [
            pod.config_mount(),
            pod.workspace_mount(),
            pod.shm_mount(),
            *(v.mount for v in sources),
        ],
    }
    job_labels = {**target.labels, names.ATTEMPT_LABEL: str(target.attempt)}
    if spec.run_policy.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = spec.run_policy.queue_name
    pod_labels = {**target.labels, names.ATTEMPT_LABEL: str(target.attempt), names.ROLE_LABEL: names.ROLE_TRAINER}
    template_spec = pod.pod_spec(
        target,
        names.ROLE_TRAINER,
        subdomain=names.service(target.name),
        restart_policy="Never",
        containers=[container],
        volumes=[
            pod.config_volume(target),
            pod.workspace_volume(target),
            pod.shm_volume(target),
            *(v.volume for v in sources),
        ],
    )
    if spec.resources.provisioner == "karpenter":
        # One pod per node: Karpenter then launches distributed.nodes nodes even when the pods would
        # fit on one (pods asking for fewer GPUs than an instance has, CPU pods).
        template_spec["affinity"] = _one_pod_per_node(pod_labels)
    job_spec: Obj = {
        "completionMode": "Indexed",
        "completions": spec.distributed.nodes,
        "parallelism": spec.distributed.nodes,
        # A gang: one failed pod fails the Job; the operator restarts the whole gang from a checkpoint.
        "backoffLimit": 0,
        "podFailurePolicy": pod.failure_policy(names.TRAINER_CONTAINER),
        "suspend": suspend or bool(spec.run_policy.queue_name),
        "template": {
            # Karpenter never takes a node from under a running gang.
            "metadata": {"labels": pod_labels, **_annotations(pod.gang_annotations(target))},
            "spec": template_spec,
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


def _annotations(annotations: Obj) -> Obj:
    return {"annotations": annotations} if annotations else {}


def _one_pod_per_node(pod_labels: dict[str, str]) -> Obj:
    """No two pods of the attempt on one node (hostname anti-affinity)."""
    return {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": pod_labels}, "topologyKey": "kubernetes.io/hostname"}
            ]
        }
    }
