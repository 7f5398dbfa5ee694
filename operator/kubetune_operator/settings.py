"""Operator settings: every knob in one typed place, read from flags and environment at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

DEFAULT_TRAINER_IMAGE: Final = "ghcr.io/kubetune/trainer:0.1.0"
DEFAULT_VLLM_IMAGE: Final = "vllm/vllm-openai:v0.11.0"


@dataclass(frozen=True, slots=True)
class NodeClassRef:
    """The Karpenter NodeClass that NodeClaims point at (cloud-specific)."""

    group: str = "karpenter.azure.com"
    """API group of the NodeClass (karpenter.azure.com for AKS, karpenter.k8s.aws for EKS)."""
    kind: str = "AKSNodeClass"
    """AKSNodeClass or EC2NodeClass."""
    name: str = "default"
    """Name of the NodeClass object."""


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    """How the operator runs."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    """Image of the training pods (the Dockerfile's `trainer` target); also publishes and runs `kubetune serve`."""
    vllm_image: str = DEFAULT_VLLM_IMAGE
    """Image of serving pods with runtime vllm."""
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; every namespace when empty."""
    metrics_port: int = 8080
    """Port of the operator's Prometheus /metrics endpoint."""
    trainer_metrics_port: int = 9400
    """Port the rank-0 trainer serves its metrics on."""
    progress_interval_seconds: float = 5.0
    """How often a training job's rank-0 metrics are read into status.progress."""
    resync_seconds: float = 30.0
    """Reconcile every job at least this often, even without events (level-triggered safety net)."""
    watch_server_timeout_seconds: int = 300
    """Ask the apiserver to close watches after this long, so that a silently stalled watch is renewed."""
    watch_client_timeout_seconds: int = 330
    """Give up on a watch that has said nothing for this long."""
    workers: int = 20
    """Concurrent reconciles."""
    peering: str | None = None
    """kopf peering name for several replicas with one active; standalone when unset."""
    peering_priority: int | None = None
    """This replica's kopf peering priority: the live replica with the highest works, the others wait.
    Random when unset, because kopf pauses every replica that sees a live peer of its own priority."""
    health_port: int = 8081
    """Port of kopf's /healthz (the liveness probe), on 0.0.0.0; 0 serves none."""
    node_class: NodeClassRef = field(default_factory=NodeClassRef)
    """NodeClass of the jobs' NodePools (provisioner karpenter)."""
    consolidate_after: str = "5m"
    """consolidateAfter of a dynamic NodePool: how long an empty node of a job (suspended, between attempts) stays
    before Karpenter removes it; pending pods bring it back. Jobs with runPolicy.releaseNodes OnDelete use Never."""
    private_networks: tuple[str, ...] = ()
    """Private networks (CIDR) that http(s) sources may reach (TrainerConfig.private_networks); none by default."""
    preflight_cpu: str = "1"
    """CPU request of the pre-flight pod."""
    preflight_memory: str = "4Gi"
    """Memory request and limit of the pre-flight pod (it tokenizes the whole dataset)."""
    preflight_deadline_seconds: int = 3600
    """The pre-flight Job fails after this long (a dataset that takes longer to check is better checked by training)."""
    gpu_taint_value: str = "true"
    """Value of the nvidia.com/gpu:NoSchedule taint on provisioned nodes."""
