"""The FineTuneJob resource: its identity (group, version, kind, plural), the status and whole manifests.

The spec is :mod:`kubetune_api.spec`; this module adds the rest of the object: the identity every
component addresses it by, the status the operator writes, and :func:`load_job`, which validates a
whole manifest and lists every problem.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from kubetune_api.problems import InvalidManifestError, Problem, problems_of
from kubetune_api.spec import ALLOW_LOCAL_PATHS, WIRE_CONFIG, FineTuneJobSpec

GROUP: Final = "kubetune.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "kubetune.io/v1alpha1"  # GROUP/VERSION, spelled out for the Literal type below
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"
SINGULAR: Final = "finetunejob"
SHORT_NAMES: Final = ("ftj",)

#: Child objects are named ``<job>-<suffix>`` and pods ``<job>-train-<attempt>-<index>``;
#: a short job name keeps them inside the 63-character limit of DNS labels and hostnames.
MAX_NAME_LENGTH: Final = 40

Phase = Literal[
    "Pending",
    "Preflight",
    "Queued",
    "Provisioning",
    "Initializing",
    "Training",
    "Publishing",
    "Serving",
    "Complete",
    "Failed",
    "Suspended",
]
PHASES: Final[tuple[Phase, ...]] = Phase.__args__  # type: ignore[attr-defined]


class StatusModel(BaseModel):
    """Base of the status sections: camelCase on the wire, written by the operator only."""

    model_config = WIRE_CONFIG


class Condition(StatusModel):
    """A condition in the Kubernetes shape."""

    type: Annotated[str, Field(min_length=1, max_length=316)]
    """Condition type, for example Complete, Failed, NodesReady or ServingReady."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: Annotated[str, Field(min_length=1, max_length=1024)]
    """One CamelCase word for machines, for example InsufficientCapacity."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """What happened, for people."""
    last_transition_time: datetime
    """When the status last changed."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The metadata.generation this condition was computed from."""


class Progress(StatusModel):
    """Training progress, read from the rank-0 trainer's metrics endpoint."""

    step: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps done."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps planned."""
    epoch: Annotated[float, Field(ge=0)] | None = None
    """Epochs done, with fractions."""
    percent: Annotated[int, Field(ge=0, le=100)] | None = None
    """step / totalSteps in percent."""
    loss: float | None = None
    """Latest training loss."""
    eval_loss: float | None = None
    """Latest evaluation loss."""
    learning_rate: Annotated[float, Field(ge=0)] | None = None
    """Current learning rate."""
    tokens_per_second: Annotated[float, Field(ge=0)] | None = None
    """Training throughput over the whole gang."""
    eta_seconds: Annotated[int, Field(ge=0)] | None = None
    """Estimated seconds until training ends."""


class Workload(StatusModel):
    """The Kubernetes objects doing the work now."""

    job_name: Annotated[str, Field(max_length=63)] | None = None
    """Name of the current training Job (batch/v1)."""
    attempt: Annotated[int, Field(ge=0)] = 0
    """Gang attempt number; each restart from a checkpoint starts a new attempt."""
    node_claims: Annotated[list[Annotated[str, Field(max_length=253)]], Field(max_length=256)] = []
    """NodeClaims Karpenter made for the job's training NodePool."""
    nodes: Annotated[list[Annotated[str, Field(max_length=253)]], Field(max_length=256)] = []
    """Nodes the training pods run on."""


class Adapter(StatusModel):
    """The published result."""

    uri: Annotated[str, Field(max_length=2048)]
    """Where the adapter (or model) was published."""
    digest: Annotated[str, Field(max_length=128)] | None = None
    """Content digest, for example sha256:…"""
    size_bytes: Annotated[int, Field(ge=0)] | None = None
    """Total size of the published files."""
    merged_uri: Annotated[str, Field(max_length=2048)] | None = None
    """Where the merged model was published (output.merge)."""


class Preflight(StatusModel):
    """What the pre-flight found: the data as training will see it, and the memory plan for the job's devices."""

    format: Annotated[str, Field(max_length=64)] = ""
    """The dataset format used (detected when format is auto)."""
    records: Annotated[int, Field(ge=0)] = 0
    """Records read from the dataset."""
    train_examples: Annotated[int, Field(ge=0)] = 0
    """Examples to train on (after truncation, drops and the validation split)."""
    eval_examples: Annotated[int, Field(ge=0)] = 0
    """Examples held out for evaluation."""
    tokens: Annotated[int, Field(ge=0)] = 0
    """Tokens in the training examples (one epoch)."""
    truncated: Annotated[int, Field(ge=0)] = 0
    """Examples cut to dataset.maxSeqLength."""
    dropped: Annotated[int, Field(ge=0)] = 0
    """Examples left with nothing to learn from after truncation."""
    model_parameters: Annotated[int, Field(ge=0)] | None = None
    """Parameters of the base model, from its config.json."""
    trainable_parameters: Annotated[int, Field(ge=0)] | None = None
    """Parameters the method trains."""
    predicted_peak_gib: Annotated[float | None, Field(ge=0, alias="predictedPeakGiB")] = None
    """The planner's predicted peak memory per training process, in GiB."""
    device_memory_gib: Annotated[float | None, Field(ge=0, alias="deviceMemoryGiB")] = None
    """Memory of one device (a GPU, or the host's share per process on CPUs), in GiB, when known."""
    device: Annotated[str, Field(max_length=128)] = ""
    """The device the plan is for, for example `A100 80 GiB (Standard_NC24ads_A100_v4)`."""
    fits: bool | None = None
    """Whether the predicted peak fits the device; unset when the device's memory is unknown."""
    prepared_data_kept: bool = False
    """Whether the tokenized data stays on the job's volume for training to reuse."""
    duration_seconds: Annotated[float, Field(ge=0)] | None = None
    """How long the pre-flight Job ran."""


class Endpoint(StatusModel):
    """Where the served adapter answers."""

    url: Annotated[str, Field(max_length=2048)]
    """In-cluster base URL of the OpenAI-compatible API, for example http://support-bot-serve.ml:8000/v1."""
    model_name: Annotated[str, Field(max_length=128)]
    """Model name to put in requests."""


class FineTuneJobStatus(StatusModel):
    """What the operator observed and decided; recomputed on every reconcile."""

    phase: Phase = "Pending"
    """Pending, Preflight, Queued (waiting for Kueue to admit it: no node yet), Provisioning, Initializing, Training, Publishing, Serving, Complete, Failed or Suspended."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The metadata.generation the status was computed from."""
    conditions: Annotated[
        list[Condition],
        Field(
            max_length=32,
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        ),
    ] = []
    """Conditions in the Kubernetes shape."""
    preflight: Preflight | None = None
    """What the pre-flight found (spec.preflight)."""
    progress: Progress | None = None
    """Training progress."""
    workload: Workload | None = None
    """The training workload."""
    restarts: Annotated[int, Field(ge=0)] = 0
    """Gang restarts so far."""
    adapter: Adapter | None = None
    """The published adapter."""
    endpoint: Endpoint | None = None
    """The serving endpoint."""
    start_time: datetime | None = None
    """When training started; spec.model and spec.method are immutable from then on."""
    completion_time: datetime | None = None
    """When the job completed or failed."""


class FineTuneJob(BaseModel):
    """A FineTuneJob manifest."""

    model_config = WIRE_CONFIG

    api_version: Literal["kubetune.io/v1alpha1"] = API_VERSION
    """kubetune.io/v1alpha1"""
    kind: Literal["FineTuneJob"] = KIND
    """FineTuneJob"""
    metadata: dict[str, Any]
    """Standard object metadata."""
    spec: FineTuneJobSpec
    """What to fine-tune, on what data, how, and where the result goes."""
    status: FineTuneJobStatus | None = None
    """Written by the operator."""

    @field_validator("metadata")
    @classmethod
    def _name(cls, value: dict[str, Any]) -> dict[str, Any]:
        name = value.get("name")
        problem = None
        if not isinstance(name, str) and not value.get("generateName"):
            problem = "required field is missing"
        elif isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
            problem = (
                f"{name!r} has {len(name)} characters; use at most {MAX_NAME_LENGTH} "
                "so that the names of its pods fit in 63"
            )
        if problem:
            raise PydanticCustomError(
                "cross_field", "name: {problem}", {"problem": problem, "problems": [("name", problem)]}
            )
        return value

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", "default"))


def load_job(manifest: dict[str, Any], *, allow_local_paths: bool = False, source: str = "manifest") -> FineTuneJob:
    """Validate a FineTuneJob manifest; raise :class:`InvalidManifestError` listing every problem.

    ``allow_local_paths`` accepts absolute paths and ``file://`` sources, for ``kubetune train``
    on a workstation; the cluster never does.
    """
    if not isinstance(manifest, dict):
        raise InvalidManifestError([Problem("(manifest)", "expected a mapping (a YAML object)")], source=source)
    try:
        return FineTuneJob.model_validate(
            manifest, context={ALLOW_LOCAL_PATHS: allow_local_paths}, by_alias=True, by_name=False
        )
    except ValidationError as error:
        raise InvalidManifestError(problems_of(error), source=source) from None
