"""The FineTuneJob spec: what a user asks for, as validated pydantic models.

This module is the single definition of a job. The operator generates the CRD from it and
renders trainer configs from it; the trainer reads it (from the rendered config, or straight
from a manifest with local paths on a workstation). It imports nothing heavier than pydantic so
that the operator image stays free of torch.

Field docstrings become the CRD's descriptions (``kubectl explain``), so they are written for
the person filling in a manifest. Cross-field rules live in :mod:`kubetune_api.rules`, each with its
Python check and the CEL expression the apiserver evaluates, so both sides reject the same specs.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Annotated, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from kubetune_api.rules import RULES
from kubetune_api.uris import (
    DATASET_SCHEMES,
    MODEL_SCHEMES,
    OUTPUT_SCHEMES,
    TRACKING_SCHEMES,
    Scheme,
    parse_uri,
)

#: Validation context key: accept ``file://`` sources (``kubetune train`` on a workstation).
ALLOW_LOCAL_PATHS: Final = "allow_local_paths"

MAX_URI_LENGTH: Final = 2048
DNS_SUBDOMAIN_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY_PATTERN: Final = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"

#: A served model's name: what clients put in requests, and the NAME of the servers' ``NAME=PATH``
#: arguments, so no ``=``, ``$`` or space; letters, digits, ``.``, ``_`` and ``-``.
MODEL_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: Most optimizer steps (and steps between checkpoints or evaluations) a job may ask for.
MAX_STEPS: Final = 1_000_000_000
#: Largest volume the operator will ask for (resources.storage.size).
MAX_STORAGE: Final = "1Pi"

_QUANTITY_SUFFIXES: Final[dict[str, Fraction]] = {
    "": Fraction(1),
    "m": Fraction(1, 1000),
    **{suffix: Fraction(1000**power) for power, suffix in enumerate(("k", "M", "G", "T", "P", "E"), start=1)},
    **{suffix: Fraction(1024**power) for power, suffix in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), start=1)},
}


def quantity_value(quantity: str) -> Fraction:
    """The exact value of a quantity of the QUANTITY_PATTERN form (``50Gi``, ``1.5T``, ``500m``).

    Raises ValueError for any other form.
    """
    match = re.fullmatch(QUANTITY_PATTERN.strip("^$"), quantity)
    if match is None:
        raise ValueError(f"{quantity!r} is not a quantity")
    suffix = match.group(2) or ""
    return Fraction(quantity.removesuffix(suffix)) * _QUANTITY_SUFFIXES[suffix]


def _storage_bound(value: str) -> str:
    if quantity_value(value) > quantity_value(MAX_STORAGE):
        raise PydanticCustomError("quantity_bound", "must be at most {bound}", {"bound": MAX_STORAGE})
    return value


ResourceName = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
Quantity = Annotated[str, StringConstraints(max_length=32, pattern=QUANTITY_PATTERN)]
StorageSize = Annotated[Quantity, AfterValidator(_storage_bound)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
LabelValue = Annotated[str, StringConstraints(max_length=63)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=317)]
Uri = Annotated[str, StringConstraints(min_length=1, max_length=MAX_URI_LENGTH)]

MethodType = Literal["lora", "qlora", "dora", "full"]
DatasetFormat = Literal["auto", "messages", "instruction", "prompt-completion", "text"]
Precision = Literal["bf16", "fp16", "fp32"]
Provisioner = Literal["karpenter", "byo"]
Offload = Literal["none", "cpu"]
ServingRuntime = Literal["transformers", "vllm"]
ReleaseNodes = Literal["OnCompletion", "OnDelete"]
CapacityType = Literal["on-demand", "spot"]
NodePoolMode = Literal["dynamic", "static"]
ReportTo = Literal["tensorboard", "mlflow"]


#: How every model of the API reads and writes: camelCase on the wire, unknown fields refused,
#: attribute docstrings as the CRD's descriptions.
WIRE_CONFIG: Final = ConfigDict(
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
    extra="forbid",
    use_attribute_docstrings=True,
)


class SpecModel(BaseModel):
    """Base of every spec section: camelCase in manifests, unknown fields refused, immutable."""

    model_config = ConfigDict(**WIRE_CONFIG, frozen=True)


def _check_uri(value: str, schemes: tuple[Scheme, ...], info: ValidationInfo) -> str:
    context = info.context or {}
    allowed = (*schemes, "file") if context.get(ALLOW_LOCAL_PATHS) else schemes
    if value.startswith("/") and "file" in allowed:
        value = "file://" + value
    try:
        parse_uri(value, allowed)
    except ValueError as exc:
        raise PydanticCustomError("uri", "{reason}", {"reason": str(exc)}) from None
    return value


# --------------------------------------------------------------------------------------- model


class ModelSpec(SpecModel):
    """The base model to fine-tune."""

    source: Uri
    """Where the base model lives: hf://org/name[@revision], https://…/model.tar.gz, pvc://claim/path, s3://bucket/prefix/ (a folder), s3://bucket/model.tar.gz or oci://registry/repository:tag (an image or ORAS artifact of the model folder, such as a merged model kubetune published)."""
    secret_ref: ResourceName | None = None
    """Name of a Secret in the job's namespace with the credentials for the source (key `token` for hf://; AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, optionally AWS_SESSION_TOKEN, AWS_REGION and AWS_ENDPOINT_URL, for s3://; a kubernetes.io/dockerconfigjson Secret for oci://)."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model (transformers' trust_remote_code). Off unless the model needs it."""

    @field_validator("source")
    @classmethod
    def _source(cls, value: str, info: ValidationInfo) -> str:
        return _check_uri(value, MODEL_SCHEMES, info)


# ------------------------------------------------------------------------------------- dataset


class ValidationSplit(SpecModel):
    """Held-out data for evaluation: a fraction of the training data or a named split. Set exactly one."""

    fraction: Annotated[float, Field(gt=0, le=0.5)] | None = None
    """Fraction of the examples held out for evaluation, in (0, 0.5]."""
    split: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    """Name of a split of a Hugging Face dataset to evaluate on, for example `validation`."""


class DatasetSpec(SpecModel):
    """The training data and how to turn it into token sequences."""

    source: Uri
    """Where the data lives: hf://org/name, https://…/file.jsonl, pvc://claim/path, s3://bucket/key (a file), s3://bucket/prefix/ (a folder), oci://registry/repository:tag (an image or ORAS artifact of the files) or configmap://name/key (small data). JSONL, JSON, CSV, Parquet and saved Hugging Face datasets are read."""
    secret_ref: ResourceName | None = None
    """Name of a Secret in the job's namespace with the credentials for the source (key `token` for hf://; AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, optionally AWS_SESSION_TOKEN, AWS_REGION and AWS_ENDPOINT_URL, for s3://; a kubernetes.io/dockerconfigjson Secret for oci://)."""
    format: DatasetFormat = "auto"
    """Record layout: `messages` (chat), `instruction` (instruction/input/output), `prompt-completion`, `text`, or `auto` to detect it from the columns."""
    split: Annotated[str, StringConstraints(min_length=1, max_length=128)] = "train"
    """Split to train on when the source is a Hugging Face dataset."""
    max_seq_length: Annotated[int, Field(ge=16, le=131072)] = 2048
    """Longest token sequence; longer examples are truncated and counted in the log."""
    packing: bool = False
    """Pack several short examples into each sequence of maxSeqLength tokens (faster on short data)."""
    completion_only_loss: bool = True
    """Compute the loss on completions only, where the format has a prompt (messages, instruction, prompt-completion)."""
    chat_template: Annotated[str, StringConstraints(min_length=1, max_length=16384)] | None = None
    """Jinja chat template for `messages` data; the tokenizer's own template when unset."""
    validation: ValidationSplit | None = None
    """Held-out data for evaluation; none when unset."""

    @field_validator("source")
    @classmethod
    def _source(cls, value: str, info: ValidationInfo) -> str:
        return _check_uri(value, DATASET_SCHEMES, info)


# -------------------------------------------------------------------------------------- method


class LoraSpec(SpecModel):
    """Low-rank adapter parameters (LoRA, QLoRA and DoRA)."""

    r: Annotated[int, Field(ge=1, le=1024)] = 16
    """Rank of the adapter matrices."""
    alpha: Annotated[float, Field(gt=0, le=4096)] = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Dropout on the adapter's input."""
    target_modules: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=128)]],
        Field(min_length=1, max_length=64),
    ] = ["all-linear"]
    """Module names to adapt, for example [q_proj, v_proj]; `all-linear` adapts every linear layer but the output head."""


class QuantizationSpec(SpecModel):
    """How QLoRA quantizes the frozen base model (bitsandbytes)."""

    bits: Literal[4, 8] = 4
    """Bits per base weight: 4 (NF4/FP4) or 8 (LLM.int8)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 is what the QLoRA paper uses."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bits per parameter)."""


class MethodSpec(SpecModel):
    """The fine-tuning method."""

    type: MethodType = "lora"
    """`lora`, `qlora` (LoRA on a 4- or 8-bit base), `dora` (weight-decomposed LoRA) or `full` (every weight trained)."""
    lora: LoraSpec | None = None
    """Adapter parameters for lora, qlora and dora; defaults apply when unset. Not allowed with type full."""
    quantization: QuantizationSpec | None = None
    """Base-model quantization for qlora (defaults: 4-bit NF4 with double quantization). Only allowed with type qlora."""

    @property
    def effective_lora(self) -> LoraSpec | None:
        """The adapter parameters in force: the given block, defaults for adapter methods, none for full."""
        if self.type == "full":
            return None
        return self.lora or LoraSpec()

    @property
    def effective_quantization(self) -> QuantizationSpec | None:
        """The quantization in force: the given block or the QLoRA defaults; none for other methods."""
        if self.type != "qlora":
            return None
        return self.quantization or QuantizationSpec()

    @property
    def result_folder(self) -> Literal["model", "adapter"]:
        """The folder of the job's volume the trainer saves its result in: the whole model for full, else the adapter."""
        return "model" if self.type == "full" else "adapter"


# ------------------------------------------------------------------------------------ training


#: The keys of training.tracking.secretRef's Secret, each given to the trainer as the environment variable of
#: the same name (by reference, optional), which MLflow's client reads.
MLFLOW_CREDENTIAL_KEYS: Final = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class TrackingSpec(SpecModel):
    """The MLflow tracking server the trainer reports to when training.reportTo names mlflow."""

    mlflow_tracking_uri: Uri | None = None
    """The MLflow tracking server, http://host[:port][/path] or https://…; required with `reportTo: [mlflow]`. An in-cluster service (`http://mlflow.mlflow.svc:5000`) is fine: the private-address policy of sources does not apply to the tracking server, from which nothing is downloaded."""
    experiment_name: (
        Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$")] | None
    ) = None
    """The MLflow experiment the runs go to (created when missing); `<namespace>/<job name>` when unset. Each attempt is one run, named `<job name>-attempt-<n>`."""
    secret_ref: ResourceName | None = None
    """Name of a Secret in the job's namespace with the tracking server's credentials, given to the trainer as environment variables by reference (each key optional): MLFLOW_TRACKING_TOKEN (a bearer token), or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth)."""

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse_uri(value, TRACKING_SCHEMES)
        except ValueError as exc:
            raise PydanticCustomError("uri", "{reason}", {"reason": str(exc)}) from None
        return value

    def experiment(self, namespace: str, job: str) -> str:
        """The experiment's name: experimentName, or ``<namespace>/<job>``."""
        return self.experiment_name or f"{namespace}/{job}"


class TrainingSpec(SpecModel):
    """Optimization settings. Tokens per optimizer step = batchSizePerDevice × gradientAccumulationSteps × world size × maxSeqLength."""

    epochs: Annotated[float, Field(gt=0, le=1000)] = 1
    """Passes over the training data (fractions allowed). Ignored when maxSteps is set."""
    max_steps: Steps | None = None
    """Stop after this many optimizer steps instead of counting epochs."""
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-4
    """Peak learning rate."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: Annotated[float, Field(ge=0, le=0.5)] = 0.03
    """Fraction of the steps spent warming the learning rate up from zero."""
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    """AdamW weight decay."""
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw-8bit"] = "adamw"
    """Optimizer: AdamW, or bitsandbytes' 8-bit AdamW (paged keeps optimizer state in pageable memory)."""
    batch_size_per_device: Annotated[int, Field(ge=1, le=4096)] = 4
    """Sequences per process per micro-batch."""
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = 1
    """Micro-batches summed before each optimizer step."""
    precision: Precision = "bf16"
    """Compute precision. On a CPU without bf16 support the trainer says so and uses fp32."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    max_grad_norm: Annotated[float, Field(ge=0, le=1000)] = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 42
    """Seed for initialization and data order (the same order on resume)."""
    checkpoint_every_steps: Steps = 200
    """Save a checkpoint to the job's volume every this many optimizer steps."""
    keep_checkpoints: Annotated[int, Field(ge=1, le=100)] = 3
    """How many of the newest checkpoints to keep."""
    eval_every_steps: Steps | None = None
    """Evaluate on dataset.validation every this many steps; at the end of each epoch when unset."""
    logging_every_steps: Annotated[int, Field(ge=1, le=100000)] = 10
    """Log and publish metrics every this many steps."""
    report_to: Annotated[list[ReportTo], Field(max_length=2, json_schema_extra={"x-kubernetes-list-type": "set"})] = []
    """Experiment trackers that rank 0 reports the logged metrics to, with transformers' own integrations: `tensorboard` (event files on the job's volume, under `runs/attempt-<n>/`) and `mlflow` (a run per attempt on training.tracking.mlflowTrackingUri; a server that cannot be reached or refuses the run is a warning in the trainer's log and summary.json, and training goes on). None by default."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, json_schema_extra={"default": {}})
    """The MLflow tracking server of `reportTo: [mlflow]`; only used with mlflow."""

    @field_validator("report_to")
    @classmethod
    def _report_to(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise PydanticCustomError("duplicate", "name each tracker once", {})
        return value


# --------------------------------------------------------------------------------- distributed


class DeepSpeedSpec(SpecModel):
    """DeepSpeed ZeRO settings."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: Offload = "none"
    """Keep optimizer state in CPU memory (ZeRO stage 1 or more)."""
    offload_parameters: Offload = "none"
    """Keep parameters in CPU memory (ZeRO stage 3 only)."""

    @property
    def offloads(self) -> bool:
        """Whether anything is kept in CPU memory."""
        return self.offload_optimizer != "none" or self.offload_parameters != "none"

    def used_with(self, world_size: int) -> bool:
        """Whether a job of ``world_size`` processes runs under DeepSpeed (the one place this is decided).

        ZeRO shards state across processes, so one process gains nothing from it unless something is
        offloaded to CPU memory; ZeRO stage 0 is plain data parallelism, which PyTorch's DDP does with
        less machinery.
        """
        return self.offloads or (world_size > 1 and self.zero_stage >= 1)


class DistributedSpec(SpecModel):
    """How many pods and processes train together."""

    nodes: Annotated[int, Field(ge=1, le=256)] = 1
    """Pods (one per node) in the training gang."""
    processes_per_node: Annotated[int, Field(ge=1, le=64)] | None = None
    """Training processes per pod; one per GPU of the pod when unset, or one when the pod has no GPU."""
    master_port: Annotated[int, Field(ge=1024, le=65535)] = 29500
    """Port the rank-0 pod listens on for the process group rendezvous."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, json_schema_extra={"default": {}})
    """DeepSpeed ZeRO settings."""


# ----------------------------------------------------------------------------------- resources


class Toleration(SpecModel):
    """A Kubernetes toleration added to the training pods."""

    key: Annotated[str, StringConstraints(max_length=317)] | None = None
    """Taint key to tolerate; all keys when unset with operator Exists."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal` matches key and value; `Exists` matches the key alone."""
    value: LabelValue | None = None
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; all effects when unset."""
    toleration_seconds: Annotated[int, Field(ge=0)] | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class StorageSpec(SpecModel):
    """The volume for checkpoints and output, mounted by every training pod."""

    size: StorageSize = "50Gi"
    """Capacity of the PersistentVolumeClaim the operator creates (at most 1Pi)."""
    storage_class_name: ResourceName | None = None
    """StorageClass of that claim; the cluster default when unset."""
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] | None = None
    """ReadWriteMany when distributed.nodes > 1 (every pod must see the same checkpoints), otherwise ReadWriteOnce, when unset. ReadWriteOnce with several nodes is refused."""

    def effective_access_mode(self, nodes: int) -> Literal["ReadWriteOnce", "ReadWriteMany"]:
        """The access mode in force for a gang of ``nodes`` pods."""
        return self.access_mode or ("ReadWriteMany" if nodes > 1 else "ReadWriteOnce")

    existing_claim: ResourceName | None = None
    """Use this PersistentVolumeClaim instead of creating one (size and storageClassName are then ignored)."""


class NodePoolSpec(SpecModel):
    """How the job's Karpenter NodePool brings its nodes (provisioner karpenter)."""

    mode: NodePoolMode = "dynamic"
    """`dynamic` (default): the pool has no nodes until the job's pods are pending, and at most the nodes and GPUs the job asked for (`limits`); nothing is paid before the training Job exists. `static`: the pool keeps `replicas` nodes (spec.replicas, Kaito's style) from the start and the training Job is created once they are Ready; needs Karpenter with the StaticCapacity feature gate."""


class ResourcesSpec(SpecModel):
    """Where the training pods run and what each one gets."""

    provisioner: Provisioner = "byo"
    """`karpenter` creates a Karpenter NodePool (karpenter.sh/v1) of instanceType for the job, and one for its server; `byo` uses existing nodes matched by nodeSelector."""
    instance_type: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    """Cloud instance type for provisioner karpenter, for example Standard_NC24ads_A100_v4 or p4d.24xlarge."""
    capacity_type: CapacityType = "on-demand"
    """Capacity type of the provisioned nodes (provisioner karpenter; the NodePool's karpenter.sh/capacity-type requirement): `on-demand` (default) or `spot`, cheaper but reclaimable (a reclaimed node fails the gang, which restarts from its last checkpoint)."""
    node_pool: NodePoolSpec = Field(default_factory=NodePoolSpec, json_schema_extra={"default": {}})
    """The job's Karpenter NodePool (provisioner karpenter)."""
    node_selector: Annotated[dict[LabelKey, LabelValue], Field(max_length=32)] = {}
    """Node labels the training pods must match (provisioner byo)."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = []
    """Extra tolerations for the training pods; the GPU taint of provisioned nodes is tolerated already."""
    gpu_resource_name: Annotated[str, StringConstraints(min_length=1, max_length=253)] = "nvidia.com/gpu"
    """Extended resource that counts GPUs on the nodes."""
    gpus_per_node: Annotated[int, Field(ge=0, le=64)] | None = None
    """GPUs each training pod requests; 0 trains on CPUs (the local runtime). When unset: every GPU of instanceType with provisioner karpenter, 1 with byo."""
    gpu_memory_gib: Annotated[int | None, Field(ge=1, le=4096, alias="gpuMemoryGiB")] = None
    """Memory of one GPU in GiB, for the pre-flight's memory plan; known for the instance types kubetune lists (docs/reference.md), needed for others and for byo nodes to get a verdict."""
    cpu: Quantity | None = None
    """CPU request of each training pod, for example `16`."""
    memory: Quantity | None = None
    """Memory request of each training pod, for example `128Gi`."""
    shared_memory: Quantity = "8Gi"
    """Size of the in-memory /dev/shm volume used by the data loaders and NCCL."""
    storage: StorageSpec = Field(default_factory=StorageSpec, json_schema_extra={"default": {}})
    """The volume for checkpoints and output."""


# -------------------------------------------------------------------------------------- output


class OutputSpec(SpecModel):
    """Where the trained adapter (or full model) goes."""

    destination: Uri | None = None
    """pvc://claim/path or oci://registry/repository:tag (s3:// is not supported yet); the job's own volume when unset."""
    secret_ref: ResourceName | None = None
    """Name of a Secret with push credentials (`.dockerconfigjson` for oci://)."""
    merge: bool = False
    """Also merge the adapter into the base weights and publish the merged model beside the adapter (`…/path-merged`, `…:tag-merged`; status.adapter.mergedUri); needed to serve DoRA with vLLM."""

    @field_validator("destination")
    @classmethod
    def _destination(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _check_uri(value, OUTPUT_SCHEMES, info)


# ------------------------------------------------------------------------------------- serving


class ServingSpec(SpecModel):
    """Serving the trained adapter behind an OpenAI-compatible endpoint once training completes."""

    enabled: bool = False
    """Deploy a server for the adapter after training."""
    runtime: ServingRuntime = "transformers"
    """`transformers` (the built-in server, CPU or GPU) or `vllm` (GPU, cannot serve DoRA unless output.merge is set)."""
    replicas: Annotated[int, Field(ge=0, le=64)] = 1
    """Server replicas."""
    model_name: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN)] | None = (
        None
    )
    """Model name clients put in requests: letters, digits, `.`, `_` and `-`, starting with a letter or digit; the job's name when unset."""
    gpus: Annotated[int, Field(ge=0, le=64)] | None = None
    """GPUs per replica; 1 for vllm and 0 for transformers when unset."""
    instance_type: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    """Instance type for the serving nodes when resources.provisioner is karpenter; the training instance type when unset."""
    port: Annotated[int, Field(ge=1024, le=65535)] = 8000
    """Port of the OpenAI-compatible HTTP endpoint."""
    server: ResourceName | None = None
    """A ModelServer in the job's namespace to load the adapter into at run time, instead of a server of the job's own (runtime, replicas, gpus, instanceType and port are then the ModelServer's); the job publishes onto its adapterClaim."""


# ----------------------------------------------------------------------------------- preflight


class PreflightSpec(SpecModel):
    """The pre-flight: a CPU Job that checks the sources, the data and the memory plan before any GPU node is provisioned."""

    enabled: bool = True
    """Run the pre-flight (on by default); false goes straight to provisioning, and the training pods check everything themselves."""


# ----------------------------------------------------------------------------------- runPolicy


class RunPolicy(SpecModel):
    """Restarts, deadlines, node release and queueing."""

    max_restarts: Annotated[int, Field(ge=0, le=100)] = 3
    """Gang restarts from the last checkpoint after retryable failures before the job fails."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Fail the training if it runs longer than this."""
    release_nodes: ReleaseNodes = "OnCompletion"
    """Release provisioned nodes when training ends (`OnCompletion`) or only when the job is deleted (`OnDelete`)."""
    queue_name: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    """Kueue LocalQueue to admit the training through; the workload starts suspended until admitted."""
    suspend: bool = False
    """Pause the job: training pods are stopped, checkpoints kept; resuming continues from the last one."""


# ----------------------------------------------------------------------------------------- spec


class FineTuneJobSpec(SpecModel):
    """A fine-tuning job: the base model, the data, the method, and where the result goes."""

    model: ModelSpec
    """The base model."""
    dataset: DatasetSpec
    """The training data."""
    method: MethodSpec = Field(default_factory=MethodSpec, json_schema_extra={"default": {}})
    """The fine-tuning method (LoRA by default)."""
    training: TrainingSpec = Field(default_factory=TrainingSpec, json_schema_extra={"default": {}})
    """Optimization settings."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec, json_schema_extra={"default": {}})
    """Pods, processes and DeepSpeed ZeRO."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, json_schema_extra={"default": {}})
    """Nodes, GPUs and storage."""
    output: OutputSpec = Field(default_factory=OutputSpec, json_schema_extra={"default": {}})
    """Where the trained adapter goes."""
    serving: ServingSpec = Field(default_factory=ServingSpec, json_schema_extra={"default": {}})
    """Serving the adapter after training."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy, json_schema_extra={"default": {}})
    """Restarts, deadlines, node release and queueing."""
    preflight: PreflightSpec = Field(default_factory=PreflightSpec, json_schema_extra={"default": {}})
    """The checks run on a CPU before any GPU node is provisioned."""

    @model_validator(mode="after")
    def _cross_field_rules(self) -> FineTuneJobSpec:
        broken = [rule for rule in RULES if not rule.holds(self)]
        if broken:
            raise PydanticCustomError(
                "cross_field",
                "{summary}",
                {
                    "summary": "; ".join(f"{r.field}: {r.message}" for r in broken),
                    "problems": [(r.field, r.message) for r in broken],
                },
            )
        return self
