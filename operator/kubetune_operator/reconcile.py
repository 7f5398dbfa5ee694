"""The reconcile decision: from a FineTuneJob and what is observed in the cluster, what to do next.

:func:`decide` is pure. The caller gathers :class:`Observed` (children found by label), calls it,
and carries out the :class:`Decision`: apply manifests, delete objects, write the status, emit
events. Status is recomputed from observations on every pass (the attempt number and restarts
come from the training Jobs that exist, the start time from the first Job), so an operator
restarted at any moment reaches the same decision and never duplicates a child.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from kubetune_api.resource import (
    Adapter,
    Condition,
    Endpoint,
    FineTuneJob,
    FineTuneJobStatus,
    Phase,
    Progress,
    Workload,
)
from kubetune_operator import builders, conditions, names
from kubetune_operator.settings import OperatorSettings

Obj = dict[str, Any]

JobState = Literal["Pending", "Suspended", "Running", "Succeeded", "FailedPermanent", "FailedRetryable"]
#: Job failure reasons that restarting cannot fix.
_PERMANENT_JOB_REASONS: Final = frozenset({"PodFailurePolicy", "DeadlineExceeded"})


@dataclass(frozen=True)
class Observed:
    """What the cluster holds for one FineTuneJob (raw objects as the API returns them)."""

    job: FineTuneJob
    generation: int
    uid: str
    node_claims: list[Obj] = field(default_factory=list)
    """The training NodeClaims."""
    nodes: list[Obj] = field(default_factory=list)
    """Nodes of the job's claims (karpenter) or every node (byo)."""
    karpenter_installed: bool = True
    training_jobs: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)
    """Pods of the current attempt."""
    progress: Progress | None = None
    """Freshly read from the rank-0 trainer, when it was read."""
    publish_job: Obj | None = None
    publish_pods: list[Obj] = field(default_factory=list)
    serving_claims: list[Obj] = field(default_factory=list)
    """NodeClaims of the serving replicas (karpenter)."""
    deployment: Obj | None = None
    """The serving Deployment, when it exists."""
    serving_pods: list[Obj] = field(default_factory=list)
    now: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).replace(microsecond=0))


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Decision:
    """What the caller must do."""

    status: FineTuneJobStatus
    create: list[Obj] = field(default_factory=list)
    """Objects created once and never re-applied (Jobs: their template is immutable; Kueue owns suspend)."""
    apply: list[Obj] = field(default_factory=list)
    """Objects applied server-side on every pass (idempotent)."""
    delete: list[tuple[str, str, str | None, str]] = field(default_factory=list)
    """(apiVersion, kind, namespace, name) to delete."""
    patch: list[tuple[Obj, Obj]] = field(default_factory=list)
    """(object, merge patch) pairs, for fields the operator toggles (a Job's suspend)."""
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    scrape_progress: bool = False
    """Whether the caller should read the rank-0 metrics before the next pass."""


# --------------------------------------------------------------------------------- reading


def _conditions(obj: Obj) -> dict[str, Obj]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def attempt_of(job: Obj) -> int:
    return int(job["metadata"].get("labels", {}).get(names.ATTEMPT_LABEL, "0"))


def job_state(job: Obj) -> JobState:
    conds = _conditions(job)
    if conds.get("Complete", {}).get("status") == "True" or conds.get("SuccessCriteriaMet", {}).get("status") == "True":
        return "Succeeded"
    failed = conds.get("Failed") or conds.get("FailureTarget")
    if failed and failed.get("status") == "True":
        return "FailedPermanent" if failed.get("reason") in _PERMANENT_JOB_REASONS else "FailedRetryable"
    if job["spec"].get("suspend"):
        return "Suspended"
    status = job.get("status") or {}
    return "Running" if status.get("active") or status.get("ready") else "Pending"


def _node_ready(node: Obj) -> bool:
    ready = _conditions(node).get("Ready", {}).get("status") == "True"
    return ready and not node.get("spec", {}).get("unschedulable", False)


def _gpus(node: Obj, resource: str) -> int:
    value = ((node.get("status") or {}).get("allocatable") or {}).get(resource, "0")
    return int(str(value)) if str(value).isdigit() else 0


def _failure_message(pods: list[Obj]) -> str:
    """The first termination message of a failed trainer container, for the Failed condition."""
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode", 0) != 0:
                message = str(terminated.get("message") or "").strip()
                where = f"pod {pod['metadata']['name']} exited with code {terminated['exitCode']}"
                return f"{where}: {message}" if message else where
    return ""


@dataclass(frozen=True)
class NodeReadiness:
    ready: bool
    reason: str
    message: str
    gpus_per_node: int
    node_names: list[str]


def _karpenter_nodes(observed: Observed, settings: OperatorSettings) -> NodeReadiness:
    spec = observed.job.spec
    wanted = spec.distributed.nodes
    gpu = spec.resources.gpu_resource_name
    if not observed.karpenter_installed:
        return NodeReadiness(
            False,
            conditions.KARPENTER_MISSING,
            "provisioner karpenter needs Karpenter's NodeClaim CRD (karpenter.sh/v1), which is not installed; "
            "install Karpenter or use resources.provisioner: byo",
            0,
            [],
        )
    for claim in observed.node_claims:
        launched = _conditions(claim).get("Launched")
        if launched and launched.get("status") == "False":
            return NodeReadiness(
                False,
                conditions.NODE_CLAIM_FAILED,
                f"NodeClaim {claim['metadata']['name']} ({spec.resources.instance_type}) failed to launch: "
                f"{launched.get('reason')}: {launched.get('message', '')}",
                0,
                [],
            )
    ready_claims = [c for c in observed.node_claims if _conditions(c).get("Ready", {}).get("status") == "True"]
    nodes = {n["metadata"]["name"]: n for n in observed.nodes}
    ready_nodes = [
        nodes[c["status"]["nodeName"]]
        for c in ready_claims
        if c.get("status", {}).get("nodeName") in nodes and _node_ready(nodes[c["status"]["nodeName"]])
    ]
    gpus = spec.resources.gpus_per_node
    if gpus is None:
        gpus = min((_gpus(n, gpu) for n in ready_nodes), default=0)
    with_gpus = [n for n in ready_nodes if _gpus(n, gpu) >= gpus]
    if len(with_gpus) < wanted:
        return NodeReadiness(
            False,
            conditions.WAITING_FOR_NODES,
            f"waiting for {wanted} NodeClaims of {spec.resources.instance_type} to become Ready nodes "
            f"({len(with_gpus)} ready, {len(observed.node_claims)} claimed)",
            gpus,
            [],
        )
    return NodeReadiness(
        True, conditions.NODES_PROVISIONED, f"{wanted} nodes ready", gpus, [n["metadata"]["name"] for n in with_gpus]
    )


def _byo_nodes(observed: Observed) -> NodeReadiness:
    spec = observed.job.spec
    wanted = spec.distributed.nodes
    selector = spec.resources.node_selector
    gpu = spec.resources.gpu_resource_name
    gpus = 1 if spec.resources.gpus_per_node is None else spec.resources.gpus_per_node
    matching = [
        n
        for n in observed.nodes
        if _node_ready(n) and all((n["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
    ]
    fitting = [n for n in matching if _gpus(n, gpu) >= gpus]
    if len(fitting) < wanted:
        labels = ", ".join(f"{k}={v}" for k, v in selector.items()) or "any labels"
        needs = f" with at least {gpus} allocatable {gpu}" if gpus else ""
        return NodeReadiness(
            False,
            conditions.WAITING_FOR_NODES,
            f"waiting for {wanted} Ready node(s) matching {labels}{needs}; "
            f"found {len(fitting)} ({len(matching)} match the selector)",
            gpus,
            [],
        )
    return NodeReadiness(True, conditions.NODES_PROVISIONED, f"{len(fitting)} matching nodes ready", gpus, [])


# --------------------------------------------------------------------------------- deciding


def decide(observed: Observed, settings: OperatorSettings) -> Decision:  # noqa: PLR0912, PLR0915 - one pass, read top to bottom
    """The next actions and the status for one FineTuneJob."""
    job, spec = observed.job, observed.job.spec
    previous = job.status or FineTuneJobStatus()
    generation = observed.generation
    conds = list(previous.conditions)
    decision = Decision(status=previous.model_copy())

    def condition(kind: str, status: conditions.Status, reason: str, message: str) -> None:
        nonlocal conds
        conds = conditions.set_condition(conds, kind, status, reason, message, generation=generation, now=observed.now)

    jobs = sorted(observed.training_jobs, key=attempt_of)
    current = jobs[-1] if jobs else None
    states = [job_state(j) for j in jobs]
    failures = states.count("FailedRetryable")
    attempt = attempt_of(current) if current is not None else 0
    current_state: JobState | None = states[-1] if current is not None else None

    # Nodes
    if spec.resources.provisioner == "karpenter":
        readiness = _karpenter_nodes(observed, settings)
    else:
        readiness = _byo_nodes(observed)
    trained = current_state == "Succeeded"
    publish_state = job_state(observed.publish_job) if trained and observed.publish_job is not None else None
    terminal_success = publish_state == "Succeeded"
    publish_failed = publish_state in ("FailedPermanent", "FailedRetryable")
    terminal_failure = (
        current_state == "FailedPermanent"
        or (current_state == "FailedRetryable" and failures > spec.run_policy.max_restarts)
        or publish_failed
    )
    terminal = terminal_success or terminal_failure
    target = builders.Target(
        name=job.name,
        namespace=job.namespace,
        uid=observed.uid,
        spec=spec,
        settings=settings,
        gpus_per_node=readiness.gpus_per_node,
        attempt=attempt,
    )

    # NodeClaims exist from the start until release.
    release = terminal and spec.run_policy.release_nodes == "OnCompletion"
    if spec.resources.provisioner == "karpenter" and observed.karpenter_installed:
        if release:
            decision.delete += [
                ("karpenter.sh/v1", "NodeClaim", None, c["metadata"]["name"]) for c in observed.node_claims
            ]
        else:
            existing = {c["metadata"]["name"] for c in observed.node_claims}
            decision.create += [c for c in builders.build_node_claims(target) if c["metadata"]["name"] not in existing]

    phase: Phase
    adapter = previous.adapter
    endpoint: Endpoint | None = None
    if terminal_success:
        phase = "Complete"
        if adapter is None or adapter.digest is None:
            adapter = _publish_result(observed.publish_pods) or adapter or Adapter(uri=_result_uri(target))
        condition(conditions.TRAINING, "False", conditions.TRAINING_SUCCEEDED, "training finished")
        condition(
            conditions.COMPLETE,
            "True",
            conditions.PUBLISHED,
            f"attempt {attempt} completed; published to {adapter.uri}",
        )
        condition(conditions.FAILED, "False", conditions.TRAINING_SUCCEEDED, "")
        if spec.serving.enabled:
            phase = "Serving"
            endpoint = _serve(observed, target, adapter, decision, condition)
        elif observed.deployment is not None or observed.serving_claims or _was_serving(conds):
            _stop_serving(observed, target, decision)
            condition(conditions.SERVING_READY, "False", conditions.SERVING_DISABLED, "serving.enabled is false")
    elif trained and not terminal_failure:
        phase = "Publishing"
        destination = spec.output.destination or _result_uri(target)
        if observed.publish_job is None:
            decision.create.append(builders.build_publish_job(target))
        condition(conditions.TRAINING, "False", conditions.TRAINING_SUCCEEDED, "training finished")
        condition(conditions.COMPLETE, "False", conditions.PUBLISHING, f"publishing the result to {destination}")
        decision.requeue_after = 5.0
    elif terminal_failure:
        phase = "Failed"
        assert current is not None
        if publish_failed:
            assert observed.publish_job is not None
            why = conditions.PUBLISH_FAILED
            detail = _failure_message(observed.publish_pods) or (
                _conditions(observed.publish_job).get("Failed", {}).get("message") or "the publish Job failed"
            )
            message = (
                f"training succeeded but publishing to {spec.output.destination or _result_uri(target)} failed "
                f"(the trained files stay in volume {builders.workspace_claim(target)}): {detail}"
            )
        elif current_state == "FailedPermanent":
            reason = _conditions(current).get("Failed", {}).get("reason", "")
            why = conditions.DEADLINE_EXCEEDED if reason == "DeadlineExceeded" else conditions.PERMANENT_FAILURE
            detail = _failure_message(observed.pods) or (_conditions(current).get("Failed", {}).get("message") or "")
            message = f"attempt {attempt} failed permanently (no restart will fix it): {detail}"
        else:
            why = conditions.RESTARTS_EXHAUSTED
            message = (
                f"{failures} gang failures with runPolicy.maxRestarts={spec.run_policy.max_restarts}: "
                f"{_failure_message(observed.pods) or 'a pod failed'}"
            )
        condition(conditions.FAILED, "True", why, message)
        condition(conditions.TRAINING, "False", why, message)
        condition(conditions.COMPLETE, "False", why, "")
    elif not readiness.ready:
        phase = "Provisioning"
        condition(conditions.NODES_READY, "False", readiness.reason, readiness.message)
        decision.requeue_after = 5.0
    else:
        condition(conditions.NODES_READY, "True", readiness.reason, readiness.message)
        if current is None or current_state == "FailedRetryable":
            if current is not None:
                attempt = attempt + 1
                decision.events.append(
                    Event(
                        "Warning",
                        conditions.RESTARTING,
                        f"attempt {attempt - 1} failed ({_failure_message(observed.pods) or 'a pod failed'}); "
                        f"restarting the gang from the last checkpoint as attempt {attempt} "
                        f"(restart {attempt} of at most {spec.run_policy.max_restarts})",
                    )
                )
            launch = dataclasses.replace(target, attempt=attempt)
            # Staging with every launch (pods of a running attempt have read it already, so steady-state
            # passes cost no writes): the config is applied (it names the attempt), the volume and the
            # Service are created once. Pods wait for their volumes, so the Job need not come last.
            pvc = builders.build_pvc(launch)
            decision.apply.append(builders.build_config_map(launch))
            decision.create += [*([pvc] if pvc else []), builders.build_service(launch)]
            decision.create.append(builders.build_training_job(launch, suspend=spec.run_policy.suspend))
            phase = "Initializing"
            condition(conditions.TRAINING, "False", conditions.STARTING, f"starting attempt {attempt}")
        elif spec.run_policy.suspend:
            phase = "Suspended"
            if current_state != "Suspended":
                decision.patch.append((current, {"spec": {"suspend": True}}))
            condition(
                conditions.SUSPENDED,
                "True",
                conditions.SUSPENDED_BY_USER,
                "runPolicy.suspend is true; checkpoints kept",
            )
        else:
            if current_state == "Suspended" and not spec.run_policy.queue_name:
                decision.patch.append((current, {"spec": {"suspend": False}}))
            if any(c.type == conditions.SUSPENDED for c in conds):
                condition(conditions.SUSPENDED, "False", conditions.NOT_SUSPENDED, "")
            running = [p for p in observed.pods if (p.get("status") or {}).get("phase") == "Running"]
            # Pods that finished while the Job controller has not yet marked the Job complete.
            finished = [p for p in observed.pods if (p.get("status") or {}).get("phase") == "Succeeded"]
            if current_state == "Suspended" and spec.run_policy.queue_name:
                phase = "Pending"
                condition(
                    conditions.TRAINING,
                    "False",
                    conditions.QUEUED,
                    f"waiting for Kueue to admit it from queue {spec.run_policy.queue_name}",
                )
            elif len(running) + len(finished) >= spec.distributed.nodes and (running or finished):
                phase = "Training"
                done = f", {len(finished)} finished" if finished else ""
                condition(
                    conditions.TRAINING,
                    "True",
                    conditions.RUNNING,
                    f"attempt {attempt}: {len(running)} pods running{done}",
                )
                decision.scrape_progress = True
                decision.requeue_after = settings.progress_interval_seconds
            else:
                phase = "Initializing"
                condition(
                    conditions.TRAINING,
                    "False",
                    conditions.STARTING,
                    f"attempt {attempt}: {len(running)}/{spec.distributed.nodes} pods running",
                )
                decision.requeue_after = 5.0
    if release and any(c.type == conditions.NODES_READY for c in conds) and spec.resources.provisioner == "karpenter":
        condition(
            conditions.NODES_READY,
            "False",
            conditions.NODES_RELEASED,
            "nodes released (runPolicy.releaseNodes: OnCompletion)",
        )

    # Status, recomputed.
    first = jobs[0] if jobs else None
    progress = observed.progress or previous.progress
    if trained and progress is not None:
        # The last read may predate the last steps: a succeeded Job ran all of them.
        final_step = progress.total_steps or progress.step
        progress = progress.model_copy(update={"percent": 100, "eta_seconds": 0, "step": final_step})
    status = FineTuneJobStatus(
        phase=phase,
        observed_generation=generation,
        conditions=conds,
        progress=progress,
        workload=Workload(
            job_name=names.training_job(job.name, attempt) if jobs or phase == "Initializing" else None,
            attempt=attempt,
            node_claims=sorted(c["metadata"]["name"] for c in observed.node_claims) if not release else [],
            nodes=sorted({p["spec"]["nodeName"] for p in observed.pods if p.get("spec", {}).get("nodeName")}),
        ),
        restarts=attempt,  # every attempt after the first is a gang restart
        adapter=adapter,
        endpoint=endpoint,
        start_time=_time((first or {}).get("status", {}).get("startTime")) or previous.start_time,
        completion_time=(
            _time(((observed.publish_job if publish_state else current) or {}).get("status", {}).get("completionTime"))
            or observed.now.replace(microsecond=0)
            if terminal
            else None
        ),
    )
    if terminal and previous.completion_time:
        status.completion_time = previous.completion_time
    if phase != previous.phase:
        kind: Literal["Normal", "Warning"] = "Warning" if phase == "Failed" else "Normal"
        message = next((c.message for c in conds if c.type == conditions.FAILED and c.status == "True"), "") or (
            f"phase {previous.phase} → {phase}"
        )
        decision.events.append(Event(kind, phase, message))
    decision.status = status
    if decision.requeue_after is None and not terminal:
        decision.requeue_after = settings.resync_seconds
    if terminal_failure and (observed.deployment is not None or observed.serving_claims):
        _stop_serving(observed, target, decision)
    return decision


ConditionSetter = Callable[[str, conditions.Status, str, str], None]


def _serve(
    observed: Observed, target: builders.Target, adapter: Adapter, decision: Decision, condition: ConditionSetter
) -> Endpoint:
    """Keep the serving Deployment, Service and nodes as the spec says; set ServingReady from the Deployment."""
    serving = target.spec.serving
    if target.spec.resources.provisioner == "karpenter" and observed.karpenter_installed:
        wanted = builders.build_serving_node_claims(target)
        names_wanted = {c["metadata"]["name"] for c in wanted}
        existing = {c["metadata"]["name"] for c in observed.serving_claims}
        decision.create += [c for c in wanted if c["metadata"]["name"] not in existing]
        decision.delete += [("karpenter.sh/v1", "NodeClaim", None, name) for name in sorted(existing - names_wanted)]
    decision.apply += [builders.build_serving_deployment(target, adapter.uri), builders.build_serving_service(target)]
    endpoint = Endpoint(url=builders.endpoint_url(target), model_name=builders.serving_model_name(target))
    status = (observed.deployment or {}).get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    if serving.replicas == 0:
        condition(conditions.SERVING_READY, "False", conditions.SCALED_TO_ZERO, "serving.replicas is 0")
    elif ready > 0:
        condition(
            conditions.SERVING_READY,
            "True",
            conditions.SERVING,
            f"{ready}/{serving.replicas} replicas ready; model {endpoint.model_name} at {endpoint.url}",
        )
    else:
        claims = ""
        if observed.serving_claims:
            pending = [c for c in observed.serving_claims if _conditions(c).get("Ready", {}).get("status") != "True"]
            failed = [
                f"NodeClaim {c['metadata']['name']}: {launched.get('reason')}: {launched.get('message', '')}"
                for c in observed.serving_claims
                if (launched := _conditions(c).get("Launched")) and launched.get("status") == "False"
            ]
            if failed:
                claims = "; " + "; ".join(failed)
            elif pending:
                claims = f"; {len(pending)} serving node(s) not ready yet"
        condition(
            conditions.SERVING_READY,
            "False",
            conditions.SERVING_STARTING,
            f"0/{serving.replicas} replicas ready{claims}{_waiting(observed.serving_pods)}",
        )
        decision.requeue_after = 5.0
    return endpoint


def _was_serving(conds: list[Condition]) -> bool:
    ready = conditions.get(conds, conditions.SERVING_READY)
    return ready is not None and ready.reason != conditions.SERVING_DISABLED


def _stop_serving(observed: Observed, target: builders.Target, decision: Decision) -> None:
    """Remove the serving Deployment, Service and nodes (serving turned off, or the job failed)."""
    name = names.serving(target.name)
    decision.delete += [("apps/v1", "Deployment", target.namespace, name), ("v1", "Service", target.namespace, name)]
    decision.delete += [("karpenter.sh/v1", "NodeClaim", None, c["metadata"]["name"]) for c in observed.serving_claims]


def _publish_result(pods: list[Obj]) -> Adapter | None:
    """The URI, digest and size the publish container left in its termination message."""
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode") != 0:
                continue
            lines = str(terminated.get("message") or "").strip().splitlines()
            if not lines:
                continue
            try:
                result: Obj = json.loads(lines[-1])
                return Adapter(uri=result["uri"], digest=result.get("digest"), size_bytes=result.get("sizeBytes"))
            except (ValueError, TypeError, KeyError):
                continue
    return None


def _waiting(pods: list[Obj]) -> str:
    """Why pods are not running yet, from their container states (a missing ConfigMap, say)."""
    reasons = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("message"):
                reasons.append(f"pod {pod['metadata']['name']}: {waiting.get('reason')}: {waiting['message']}")
    return "; " + "; ".join(reasons[:3]) if reasons else ""


def _result_uri(target: builders.Target) -> str:
    return target.spec.output.destination or builders.default_result_uri(target)


def _time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
