"""The reconcile decision: from a FineTuneJob and what is observed in the cluster, what to do next.

:func:`decide` is pure. The caller gathers :class:`~kubetune_operator.observed.Observed` (children
found by label), calls it, and carries out the :class:`~kubetune_operator.decision.Decision`: apply
manifests, delete objects, write the status, emit events. Status is recomputed from observations
on every pass (the attempt number and restarts come from the training Jobs that exist, the start
time from the first Job), so an operator restarted at any moment reaches the same decision and
never duplicates a child.

A pass works out its :class:`~kubetune_operator.facts.Facts` once, keeps the NodePool, hands over
to the one function of the phase the job is in (which sets its conditions and adds its actions),
and assembles the status.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from kubetune_api.modelserver import ModelServer, ModelServerStatus
from kubetune_api.objects import Obj, parse_time
from kubetune_api.resource import Adapter, Endpoint, FineTuneJobStatus, Phase, Workload
from kubetune_operator import conditions, names
from kubetune_operator.children.modelserver import server_url
from kubetune_operator.children.nodes import (
    KARPENTER_API_VERSION,
    NODE_POOL_KIND,
    build_node_pool,
    build_serving_node_pool,
    serving_pool_name,
    training_pool_name,
)
from kubetune_operator.children.pod import workspace_claim
from kubetune_operator.children.preflight import build_preflight_job, keeps_data, reads_workspace
from kubetune_operator.children.publish import build_publish_job, result_uri
from kubetune_operator.children.serving import (
    build_serving_deployment,
    build_serving_service,
    endpoint_url,
    serving_model_name,
)
from kubetune_operator.children.training import build_config_map, build_pvc, build_service, build_training_job
from kubetune_operator.conditions import Conditions, Status
from kubetune_operator.decision import Decision, Event
from kubetune_operator.facts import Facts, facts_of
from kubetune_operator.observed import (
    Observed,
    conditions_of,
    failure_message,
    findings_annotation,
    has_pool,
    in_phase,
    karpenter_warning,
    kueue_reason,
    not_admitted,
    publish_result,
    recorded_result,
    result_annotation,
    serving_claims_note,
    uses_karpenter,
    waiting_reasons,
    waits_in_queue,
)
from kubetune_operator.settings import OperatorSettings

#: Seconds to the next pass while something is about to change (nodes, pods, a publish, a server).
_SOON = 5.0
#: How often a queued job re-reads its Workload (Kueue's admission itself wakes it: it changes the Job).
_QUEUE_POLL = 15.0


@dataclass(frozen=True)
class Outcome:
    """What the phase of the pass decided for the status besides the conditions."""

    phase: Phase
    attempt: int
    adapter: Adapter | None
    endpoint: Endpoint | None = None


def decide(observed: Observed, settings: OperatorSettings) -> Decision:
    """The next actions and the status for one FineTuneJob."""
    facts = facts_of(observed, settings)
    previous = facts.previous
    decision = Decision(status=previous.model_copy())
    own = [c for c in previous.conditions if c.type in conditions.TYPES]
    conds = Conditions(own, generation=observed.generation, now=observed.now)
    _preflight_condition(facts, conds, decision)
    _keep_node_pool(facts, decision)
    outcome = _phase(facts, conds, decision)
    if facts.release and conds.has(conditions.NODES_READY) and uses_karpenter(observed.job):
        conds.set(
            conditions.NODES_READY,
            "False",
            conditions.NODES_RELEASED,
            "nodes released (runPolicy.releaseNodes: OnCompletion)",
        )
    status = _status(facts, outcome, conds)
    if status.phase != previous.phase:
        kind: Literal["Normal", "Warning"] = "Warning" if status.phase == "Failed" else "Normal"
        message = next((c.message for c in conds.items if c.type == conditions.FAILED and c.status == "True"), "") or (
            f"phase {previous.phase} → {status.phase}"
        )
        decision.events.append(Event(kind, status.phase, message))
    decision.status = status
    if decision.requeue_after is None and not facts.terminal:
        decision.requeue_after = settings.resync_seconds
    if facts.terminal_failure and (
        observed.deployment is not None or observed.serving_claims or has_pool(observed, names.ROLE_SERVER)
    ):
        _stop_serving(facts, decision)
    return decision


def _preflight_condition(facts: Facts, conds: Conditions, decision: Decision) -> None:
    """PreflightPassed from the verdict; the findings read from its pod this pass are recorded on its Job."""
    preflight = facts.preflight
    if preflight.state == "Skipped":
        return
    if preflight.record is not None and facts.observed.preflight_job is not None:
        decision.patch.append((facts.observed.preflight_job, findings_annotation(preflight.record)))
    status: Status = "True" if preflight.state == "Passed" else "False"
    previous = conds.get(conditions.PREFLIGHT_PASSED)
    if status == "True" and (previous is None or previous.status != "True"):
        decision.events.append(Event("Normal", conditions.PREFLIGHT_OK, preflight.message))
    conds.set(conditions.PREFLIGHT_PASSED, status, preflight.reason, preflight.message)


def _keep_node_pool(facts: Facts, decision: Decision) -> None:
    """The training NodePool exists from a clear pre-flight until release (none is ever made for a job the pre-flight failed).

    Applied on every pass (server-side, idempotent: a pool changed by hand is put back); deleted on
    release, and Karpenter then drains and deletes its nodes.
    """
    observed = facts.observed
    if not (uses_karpenter(observed.job) and observed.karpenter_installed):
        return
    if facts.release or not_admitted(observed.job, facts.current):
        # Released, or not admitted by Kueue (not yet, evicted, or suspended): no pool, so no node is paid for.
        if has_pool(observed, names.ROLE_TRAINER):
            decision.delete.append((KARPENTER_API_VERSION, NODE_POOL_KIND, None, training_pool_name(facts.target)))
    elif facts.preflight.clear:
        _apply_pool(observed, build_node_pool(facts.target), decision)


def _apply_pool(observed: Observed, pool: Obj, decision: Decision) -> None:
    """Apply ``pool``, or replace the job's pool of the other mode: Karpenter refuses to turn a pool static or dynamic.

    The pool of the old mode is deleted (Karpenter drains its nodes: a running gang fails and
    restarts from its checkpoint); the next pass, once it is gone, creates the new one.
    """
    name = pool["metadata"]["name"]
    existing = next((p for p in observed.node_pools if p["metadata"]["name"] == name), None)
    if existing is not None and ("replicas" in (existing.get("spec") or {})) != ("replicas" in pool["spec"]):
        if not existing["metadata"].get("deletionTimestamp"):
            decision.delete.append((KARPENTER_API_VERSION, NODE_POOL_KIND, None, name))
        return
    decision.apply.append(pool)


def _phase(facts: Facts, conds: Conditions, decision: Decision) -> Outcome:
    """The one function of the phase the job is in."""
    if facts.terminal_success:
        return _complete(facts, conds, decision)
    if facts.trained and not facts.terminal_failure:
        return _publishing(facts, conds, decision)
    if facts.terminal_failure:
        return _failed(facts, conds)
    if not facts.preflight.clear:
        return _preflight(facts, conds, decision)
    return _cleared(facts, conds, decision)


def _cleared(facts: Facts, conds: Conditions, decision: Decision) -> Outcome:
    """Past the pre-flight: wait for Kueue, then for the nodes, then train."""
    if waits_in_queue(facts.observed.job, facts.current):
        return _queued(facts, conds, decision)
    if not facts.readiness.ready and not _pods_bring_nodes(facts):
        return _provisioning(facts, conds, decision)
    return _nodes_ready(facts, conds, decision)


def _pods_bring_nodes(facts: Facts) -> bool:
    """A dynamic NodePool has no node until the job's pods are pending: its Job comes once the pool exists."""
    observed = facts.observed
    return (
        uses_karpenter(observed.job)
        and observed.karpenter_installed
        and facts.spec.resources.node_pool.mode == "dynamic"
        and has_pool(observed, names.ROLE_TRAINER)
    )


def _nodes_ready(facts: Facts, conds: Conditions, decision: Decision) -> Outcome:
    """The nodes are ready (or come for the pods of a dynamic pool): launch an attempt, suspend it, or follow it."""
    readiness = facts.readiness
    conds.set(conditions.NODES_READY, "True" if readiness.ready else "False", readiness.reason, readiness.message)
    if facts.current is None or facts.current_state == "FailedRetryable":
        outcome = _launching(facts, conds, decision)
    elif facts.spec.run_policy.suspend:
        return _suspended(facts, conds, decision)
    else:
        outcome = _running(facts, conds, decision)
    if not readiness.ready and outcome.phase == "Initializing":
        # The pods wait for the nodes they brought: the job is still provisioning.
        decision.requeue_after = _SOON
        return dataclasses.replace(outcome, phase="Provisioning")
    return outcome


# ----------------------------------------------------------------------------------- phases


def _complete(facts: Facts, conds: Conditions, decision: Decision) -> Outcome:
    """Published: record the result, then serve it (or stop a server that serving.enabled no longer wants)."""
    observed = facts.observed
    # Derived from the publish Job, never carried over from status (which a user may have written).
    adapter = recorded_result(observed.publish_job)
    if adapter is None:
        adapter = publish_result(observed.publish_pods)
        if adapter is not None and observed.publish_job is not None:
            decision.patch.append((observed.publish_job, result_annotation(adapter)))
    adapter = adapter or Adapter(uri=result_uri(facts.target))
    conds.set(conditions.TRAINING, "False", conditions.TRAINING_SUCCEEDED, "training finished")
    conds.set(
        conditions.COMPLETE,
        "True",
        conditions.PUBLISHED,
        f"attempt {facts.attempt} completed; published to {adapter.uri}",
    )
    conds.set(conditions.FAILED, "False", conditions.TRAINING_SUCCEEDED, "")
    if facts.spec.serving.enabled and facts.spec.serving.server:
        return Outcome("Serving", facts.attempt, adapter, _serve_shared(facts, conds, decision))
    if facts.spec.serving.enabled:
        return Outcome("Serving", facts.attempt, adapter, _serve(facts, adapter, conds, decision))
    if observed.deployment is not None or has_pool(observed, names.ROLE_SERVER) or _was_serving(conds):
        _stop_serving(facts, decision)
        conds.set(conditions.SERVING_READY, "False", conditions.SERVING_DISABLED, "serving.enabled is false")
    return Outcome("Complete", facts.attempt, adapter)


def _publishing(facts: Facts, conds: Conditions, decision: Decision) -> Outcome:
    """Trained: the publish Job, created once, publishes the result."""
    if facts.observed.publish_job is None:
        decision.create.append(build_publish_job(facts.target))
    conds.set(conditions.TRAINING, "False", conditions.TRAINING_SUCCEEDED, "training finished")
    conds.set(
        conditions.COMPLETE, "False", conditions.PUBLISHING, f"publishing the result to {result_uri(facts.target)}"
    )
    decision.requeue_after = _SOON
    return Outcome("Publishing", facts.attempt, None)


def _failed(facts: Facts, conds: Conditions) -> Outcome:
    """Failed for good: the pre-flight failed, publishing failed, the attempt failed permanently, or the restarts ran out."""
    observed, current, spec = facts.observed, facts.current, facts.spec
    if facts.preflight.state == "Failed":
        why, message = facts.preflight.reason, facts.preflight.message
        conds.set(conditions.FAILED, "True", why, message)
        conds.set(conditions.COMPLETE, "False", why, "")
        return Outcome("Failed", facts.attempt, None)
    assert current is not None
    if facts.publish_failed:
        assert observed.publish_job is not None
        why = conditions.PUBLISH_FAILED
        detail = failure_message(observed.publish_pods) or (
            conditions_of(observed.publish_job).get("Failed", {}).get("message") or "the publish Job failed"
        )
        message = (
            f"training succeeded but publishing to {result_uri(facts.target)} failed "
            f"(the trained files stay in volume {workspace_claim(facts.target)}): {detail}"
        )
    elif facts.current_state == "FailedPermanent":
        reason = conditions_of(current).get("Failed", {}).get("reason", "")
        why = conditions.DEADLINE_EXCEEDED if reason == "DeadlineExceeded" else conditions.PERMANENT_FAILURE
        detail = failure_message(observed.pods) or (conditions_of(current).get("Failed", {}).get("message") or "")
        message = f"attempt {facts.attempt} failed permanently (no restart will fix it): {detail}"
    else:
        why = conditions.RESTARTS_EXHAUSTED
        message = (
            f"{facts.failures} gang failures with runPolicy.maxRestarts={spec.run_policy.max_restarts}: "
            f"{failure_message(observed.pods) or 'a pod failed'}"
        )
    conds.set(conditions.FAILED, "True", why, message)
    conds.set(conditions.TRAINING, "False", why, message)
    conds.set(conditions.COMPLETE, "False", why, "")
    return Outcome("Failed", facts.attempt, None)


def _preflight(facts: Facts, conds: Conditions, decision: Decision) -> Outcome:
    """Before any node: the pre-flight Job checks the sources, the model and the data on a CPU.

    Its volume is created first when the pre-flight keeps the tokenized data there for training.
    """
    target = facts.target
    if facts.observed.preflight_job is None:
        pvc = build_pvc(target) if keeps_data(target) or reads_workspace(target) else None
        decision.apply.append(build_config_map(target))
        decision.create += [*([pvc] if pvc else []), build_preflight_job(target)]
    decision.requeue_after = _SOON
    return Outcome("Preflight", facts.attempt, None)


def _provisioning(facts: Facts, conds: Conditions, decision: Decision) -> Outcome:
    """Waiting for the nodes."""
    conds.set(conditions.NODES_READY, "False", facts.readiness.reason, facts.readiness.message)
    decision.requeue_after = _SOON
    return Outcome("Provisioning", facts.attempt, None)


def _queued(facts: Facts, conds: Conditions, decision: Decision) -> Outcome:
    """runPolicy.queueName: the attempt's Job waits, suspended, for Kueue to admit it; no node exists until then.

    The Job (with Kueue's queue label and the gang's pod-set resources) is created first, so Kueue
    can count it against the ClusterQueue's quota; Kueue admits it by unsuspending it, and the
    pool comes then (a dynamic pool's nodes come for the pending pods). An evicted attempt (Kueue
    suspends it again) comes back here, its pool deleted; re-admitted, its pods resume from the
    last checkpoint.
    """
    queue = facts.spec.run_policy.queue_name
    if facts.current is None:
        outcome = _launching(facts, conds, decision)
        reason = "its Job is created suspended for Kueue to admit"
    else:
        outcome = Outcome("Queued", facts.attempt, None)
        reason = kueue_reason(facts.observed.workload)
    conds.set(
        conditions.TRAINING, "False", conditions.QUEUED, f"waiting for Kueue to admit it from queue {queue}: {reason}"
    )
    conds.set(conditions.NODES_READY, "False", conditions.QUEUED, "no node until Kueue admits the job")
    decision.requeue_after = _QUEUE_POLL
    return dataclasses.replace(outcome, phase="Queued")


def _launching(facts: Facts, conds: Conditions, decision: Decision) -> Outcome:
    """The first attempt, or a gang restart after a retryable failure: stage and create its Job."""
    attempt = facts.attempt
    if facts.current is not None:
        attempt = attempt + 1
        decision.events.append(
            Event(
                "Warning",
                conditions.RESTARTING,
                f"attempt {attempt - 1} failed ({failure_message(facts.observed.pods) or 'a pod failed'}); "
                f"restarting the gang from the last checkpoint as attempt {attempt} "
                f"(restart {attempt} of at most {facts.spec.run_policy.max_restarts})",
            )
        )
    launch = dataclasses.replace(facts.target, attempt=attempt)
    # Staging with every launch (pods of a running attempt have read it already, so steady-state
    # passes cost no writes): the config is applied (it names the attempt), the volume and the
    # Service are created once. Pods wait for their volumes, so the Job need not come last.
    pvc = build_pvc(launch)
    decision.apply.append(build_config_map(launch))
    decision.create += [*([pvc] if pvc else []), build_service(launch)]
    decision.create.append(build_training_job(launch, suspend=facts.spec.run_policy.suspend))
    conds.set(conditions.TRAINING, "False", conditions.STARTING, f"starting attempt {attempt}")
    return Outcome("Initializing", attempt, None)


def _suspended(facts: Facts, conds: Conditions, decision: Decision) -> Outcome:
    """runPolicy.suspend: the attempt's Job is suspended (its pods stop), the checkpoints stay."""
    assert facts.current is not None
    if facts.current_state != "Suspended":
        decision.patch.append((facts.current, {"spec": {"suspend": True}}))
    conds.set(conditions.SUSPENDED, "True", conditions.SUSPENDED_BY_USER, "runPolicy.suspend is true; checkpoints kept")
    return Outcome("Suspended", facts.attempt, None)


def _running(facts: Facts, conds: Conditions, decision: Decision) -> Outcome:
    """The attempt goes on: resumed if it was suspended; queued, training or initializing by its pods."""
    observed, current, spec = facts.observed, facts.current, facts.spec
    assert current is not None
    if facts.current_state == "Suspended" and not spec.run_policy.queue_name:
        decision.patch.append((current, {"spec": {"suspend": False}}))
    if conds.has(conditions.SUSPENDED):
        conds.set(conditions.SUSPENDED, "False", conditions.NOT_SUSPENDED, "")
    running = in_phase(observed.pods, "Running")
    # Pods that finished while the Job controller has not yet marked the Job complete.
    finished = in_phase(observed.pods, "Succeeded")
    if len(running) + len(finished) >= spec.distributed.nodes and (running or finished):
        done = f", {len(finished)} finished" if finished else ""
        conds.set(
            conditions.TRAINING,
            "True",
            conditions.RUNNING,
            f"attempt {facts.attempt}: {len(running)} pods running{done}",
        )
        decision.scrape_progress = True
        decision.requeue_after = facts.settings.progress_interval_seconds
        return Outcome("Training", facts.attempt, None)
    conds.set(
        conditions.TRAINING,
        "False",
        conditions.STARTING,
        f"attempt {facts.attempt}: {len(running)}/{spec.distributed.nodes} pods running"
        f"{waiting_reasons(observed.pods)}",
    )
    decision.requeue_after = _SOON
    return Outcome("Initializing", facts.attempt, None)


# ---------------------------------------------------------------------------------- serving


def _serve(facts: Facts, adapter: Adapter, conds: Conditions, decision: Decision) -> Endpoint:
    """Keep the serving Deployment, Service and nodes as the spec says; set ServingReady from the Deployment."""
    observed, target = facts.observed, facts.target
    serving = target.spec.serving
    if uses_karpenter(observed.job) and observed.karpenter_installed:
        # The server's own pool: its instance type, at most (dynamic) or exactly (static) its replicas.
        _apply_pool(observed, build_serving_node_pool(target), decision)
    decision.apply += [build_serving_deployment(target, adapter.uri), build_serving_service(target)]
    endpoint = Endpoint(url=endpoint_url(target), model_name=serving_model_name(target))
    status = (observed.deployment or {}).get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    if serving.replicas == 0:
        conds.set(conditions.SERVING_READY, "False", conditions.SCALED_TO_ZERO, "serving.replicas is 0")
    elif ready > 0:
        conds.set(
            conditions.SERVING_READY,
            "True",
            conditions.SERVING,
            f"{ready}/{serving.replicas} replicas ready; model {endpoint.model_name} at {endpoint.url}",
        )
    else:
        conds.set(
            conditions.SERVING_READY,
            "False",
            conditions.SERVING_STARTING,
            f"0/{serving.replicas} replicas ready"
            f"{serving_claims_note(observed.serving_claims)}{_karpenter_note(facts)}"
            f"{waiting_reasons(observed.serving_pods)}",
        )
        decision.requeue_after = _SOON
    return endpoint


def _serve_shared(facts: Facts, conds: Conditions, decision: Decision) -> Endpoint | None:
    """Served by a ModelServer: ServingReady from the server's status, which its own pass derives from its replicas."""
    observed, target = facts.observed, facts.target
    server_name = target.spec.serving.server
    if observed.deployment is not None or has_pool(observed, names.ROLE_SERVER):
        _stop_serving(facts, decision)  # switched from a server of its own
    server = _model_server(observed.model_server)
    if server is None:
        conds.set(
            conditions.SERVING_READY,
            "False",
            conditions.SERVER_NOT_FOUND,
            f"ModelServer {server_name} not found in namespace {target.namespace}: create it, "
            "or remove serving.server to get a server of the job's own",
        )
        decision.requeue_after = _SOON
        return None
    endpoint = Endpoint(url=server_url(server), model_name=serving_model_name(target))
    status = server.status or ModelServerStatus()
    entry = next((a for a in status.adapters if a.job == target.name), None)
    if entry is not None and entry.loaded_replicas > 0:
        conds.set(
            conditions.SERVING_READY,
            "True",
            conditions.SERVING,
            f"loaded on {entry.loaded_replicas}/{status.ready_replicas} replicas of ModelServer {server.name}; "
            f"model {endpoint.model_name} at {endpoint.url}",
        )
    elif entry is not None and entry.message and status.ready_replicas:
        conds.set(conditions.SERVING_READY, "False", conditions.ADAPTER_REFUSED, entry.message)
        decision.requeue_after = _SOON
    else:
        conds.set(
            conditions.SERVING_READY,
            "False",
            conditions.ADAPTER_LOADING,
            f"waiting for ModelServer {server.name} to load the adapter "
            f"({status.ready_replicas}/{server.spec.replicas} replicas ready)",
        )
        decision.requeue_after = _SOON
    return endpoint


def _model_server(obj: Obj | None) -> ModelServer | None:
    if obj is None:
        return None
    try:
        return ModelServer.model_validate(obj, by_alias=True, by_name=False)
    except ValidationError:
        return None


def _karpenter_note(facts: Facts) -> str:
    """Karpenter's latest Warning about the server's NodePool or its claims, if any."""
    warning = karpenter_warning(facts.observed.karpenter_events, serving_pool_name(facts.target), facts.observed.now)
    return f"; Karpenter: {warning}" if warning else ""


def _was_serving(conds: Conditions) -> bool:
    ready = conds.get(conditions.SERVING_READY)
    return ready is not None and ready.reason != conditions.SERVING_DISABLED


def _stop_serving(facts: Facts, decision: Decision) -> None:
    """Remove the serving Deployment, Service and nodes (serving turned off, or the job failed)."""
    namespace, name = facts.target.namespace, names.serving(facts.target.name)
    decision.delete += [("apps/v1", "Deployment", namespace, name), ("v1", "Service", namespace, name)]
    if has_pool(facts.observed, names.ROLE_SERVER):
        decision.delete.append((KARPENTER_API_VERSION, NODE_POOL_KIND, None, serving_pool_name(facts.target)))


# ----------------------------------------------------------------------------------- status


def _status(facts: Facts, outcome: Outcome, conds: Conditions) -> FineTuneJobStatus:
    """The status, recomputed from the observations and the phase's outcome."""
    observed, previous = facts.observed, facts.previous
    progress = observed.progress or previous.progress
    if facts.trained and progress is not None:
        # The last read may predate the last steps: a succeeded Job ran all of them.
        final_step = progress.total_steps or progress.step
        progress = progress.model_copy(update={"percent": 100, "eta_seconds": 0, "step": final_step})
    first = facts.jobs[0] if facts.jobs else None
    return FineTuneJobStatus(
        phase=outcome.phase,
        observed_generation=observed.generation,
        conditions=conds.items,
        preflight=facts.preflight.findings,
        progress=progress,
        workload=Workload(
            job_name=(
                names.training_job(observed.job.name, outcome.attempt)
                if facts.jobs or outcome.phase == "Initializing"
                else None
            ),
            attempt=outcome.attempt,
            node_claims=sorted(c["metadata"]["name"] for c in observed.node_claims) if not facts.release else [],
            nodes=sorted({p["spec"]["nodeName"] for p in observed.pods if p.get("spec", {}).get("nodeName")}),
        ),
        restarts=outcome.attempt,  # every attempt after the first is a gang restart
        adapter=outcome.adapter,
        endpoint=outcome.endpoint,
        start_time=parse_time((first or {}).get("status", {}).get("startTime")) or previous.start_time,
        completion_time=_completion_time(facts),
    )


def _completion_time(facts: Facts) -> datetime.datetime | None:
    """When the job ended: kept once recorded, else the last Job's completion time, else now."""
    if not facts.terminal:
        return None
    observed = facts.observed
    last = observed.publish_job if facts.publish_state else facts.current
    moment = parse_time((last or {}).get("status", {}).get("completionTime")) or observed.now.replace(microsecond=0)
    return facts.previous.completion_time or moment
