"""The pre-flight's verdict: what its Job found, and the memory plan for the job's devices.

The pre-flight Job (:mod:`~kubetune_operator.children.preflight`) reports the data's figures and
the part of the model's ``config.json`` that the planner reads. Here the operator plans the
memory with the same torch-free function as ``kubetune plan`` (:func:`kubetune_api.plan.plan_job`)
for one device of the job's instance type (:mod:`kubetune_api.instances`, ``resources.gpuMemoryGiB``,
or the ``nvidia.com/gpu.memory`` label that NVIDIA's GPU feature discovery puts on byo nodes),
and a job that would not fit fails with the planner's suggestions, before any node is provisioned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from kubetune_api import FineTuneJobSpec
from kubetune_api.instances import instance_shape
from kubetune_api.objects import Obj, parse_time
from kubetune_api.plan import GiB, MemoryPlan, ModelShape, plan_job
from kubetune_api.resource import Preflight
from kubetune_operator import conditions
from kubetune_operator.observed import (
    Observed,
    conditions_of,
    failure_message,
    job_state,
    preflight_findings,
    recorded_findings,
    waiting_reasons,
)

#: Label of NVIDIA GPU feature discovery: memory of one GPU in MiB.
GPU_MEMORY_LABEL: Final = "nvidia.com/gpu.memory"

State = Literal["Skipped", "Running", "Passed", "Failed"]


@dataclass(frozen=True)
class Verdict:
    """Where the pre-flight stands, and what the status says about it."""

    state: State
    reason: str = ""
    message: str = ""
    findings: Preflight | None = None
    """status.preflight."""
    record: Obj | None = None
    """Findings read from the pod this pass, to record on the pre-flight Job."""

    @property
    def clear(self) -> bool:
        """Whether provisioning may go ahead."""
        return self.state in ("Skipped", "Passed")


@dataclass(frozen=True)
class Devices:
    """The devices one training process gets, as far as the operator knows them."""

    accelerator: Literal["cuda", "cpu"]
    gpus_per_node: int | None
    memory_gib: float | None
    """Memory of one device (on CPUs: the node's memory shared by its processes)."""
    label: str


def devices_of(spec: FineTuneJobSpec, nodes: list[Obj]) -> Devices:
    """The devices of ``spec``'s training processes: from the instance type, the spec, or byo nodes' labels."""
    resources = spec.resources
    karpenter = resources.provisioner == "karpenter"
    shape = instance_shape(resources.instance_type) if karpenter else None
    where = f" ({resources.instance_type})" if karpenter and resources.instance_type else ""
    gpus = resources.gpus_per_node
    if gpus is None:
        gpus = shape.gpus if shape is not None else (None if karpenter else 1)
    if gpus == 0:
        processes = spec.distributed.processes_per_node or 1
        if shape is not None:
            share = shape.memory_gib / processes
            return Devices("cpu", 0, share, f"CPU, {share:g} GiB of host memory per process{where}")
        return Devices("cpu", 0, None, "CPU")
    memory: float | None = resources.gpu_memory_gib
    model = shape.gpu_model if shape is not None and shape.gpus else "GPU"
    if memory is None and shape is not None and shape.gpus:
        memory = float(shape.gpu_memory_gib)
    if memory is None and not karpenter:
        labelled = [_mib((n["metadata"].get("labels") or {}).get(GPU_MEMORY_LABEL)) for n in _matching(spec, nodes)]
        known = [m for m in labelled if m]
        if known:
            memory = min(known) / 1024
            where = f" (label {GPU_MEMORY_LABEL} of the matching nodes)"
    label = f"{model} {memory:g} GiB{where}" if memory is not None else f"{model}{where}"
    return Devices("cuda", gpus, memory, label)


def _mib(value: str | None) -> float | None:
    return float(value) if value and value.isdigit() else None


def _matching(spec: FineTuneJobSpec, nodes: list[Obj]) -> list[Obj]:
    selector = spec.resources.node_selector
    return [n for n in nodes if all((n["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())]


def verdict(observed: Observed) -> Verdict:
    """The pre-flight's state for one pass: skipped, running, passed (with findings) or failed (with why)."""
    spec = observed.job.spec
    job = observed.preflight_job
    if not spec.preflight.enabled or (job is None and observed.training_jobs):
        # Switched off, or training began before the pre-flight existed (an operator upgrade).
        return Verdict("Skipped")
    if job is None:
        return Verdict("Running", conditions.PREFLIGHT_RUNNING, "starting the pre-flight Job")
    state = job_state(job)
    if state in ("FailedPermanent", "FailedRetryable"):
        failed = conditions_of(job).get("Failed") or {}
        detail = failure_message(observed.preflight_pods) or failed.get("message") or "the pre-flight Job failed"
        if failed.get("reason") == "DeadlineExceeded":
            detail = f"the pre-flight ran out of time (activeDeadlineSeconds): {detail}"
        return Verdict(
            "Failed", conditions.PREFLIGHT_FAILED, f"pre-flight failed before any node was provisioned: {detail}"
        )
    if state != "Succeeded":
        return Verdict(
            "Running",
            conditions.PREFLIGHT_RUNNING,
            "checking the sources, the model and the whole dataset on a CPU before provisioning"
            f"{waiting_reasons(observed.preflight_pods)}",
        )
    recorded = recorded_findings(job)
    found = recorded or preflight_findings(observed.preflight_pods)
    if found is None:
        return Verdict(
            "Failed",
            conditions.PREFLIGHT_FAILED,
            "the pre-flight Job succeeded but its findings are gone (its pod was deleted before they were read); "
            "delete and apply the FineTuneJob again",
        )
    return _judge(spec, found, observed, record=None if recorded else found)


def _judge(spec: FineTuneJobSpec, found: Obj, observed: Observed, *, record: Obj | None) -> Verdict:
    """The findings of a pre-flight that passed, with the memory plan for the job's devices."""
    job = observed.preflight_job or {}
    status = job.get("status") or {}
    started, finished = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    devices = devices_of(spec, observed.nodes)
    plan: MemoryPlan | None = None
    parameters: int | None = None
    model_config = found.get("modelConfig")
    if isinstance(model_config, dict):
        try:
            parameters = ModelShape.from_config(model_config).parameters
            plan = plan_job(
                spec,
                model_config,
                device_gib=devices.memory_gib,
                gpus_per_node=devices.gpus_per_node,
                accelerator=devices.accelerator,
            )
        except (KeyError, ValueError, TypeError):
            plan = None
    findings = Preflight(
        format=str(found.get("format", ""))[:64],
        records=_count(found, "records"),
        train_examples=_count(found, "trainExamples"),
        eval_examples=_count(found, "evalExamples"),
        tokens=_count(found, "tokens"),
        truncated=_count(found, "truncated"),
        dropped=_count(found, "dropped"),
        model_parameters=None if plan is None else parameters,
        trainable_parameters=None if plan is None else plan.trainable_parameters,
        predicted_peak_gib=None if plan is None else round(plan.total / GiB, 2),
        device_memory_gib=devices.memory_gib,
        device=devices.label[:128],
        fits=None if plan is None else plan.fits,
        prepared_data_kept=bool(found.get("kept")),
        duration_seconds=(finished - started).total_seconds() if started and finished else None,
    )
    data = (
        f"{findings.records} records ({findings.format}) → {findings.train_examples} train / "
        f"{findings.eval_examples} eval examples, {findings.tokens:,} tokens, {findings.truncated} truncated at "
        f"maxSeqLength {spec.dataset.max_seq_length}"
    )
    if plan is None:
        memory = "memory not planned (the model's config.json does not describe a decoder the planner knows)"
    elif plan.fits is None:
        memory = (
            f"predicted peak {plan.total / GiB:.2f} GiB per process on {devices.label}; not checked against the "
            "device's memory, which kubetune does not know: set resources.gpuMemoryGiB"
        )
    elif plan.fits:
        memory = f"predicted peak {plan.total / GiB:.2f} GiB per process of {devices.label}"
    elif observed.training_jobs:
        # The spec changed after training began: say so, but never fail a running job on a prediction.
        memory = f"predicted peak {plan.total / GiB:.2f} GiB per process does NOT fit {devices.label} any more"
    else:
        tries = "; ".join(plan.suggestions)
        return Verdict(
            "Failed",
            conditions.WOULD_NOT_FIT,
            f"the job would not fit: predicted peak {plan.total / GiB:.2f} GiB per process "
            f"(weights {plan.parameters / GiB:.2f}, gradients {plan.gradients / GiB:.2f}, optimizer "
            f"{plan.optimizer / GiB:.2f}, activations {plan.activations / GiB:.2f}, overhead {plan.overhead / GiB:.2f}) "
            f"> {devices.label}; would fit: {tries}",
            findings,
            record,
        )
    return Verdict("Passed", conditions.PREFLIGHT_OK, f"{data}; {memory}", findings, record)


def _count(found: Obj, key: str) -> int:
    value = found.get(key)
    return value if isinstance(value, int) and value >= 0 else 0
