"""What the operator knows of cloud GPU instance types: GPUs, GPU memory, vCPUs and host memory.

The pre-flight's memory plan compares the planner's predicted peak per process with the memory
of one device of the job's instance type, from this table. Figures are the clouds' published
ones (GPU memory per GPU, host memory in GiB). An instance type missing here is not an error:
the plan is then reported without a verdict, and ``resources.gpuMemoryGiB`` can say it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class InstanceShape:
    """One instance type's devices."""

    gpus: int
    gpu_model: str
    gpu_memory_gib: int
    """Memory of one GPU."""
    cpus: int
    memory_gib: int
    """Host memory."""


INSTANCE_TYPES: Final[dict[str, InstanceShape]] = {
    # Azure (the names Kaito's presets use)
    "Standard_NC24ads_A100_v4": InstanceShape(1, "A100", 80, 24, 220),
    "Standard_NC48ads_A100_v4": InstanceShape(2, "A100", 80, 48, 440),
    "Standard_NC96ads_A100_v4": InstanceShape(4, "A100", 80, 96, 880),
    "Standard_ND96asr_v4": InstanceShape(8, "A100", 40, 96, 900),
    "Standard_ND96amsr_A100_v4": InstanceShape(8, "A100", 80, 96, 1900),
    "Standard_ND96isr_H100_v5": InstanceShape(8, "H100", 80, 96, 1900),
    "Standard_NC40ads_H100_v5": InstanceShape(1, "H100", 94, 40, 320),
    "Standard_NC80adis_H100_v5": InstanceShape(2, "H100", 94, 80, 640),
    "Standard_NC6s_v3": InstanceShape(1, "V100", 16, 6, 112),
    "Standard_NC24s_v3": InstanceShape(4, "V100", 16, 24, 448),
    # AWS
    "g5.xlarge": InstanceShape(1, "A10G", 24, 4, 16),
    "g5.2xlarge": InstanceShape(1, "A10G", 24, 8, 32),
    "g5.12xlarge": InstanceShape(4, "A10G", 24, 48, 192),
    "g5.48xlarge": InstanceShape(8, "A10G", 24, 192, 768),
    "g6.xlarge": InstanceShape(1, "L4", 24, 4, 16),
    "g6.12xlarge": InstanceShape(4, "L4", 24, 48, 192),
    "g6e.xlarge": InstanceShape(1, "L40S", 48, 4, 32),
    "p4d.24xlarge": InstanceShape(8, "A100", 40, 96, 1152),
    "p4de.24xlarge": InstanceShape(8, "A100", 80, 96, 1152),
    "p5.48xlarge": InstanceShape(8, "H100", 80, 192, 2048),
    "p5e.48xlarge": InstanceShape(8, "H200", 141, 192, 2048),
    # GCP
    "a2-highgpu-1g": InstanceShape(1, "A100", 40, 12, 85),
    "a2-ultragpu-1g": InstanceShape(1, "A100", 80, 12, 170),
    "a3-highgpu-8g": InstanceShape(8, "H100", 80, 208, 1872),
    "g2-standard-8": InstanceShape(1, "L4", 24, 8, 32),
    # The local runtime's CPU-only node.
    "local-cpu": InstanceShape(0, "", 0, 8, 16),
}


def instance_shape(name: str | None) -> InstanceShape | None:
    """What ``name`` offers, when it is known."""
    return INSTANCE_TYPES.get(name) if name else None
