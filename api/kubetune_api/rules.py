"""The FineTuneJob's cross-field rules and immutable fields, each declared once for both sides.

Every :class:`Rule` carries its Python check (the models run it, so ``kubetune validate`` and the
operator refuse what it refuses) and the same rule as CEL (the CRD carries it, so the apiserver
refuses the same manifests with the same message and field path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from kubetune_api.spec import FineTuneJobSpec


@dataclass(frozen=True, slots=True)
class Rule:
    """A cross-field rule, checked by the models and, as CEL, by the apiserver."""

    field: str
    """The field the message is about, relative to spec (dotted, camelCase)."""
    message: str
    """What is wrong and how to fix it."""
    cel: str
    """The same rule as a CEL expression over the defaulted spec (`self`)."""
    holds: Callable[[FineTuneJobSpec], bool]
    """The rule in Python."""

    @property
    def field_path(self) -> str:
        """The CRD's fieldPath form of ``field``: ``.method.lora``."""
        return "." + self.field


#: The largest LoRA rank vLLM serves (its largest ``--max-lora-rank``).
MAX_VLLM_LORA_RANK: Final = 512

RULES: Final[tuple[Rule, ...]] = (
    Rule(
        field="method.lora",
        message="full fine-tuning takes no LoRA block; remove method.lora or set method.type to lora, qlora or dora",
        cel="self.method.type != 'full' || !has(self.method.lora)",
        holds=lambda s: s.method.type != "full" or s.method.lora is None,
    ),
    Rule(
        field="method.quantization",
        message="quantization is only used by method.type qlora; set method.type: qlora or remove method.quantization",
        cel="self.method.type == 'qlora' || !has(self.method.quantization)",
        holds=lambda s: s.method.type == "qlora" or s.method.quantization is None,
    ),
    Rule(
        field="resources.instanceType",
        message="provisioner karpenter needs an instance type for the job's NodePool; set resources.instanceType",
        cel="self.resources.provisioner != 'karpenter' || has(self.resources.instanceType)",
        holds=lambda s: s.resources.provisioner != "karpenter" or s.resources.instance_type is not None,
    ),
    Rule(
        field="resources.instanceType",
        message="provisioner byo uses existing nodes and ignores instanceType; remove it and select nodes "
        "with resources.nodeSelector, or set resources.provisioner: karpenter",
        cel="self.resources.provisioner != 'byo' || !has(self.resources.instanceType)",
        holds=lambda s: s.resources.provisioner != "byo" or s.resources.instance_type is None,
    ),
    Rule(
        field="resources.storage.accessMode",
        message="with distributed.nodes > 1 every pod must see the same checkpoints; "
        "set resources.storage.accessMode: ReadWriteMany (and a StorageClass that supports it) or leave it unset",
        cel="self.distributed.nodes == 1 || !has(self.resources.storage.accessMode) "
        "|| self.resources.storage.accessMode == 'ReadWriteMany'",
        holds=lambda s: s.distributed.nodes == 1 or s.resources.storage.access_mode in (None, "ReadWriteMany"),
    ),
    Rule(
        field="distributed.deepspeed.offloadParameters",
        message="parameter offload needs ZeRO stage 3; set distributed.deepspeed.zeroStage: 3 or offloadParameters: none",
        cel="self.distributed.deepspeed.offloadParameters == 'none' || self.distributed.deepspeed.zeroStage == 3",
        holds=lambda s: s.distributed.deepspeed.offload_parameters == "none" or s.distributed.deepspeed.zero_stage == 3,
    ),
    Rule(
        field="distributed.deepspeed.offloadOptimizer",
        message="optimizer offload needs ZeRO stage 1, 2 or 3; raise distributed.deepspeed.zeroStage or set offloadOptimizer: none",
        cel="self.distributed.deepspeed.offloadOptimizer == 'none' || self.distributed.deepspeed.zeroStage >= 1",
        holds=lambda s: s.distributed.deepspeed.offload_optimizer == "none" or s.distributed.deepspeed.zero_stage >= 1,
    ),
    Rule(
        field="distributed.processesPerNode",
        message="more processes than GPUs per pod; set distributed.processesPerNode to at most resources.gpusPerNode "
        "(one process per GPU)",
        cel="!has(self.distributed.processesPerNode) || !has(self.resources.gpusPerNode) "
        "|| self.resources.gpusPerNode == 0 || self.distributed.processesPerNode <= self.resources.gpusPerNode",
        holds=lambda s: (
            s.distributed.processes_per_node is None
            or not s.resources.gpus_per_node
            or s.distributed.processes_per_node <= s.resources.gpus_per_node
        ),
    ),
    Rule(
        field="dataset.validation",
        message="set exactly one of dataset.validation.fraction and dataset.validation.split",
        cel="!has(self.dataset.validation) || has(self.dataset.validation.fraction) != has(self.dataset.validation.split)",
        holds=lambda s: (
            s.dataset.validation is None
            or (s.dataset.validation.fraction is None) != (s.dataset.validation.split is None)
        ),
    ),
    Rule(
        field="training.evalEverySteps",
        message="evaluation needs held-out data; set dataset.validation or remove training.evalEverySteps",
        cel="!has(self.training.evalEverySteps) || has(self.dataset.validation)",
        holds=lambda s: s.training.eval_every_steps is None or s.dataset.validation is not None,
    ),
    Rule(
        field="output.merge",
        message="merge folds an adapter into the base; full fine-tuning has no adapter, so remove output.merge",
        cel="!self.output.merge || self.method.type != 'full'",
        holds=lambda s: not s.output.merge or s.method.type != "full",
    ),
    Rule(
        field="serving.runtime",
        message="vLLM cannot serve DoRA adapters; set output.merge: true to serve the merged model, "
        "or serving.runtime: transformers",
        cel="!self.serving.enabled || self.serving.runtime != 'vllm' || self.method.type != 'dora' || self.output.merge",
        holds=lambda s: (
            not s.serving.enabled or s.serving.runtime != "vllm" or s.method.type != "dora" or s.output.merge
        ),
    ),
    Rule(
        field="method.lora.r",
        message="vLLM serves LoRA adapters of rank at most 512 (its largest --max-lora-rank); set method.lora.r "
        "to 512 or less, or serving.runtime: transformers",
        cel="!self.serving.enabled || self.serving.runtime != 'vllm' || self.method.type == 'full' "
        "|| (self.method.type == 'dora' && self.output.merge) || !has(self.method.lora) || self.method.lora.r <= 512",
        holds=lambda s: (
            not s.serving.enabled
            or s.serving.runtime != "vllm"
            or s.method.type == "full"
            or (s.method.type == "dora" and s.output.merge)
            or s.method.lora is None
            or s.method.lora.r <= MAX_VLLM_LORA_RANK
        ),
    ),
    Rule(
        field="method.quantization.bits",
        message="8-bit weights cannot be sharded by ZeRO-3; set method.quantization.bits: 4 (which ZeRO-3 shards) "
        "or distributed.deepspeed.zeroStage: 2",
        cel="self.method.type != 'qlora' || !has(self.method.quantization) || self.method.quantization.bits != 8 "
        "|| self.distributed.deepspeed.zeroStage != 3",
        holds=lambda s: (
            s.method.type != "qlora"
            or s.method.quantization is None
            or s.method.quantization.bits != 8
            or s.distributed.deepspeed.zero_stage != 3
        ),
    ),
    Rule(
        field="serving.gpus",
        message="vLLM needs a GPU; set serving.gpus to 1 or more, or serving.runtime: transformers",
        cel="self.serving.runtime != 'vllm' || !has(self.serving.gpus) || self.serving.gpus >= 1",
        holds=lambda s: s.serving.runtime != "vllm" or s.serving.gpus is None or s.serving.gpus >= 1,
    ),
    Rule(
        field="output.destination",
        message="a job served by a ModelServer publishes onto the server's adapter claim; set output.destination "
        "to pvc://<the ModelServer's adapterClaim>/<path>",
        cel="!has(self.serving.server) || (has(self.output.destination) "
        "&& self.output.destination.startsWith('pvc://'))",
        holds=lambda s: (
            s.serving.server is None or (s.output.destination is not None and s.output.destination.startswith("pvc://"))
        ),
    ),
    Rule(
        field="training.tracking.mlflowTrackingUri",
        message="reportTo mlflow needs a tracking server; set training.tracking.mlflowTrackingUri "
        "or remove mlflow from training.reportTo",
        cel="!('mlflow' in self.training.reportTo) || has(self.training.tracking.mlflowTrackingUri)",
        holds=lambda s: "mlflow" not in s.training.report_to or s.training.tracking.mlflow_tracking_uri is not None,
    ),
    Rule(
        field="training.reportTo",
        message="training.tracking is only used by MLflow; add mlflow to training.reportTo or remove training.tracking",
        cel="'mlflow' in self.training.reportTo || (!has(self.training.tracking.mlflowTrackingUri) "
        "&& !has(self.training.tracking.experimentName) && !has(self.training.tracking.secretRef))",
        holds=lambda s: (
            "mlflow" in s.training.report_to
            or (
                s.training.tracking.mlflow_tracking_uri is None
                and s.training.tracking.experiment_name is None
                and s.training.tracking.secret_ref is None
            )
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class ImmutableField:
    """A spec field that may not change once training has started (status.startTime is set)."""

    field: str
    """Top-level spec field, camelCase."""
    message: str
    """Why, and what to do instead."""


IMMUTABLE_ONCE_STARTED: Final[tuple[ImmutableField, ...]] = (
    ImmutableField("model", "spec.model cannot change once training has started; create a new FineTuneJob"),
    ImmutableField("method", "spec.method cannot change once training has started; create a new FineTuneJob"),
)


def changed_immutable_fields(old: FineTuneJobSpec, new: FineTuneJobSpec) -> list[ImmutableField]:
    """The immutable fields that differ between ``old`` and ``new`` (for a job that has started)."""
    before, after = old.model_dump(), new.model_dump()
    return [f for f in IMMUTABLE_ONCE_STARTED if before[f.field] != after[f.field]]
