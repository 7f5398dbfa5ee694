"""A small catalog of cloud GPU instance types, so that NodePools get realistic nodes.

Real Karpenter's KWOK provider reads it (written in kwok's format by :mod:`kubetune_local.karpenter`)
and sizes each node from its claim's instance type, as it would from the cloud's offering; the
node daemon gives the adopted node the same capacity. A ConfigMap can make an entry fail, the way
a cloud answers when capacity or quota runs out, so tests can see that reason reach the job's status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class InstanceType:
    """What one instance type offers."""

    name: str
    cpu: int
    """vCPUs."""
    memory_gib: int
    gpus: int
    gpu_model: str
    gpu_memory_gib: int
    """Memory of one GPU."""
    zone: str
    capacity_type: str = "on-demand"


CATALOG: Final[dict[str, InstanceType]] = {
    t.name: t
    for t in (
        # Azure (the names Kaito's presets use)
        InstanceType("Standard_NC24ads_A100_v4", 24, 220, 1, "A100", 80, "eastus-1"),
        InstanceType("Standard_NC48ads_A100_v4", 48, 440, 2, "A100", 80, "eastus-1"),
        InstanceType("Standard_NC96ads_A100_v4", 96, 880, 4, "A100", 80, "eastus-1"),
        InstanceType("Standard_ND96asr_v4", 96, 900, 8, "A100", 40, "eastus-2"),
        InstanceType("Standard_ND96amsr_A100_v4", 96, 1900, 8, "A100", 80, "eastus-2"),
        InstanceType("Standard_NC40ads_H100_v5", 40, 320, 1, "H100", 94, "eastus-1"),
        InstanceType("Standard_NC80adis_H100_v5", 80, 640, 2, "H100", 94, "eastus-1"),
        InstanceType("Standard_ND96isr_H100_v5", 96, 1900, 8, "H100", 80, "eastus-2"),
        InstanceType("Standard_NC6s_v3", 6, 112, 1, "V100", 16, "eastus-1"),
        # AWS
        InstanceType("g5.xlarge", 4, 16, 1, "A10G", 24, "us-east-1a"),
        InstanceType("g5.12xlarge", 48, 192, 4, "A10G", 24, "us-east-1a"),
        InstanceType("g5.48xlarge", 192, 768, 8, "A10G", 24, "us-east-1a"),
        InstanceType("g6.xlarge", 4, 16, 1, "L4", 24, "us-east-1a"),
        InstanceType("g6.12xlarge", 48, 192, 4, "L4", 24, "us-east-1a"),
        InstanceType("g6.48xlarge", 192, 768, 8, "L4", 24, "us-east-1a"),
        InstanceType("p4d.24xlarge", 96, 1152, 8, "A100", 40, "us-east-1b"),
        InstanceType("p5.48xlarge", 192, 2048, 8, "H100", 80, "us-east-1b"),
        # A CPU-only node for the local runtime's own trainings.
        InstanceType("local-cpu", 8, 16, 0, "", 0, "local-1"),
    )
}

#: ConfigMap (in kube-system) whose data maps an instance type to a failure, for example
#: ``p5.48xlarge: "InsufficientCapacity: no p5.48xlarge capacity in us-east-1b"``.
FAILURES_CONFIGMAP: Final = "kubetune-local-instance-failures"


#: The extended resource that counts a node's GPUs.
GPU_RESOURCE: Final = "nvidia.com/gpu"


def capacity_of(instance: InstanceType) -> dict[str, str]:
    """A node's capacity for ``instance``, its GPUs as ``nvidia.com/gpu``."""
    capacity = {
        "cpu": str(instance.cpu),
        "memory": f"{instance.memory_gib}Gi",
        "pods": "110",
        "ephemeral-storage": "500Gi",
    }
    if instance.gpus:
        capacity[GPU_RESOURCE] = str(instance.gpus)
    return capacity


def lookup(name: str) -> InstanceType | None:
    return CATALOG.get(name)
