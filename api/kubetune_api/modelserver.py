"""The ModelServer resource: one shared OpenAI-compatible server per base model, serving many jobs' adapters.

A FineTuneJob with ``serving.server: NAME`` gets no server of its own: once its adapter is published,
the operator loads it into the ModelServer ``NAME`` of the job's namespace at run time (vLLM's and
the built-in server's ``/v1/load_lora_adapter``) and unloads it when the job is deleted or its
serving is switched off. Adapters are read from one ReadWriteMany claim, ``spec.adapterClaim``,
that every replica mounts read-only; a job served here publishes onto it
(``output.destination: pvc://<adapterClaim>/<path>``).

Why a resource of its own rather than a field on the jobs: the server outlives any one job (jobs
come and go, the base and its replicas stay), and a platform team sizes, places and pays for it
once, not per job.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, Field, StringConstraints, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kubetune_api.problems import InvalidManifestError, Problem, problems_of
from kubetune_api.resource import API_VERSION, MAX_NAME_LENGTH, Condition, StatusModel
from kubetune_api.spec import (
    WIRE_CONFIG,
    LabelKey,
    LabelValue,
    ModelSpec,
    Quantity,
    ResourceName,
    ServingRuntime,
    SpecModel,
)

MS_KIND: Final = "ModelServer"
MS_PLURAL: Final = "modelservers"
MS_SINGULAR: Final = "modelserver"
MS_SHORT_NAMES: Final = ("ms",)

#: The largest number of adapters one server holds at once (vLLM's ``--max-loras`` for its GPU slots).
MAX_ADAPTERS: Final = 256

ServerPhase = Literal["Pending", "Ready", "NotReady"]


class ModelServerSpec(SpecModel):
    """A shared server for one base model: its runtime, replicas, GPUs, and the claim its adapters come from."""

    model: ModelSpec
    """The base model every adapter served here was trained on."""
    adapter_claim: ResourceName
    """A ReadWriteMany PersistentVolumeClaim in this namespace that holds the adapters; every replica mounts it read-only, and jobs served here publish onto it (output.destination: pvc://<adapterClaim>/<path>)."""
    runtime: ServingRuntime = "transformers"
    """`transformers` (the built-in server, CPU or GPU) or `vllm` (GPU; cannot load DoRA adapters)."""
    replicas: Annotated[int, Field(ge=0, le=64)] = 1
    """Server replicas; each loads every adapter."""
    gpus: Annotated[int, Field(ge=0, le=64)] | None = None
    """GPUs per replica; 1 for vllm and 0 for transformers when unset."""
    port: Annotated[int, Field(ge=1024, le=65535)] = 8000
    """Port of the OpenAI-compatible HTTP endpoint."""
    max_adapters: Annotated[int, Field(ge=1, le=MAX_ADAPTERS)] = 16
    """Adapters held at once (vLLM's --max-loras); jobs beyond it wait, and their status says so."""
    max_lora_rank: Annotated[int, Field(ge=1, le=1024)] = 64
    """The largest LoRA rank an adapter may have (vLLM's --max-lora-rank, rounded up to a rank vLLM accepts)."""
    cpu: Quantity | None = None
    """CPU request of each replica (a Kubernetes quantity)."""
    memory: Quantity | None = None
    """Memory request (and limit) of each replica (a Kubernetes quantity)."""
    gpu_resource_name: Annotated[str, StringConstraints(min_length=1, max_length=253)] = "nvidia.com/gpu"
    """Extended resource name of the GPUs."""
    instance_type: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    """Cloud instance type of a Karpenter NodePool of the server's own (karpenter.sh/v1): at most replicas + 1 nodes (one more for a rolling update), deleted with the server. Unset: the replicas run on existing nodes (nodeSelector)."""
    node_selector: Annotated[dict[LabelKey, LabelValue], Field(max_length=32)] = Field(
        default_factory=dict, json_schema_extra={"default": {}}
    )
    """Labels of the existing nodes the replicas may run on, when instanceType is unset (replicas with GPUs also tolerate the nvidia.com/gpu taint)."""

    @field_validator("model")
    @classmethod
    def _served_sources(cls, value: ModelSpec) -> ModelSpec:
        if not value.source.startswith(("pvc://", "hf://")):
            raise PydanticCustomError(
                "uri",
                "a ModelServer serves a base from pvc://claim/path (or hf://org/name for runtime vllm); "
                "put the model on a claim first (`kubetune fetch-model`)",
            )
        return value


@dataclass(frozen=True)
class ServerRule:
    """A cross-field rule of the ModelServer spec: its CEL (the CRD) and its Python twin (`kubetune validate`)."""

    field: str
    cel: str
    message: str
    holds: Callable[[ModelServerSpec], bool]


SERVER_RULES: Final = (
    ServerRule(
        field="gpus",
        cel="self.runtime != 'vllm' || !has(self.gpus) || self.gpus >= 1",
        message="gpus: vLLM needs a GPU; set gpus to 1 or more, or runtime: transformers",
        holds=lambda spec: spec.runtime != "vllm" or spec.gpus is None or spec.gpus >= 1,
    ),
    ServerRule(
        field="nodeSelector",
        cel="!has(self.instanceType) || !has(self.nodeSelector) || size(self.nodeSelector) == 0",
        message=(
            "nodeSelector: instanceType provisions a NodePool of the server's own, nodeSelector picks existing "
            "nodes; set one of them"
        ),
        holds=lambda spec: spec.instance_type is None or not spec.node_selector,
    ),
)


class ServedAdapter(StatusModel):
    """One adapter the server should hold, and where it is loaded."""

    name: Annotated[str, Field(max_length=128)]
    """The model name clients ask for."""
    job: Annotated[str, Field(max_length=253)]
    """The FineTuneJob that published it."""
    path: Annotated[str, Field(max_length=2048)]
    """Where the replicas read it, relative to the adapter claim (empty when the server cannot take it)."""
    loaded_replicas: Annotated[int, Field(ge=0)] = 0
    """Ready replicas that hold it."""
    message: Annotated[str, Field(max_length=1024)] | None = None
    """Why a replica did not load it, in the server's words."""


class ModelServerStatus(StatusModel):
    """What the operator observed; recomputed on every pass."""

    phase: ServerPhase = "Pending"
    """Pending (no replica ready yet), Ready (every replica ready and holding every adapter) or NotReady."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The metadata.generation the status was computed from."""
    ready_replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas that answer."""
    url: Annotated[str, Field(max_length=2048)] | None = None
    """In-cluster base URL of the OpenAI-compatible API."""
    adapters: Annotated[list[ServedAdapter], Field(max_length=MAX_ADAPTERS)] = Field(default_factory=list)
    """The adapters the server holds or should hold."""
    conditions: Annotated[
        list[Condition],
        Field(
            max_length=8, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
        ),
    ] = Field(default_factory=list)
    """Conditions in the Kubernetes shape (Ready)."""


class ModelServer(BaseModel):
    """A ModelServer manifest."""

    model_config = WIRE_CONFIG

    api_version: Literal["kubetune.io/v1alpha1"] = API_VERSION
    """kubetune.io/v1alpha1"""
    kind: Literal["ModelServer"] = MS_KIND
    """ModelServer"""
    metadata: dict[str, Any]
    """Standard object metadata."""
    spec: ModelServerSpec
    """The base model, the runtime, the replicas and where the adapters come from."""
    status: ModelServerStatus | None = None
    """Written by the operator."""

    @field_validator("metadata")
    @classmethod
    def _name(cls, value: dict[str, Any]) -> dict[str, Any]:
        name = value.get("name")
        if isinstance(name, str) and len(name) > MAX_NAME_LENGTH:
            problem = f"{name!r} has {len(name)} characters; use at most {MAX_NAME_LENGTH}"
            raise PydanticCustomError(
                "cross_field", "name: {problem}", {"problem": problem, "problems": [("name", problem)]}
            )
        return value

    @model_validator(mode="after")
    def _rules(self) -> ModelServer:
        """The CRD's CEL rules of the spec (crd.model_server_schema), for `kubetune validate`."""
        spec = self.spec
        for rule in SERVER_RULES:
            if not rule.holds(spec):
                raise PydanticCustomError(
                    "cross_field",
                    "{summary}",
                    {"summary": rule.message, "problems": [(f"spec.{rule.field}", rule.message)]},
                )
        return self

    @model_validator(mode="after")
    def _hub_only_for_vllm(self) -> ModelServer:
        if self.spec.runtime != "vllm" and self.spec.model.source.startswith("hf://"):
            problem = (
                "the built-in server (runtime transformers) serves a base from pvc://claim/path; "
                "put the model on a claim, or use runtime: vllm"
            )
            raise PydanticCustomError(
                "cross_field", "{summary}", {"summary": problem, "problems": [("spec.model.source", problem)]}
            )
        return self

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", "default"))


def load_model_server(manifest: dict[str, Any], *, source: str = "manifest") -> ModelServer:
    """Validate a ModelServer manifest; raise :class:`InvalidManifestError` listing every problem."""
    if not isinstance(manifest, dict):
        raise InvalidManifestError([Problem("(manifest)", "expected a mapping (a YAML object)")], source=source)
    try:
        return ModelServer.model_validate(manifest, by_alias=True, by_name=False)
    except ValidationError as error:
        raise InvalidManifestError(problems_of(error), source=source) from None
