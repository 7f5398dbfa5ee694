"""What a pass observes of one FineTuneJob, and the pure readers of those raw objects.

:class:`Observed` holds the children found by label, as the API returns them. The readers here
turn them into facts (a Job's state, the attempt, node readiness, a pod's failure or waiting
message, the publish result), and the ``reads_*`` rules say which objects a pass needs to read at
all, so that the controller only fetches.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Final, Literal

from kubetune_api.instances import instance_shape
from kubetune_api.objects import Obj, now, parse_time
from kubetune_api.resource import Adapter, FineTuneJob, Progress
from kubetune_operator import conditions, names

JobState = Literal["Pending", "Suspended", "Running", "Succeeded", "FailedPermanent", "FailedRetryable"]
#: Job failure reasons that restarting cannot fix.
_PERMANENT_JOB_REASONS: Final = frozenset({"PodFailurePolicy", "DeadlineExceeded"})


@dataclass(frozen=True)
class Observed:
    """What the cluster holds for one FineTuneJob (raw objects as the API returns them)."""

    job: FineTuneJob
    generation: int
    uid: str
    node_pools: list[Obj] = field(default_factory=list)
    """The job's Karpenter NodePools (training and serving) that exist."""
    node_claims: list[Obj] = field(default_factory=list)
    """The NodeClaims of the training NodePool."""
    karpenter_events: list[Obj] = field(default_factory=list)
    """Karpenter's Warning events about NodePools and NodeClaims (read while the job waits for nodes)."""
    nodes: list[Obj] = field(default_factory=list)
    """Nodes of the job's pools (karpenter) or every node (byo)."""
    karpenter_installed: bool = True
    training_jobs: list[Obj] = field(default_factory=list)
    pods: list[Obj] = field(default_factory=list)
    """Pods of the current attempt."""
    progress: Progress | None = None
    """Freshly read from the rank-0 trainer, when it was read."""
    preflight_job: Obj | None = None
    """The pre-flight Job, when it exists."""
    preflight_pods: list[Obj] = field(default_factory=list)
    """Its pods, while its findings are not recorded on it yet."""
    publish_job: Obj | None = None
    publish_pods: list[Obj] = field(default_factory=list)
    serving_claims: list[Obj] = field(default_factory=list)
    """NodeClaims of the serving NodePool (karpenter)."""
    deployment: Obj | None = None
    """The serving Deployment, when it exists."""
    serving_pods: list[Obj] = field(default_factory=list)
    model_server: Obj | None = None
    """The ModelServer named by serving.server, when it exists (read while the job serves through it)."""
    workload: Obj | None = None
    """Kueue's Workload of the current attempt's Job (runPolicy.queueName), when Kueue made one."""
    now: datetime.datetime = field(default_factory=now)


# ------------------------------------------------------------------------- what to read


def uses_karpenter(job: FineTuneJob) -> bool:
    return job.spec.resources.provisioner == "karpenter"


def node_labels(job: FineTuneJob, uid: str) -> str | None:
    """The label selector of the nodes to read: the nodes of the job's pools (karpenter), or every node (byo)."""
    return f"{names.UID_LABEL}={uid}" if uses_karpenter(job) else None


def role_of(obj: Obj) -> str | None:
    role: str | None = (obj["metadata"].get("labels") or {}).get(names.ROLE_LABEL)
    return role


def claims_selector(namespace: str, job: str) -> str:
    """The label selector of the NodeClaims Karpenter made for the job's pools (it labels each with its pool)."""
    pools = sorted(names.node_pool(namespace, job, role) for role in (names.ROLE_TRAINER, names.ROLE_SERVER))
    return f"{names.NODEPOOL_LABEL} in ({','.join(pools)})"


def waits_for_nodes(job: FineTuneJob, pools: list[Obj], claims: list[Obj]) -> bool:
    """Whether one of the job's NodePools exists with fewer Ready claims than it wants (Karpenter's events then say why)."""
    wanted = {
        names.node_pool(job.namespace, job.name, names.ROLE_TRAINER): job.spec.distributed.nodes,
        names.node_pool(job.namespace, job.name, names.ROLE_SERVER): job.spec.serving.replicas,
    }
    for pool in pools:
        name = pool["metadata"]["name"]
        ready = [c for c in claims if pool_of(c) == name and conditions_of(c).get("Ready", {}).get("status") == "True"]
        if name in wanted and len(ready) < wanted[name]:
            return True
    return False


def pool_of(obj: Obj) -> str | None:
    pool: str | None = (obj["metadata"].get("labels") or {}).get(names.NODEPOOL_LABEL)
    return pool


def training_claims(claims: list[Obj], namespace: str, job: str) -> list[Obj]:
    pool = names.node_pool(namespace, job, names.ROLE_TRAINER)
    return [c for c in claims if pool_of(c) == pool]


def serving_claims(claims: list[Obj], namespace: str, job: str) -> list[Obj]:
    pool = names.node_pool(namespace, job, names.ROLE_SERVER)
    return [c for c in claims if pool_of(c) == pool]


def has_pool(observed: Observed, role: str) -> bool:
    """Whether the job's NodePool of ``role`` exists (and is not being deleted)."""
    name = names.node_pool(observed.job.namespace, observed.job.name, role)
    return any(
        p["metadata"]["name"] == name and not p["metadata"].get("deletionTimestamp") for p in observed.node_pools
    )


def training_jobs(jobs: list[Obj]) -> list[Obj]:
    return [j for j in jobs if role_of(j) not in (names.ROLE_PUBLISH, names.ROLE_PREFLIGHT)]


def preflight_job(jobs: list[Obj]) -> Obj | None:
    return next((j for j in jobs if role_of(j) == names.ROLE_PREFLIGHT), None)


def reads_preflight_pods(preflight: Obj | None) -> bool:
    """The pre-flight pods carry its findings (read once, then recorded on its Job) or why it failed."""
    return preflight is not None and not (
        recorded_findings(preflight) is not None and job_state(preflight) == "Succeeded"
    )


def recorded_findings(preflight: Obj | None) -> Obj | None:
    """The pre-flight's findings recorded on its Job (names.RESULT_ANNOTATION), once read from its pod."""
    text = ((preflight or {}).get("metadata", {}).get("annotations") or {}).get(names.RESULT_ANNOTATION)
    return _findings(text) if text else None


def findings_annotation(findings: Obj) -> Obj:
    """The merge patch that records the pre-flight's ``findings`` on its Job."""
    text = json.dumps(findings, separators=(",", ":"), sort_keys=True)
    return {"metadata": {"annotations": {names.RESULT_ANNOTATION: text}}}


def _findings(text: str) -> Obj | None:
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return found if isinstance(found, dict) and isinstance(found.get("records"), int) else None


def preflight_findings(pods: list[Obj]) -> Obj | None:
    """The findings the pre-flight container left as the last line of its termination message."""
    return next((found for line in _last_lines(pods) if (found := _findings(line)) is not None), None)


def _last_lines(pods: list[Obj]) -> list[str]:
    """The last line of the termination message of each container that exited 0."""
    lines = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            message = str(terminated.get("message") or "").strip().splitlines()
            if terminated.get("exitCode") == 0 and message:
                lines.append(message[-1])
    return lines


def publish_job(jobs: list[Obj]) -> Obj | None:
    return next((j for j in jobs if role_of(j) == names.ROLE_PUBLISH), None)


def current_attempt(jobs: list[Obj]) -> int:
    """The attempt of the newest training Job (0 without one): its pods are the ones to read."""
    return max((attempt_of(j) for j in jobs), default=0)


def reads_publish_pods(publish: Obj | None) -> bool:
    """The publish pods carry its result (read once, then recorded on the publish Job) or its failure message."""
    return publish is not None and not (recorded_result(publish) is not None and job_state(publish) == "Succeeded")


def recorded_result(publish: Obj | None) -> Adapter | None:
    """The result recorded on the publish Job (names.RESULT_ANNOTATION), once read from its pod."""
    text = ((publish or {}).get("metadata", {}).get("annotations") or {}).get(names.RESULT_ANNOTATION)
    return _adapter(text) if text else None


def result_annotation(adapter: Adapter) -> Obj:
    """The merge patch that records ``adapter`` on the publish Job."""
    text = adapter.model_dump_json(by_alias=True, exclude_none=True)
    return {"metadata": {"annotations": {names.RESULT_ANNOTATION: text}}}


def _adapter(text: str) -> Adapter | None:
    try:
        result: Obj = json.loads(text)
        return Adapter(
            uri=result["uri"],
            digest=result.get("digest"),
            size_bytes=result.get("sizeBytes"),
            merged_uri=result.get("mergedUri"),
        )
    except (ValueError, TypeError, KeyError):
        return None


#: Kueue's API versions, newest first: v1beta2 from Kueue 0.15, v1beta1 before.
KUEUE_API_VERSIONS: Final = ("kueue.x-k8s.io/v1beta2", "kueue.x-k8s.io/v1beta1")
#: Kueue's label on a Workload: the uid of the Job it admits.
KUEUE_JOB_UID_LABEL: Final = "kueue.x-k8s.io/job-uid"


def not_admitted(job: FineTuneJob, current: Obj | None) -> bool:
    """Whether a queued job's attempt is not admitted (no Job yet, or suspended): it may hold no node then."""
    return bool(job.spec.run_policy.queue_name) and (current is None or job_state(current) == "Suspended")


def reads_workload(job: FineTuneJob, current: Obj | None) -> bool:
    """Kueue's Workload says why a queued attempt waits, or that it was evicted."""
    return current is not None and not_admitted(job, current)


def waits_in_queue(job: FineTuneJob, current: Obj | None) -> bool:
    """Whether the job waits for Kueue: queued, and its attempt's Job not created yet or suspended by Kueue.

    Kueue admits a Job by unsuspending it and evicts one by suspending it again; until then nothing
    that costs money (a NodePool, a node) exists for the job. runPolicy.suspend is the user's own.
    """
    return not job.spec.run_policy.suspend and not_admitted(job, current)


def kueue_reason(workload: Obj | None) -> str:
    """Why Kueue has not admitted the Workload, in Kueue's words (its conditions), or that it has none yet."""
    if workload is None:
        return "Kueue has not made a Workload for it yet (is Kueue running, and the LocalQueue there?)"
    found = conditions_of(workload)
    evicted = found.get("Evicted")
    if evicted and evicted.get("status") == "True":
        return f"evicted by Kueue ({evicted.get('reason')}: {evicted.get('message', '')}); resumes from its last checkpoint when admitted again"
    for kind in ("QuotaReserved", "Admitted"):
        condition = found.get(kind)
        if condition and condition.get("status") == "False" and condition.get("message"):
            return f"{kind} False, {condition.get('reason')}: {condition['message']}"
    return "waiting for Kueue to reserve quota"


def reads_serving(job: FineTuneJob, publish: Obj | None) -> bool:
    """A server exists only once the adapter is published, or while the job still says Serving."""
    return (job.spec.serving.enabled and publish is not None) or bool(job.status and job.status.phase == "Serving")


def reads_serving_pods(deployment: Obj | None) -> bool:
    """The serving pods say why a Deployment has no ready replica."""
    return deployment is not None and not (deployment.get("status") or {}).get("readyReplicas")


def rank_zero(pods: list[Obj]) -> Obj | None:
    """The running rank-0 trainer pod with an IP, whose metrics give the progress."""
    return next(
        (
            p
            for p in pods
            if p["metadata"].get("annotations", {}).get("batch.kubernetes.io/job-completion-index") == "0"
            and (p.get("status") or {}).get("phase") == "Running"
            and (p.get("status") or {}).get("podIP")
        ),
        None,
    )


# ------------------------------------------------------------------------------ readers


def conditions_of(obj: Obj) -> dict[str, Obj]:
    """An object's status conditions by type."""
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def attempt_of(job: Obj) -> int:
    return int(job["metadata"].get("labels", {}).get(names.ATTEMPT_LABEL, "0"))


def job_state(job: Obj) -> JobState:
    conds = conditions_of(job)
    if conds.get("Complete", {}).get("status") == "True" or conds.get("SuccessCriteriaMet", {}).get("status") == "True":
        return "Succeeded"
    failed = conds.get("Failed") or conds.get("FailureTarget")
    if failed and failed.get("status") == "True":
        return "FailedPermanent" if failed.get("reason") in _PERMANENT_JOB_REASONS else "FailedRetryable"
    if job["spec"].get("suspend"):
        return "Suspended"
    status = job.get("status") or {}
    return "Running" if status.get("active") or status.get("ready") else "Pending"


def in_phase(pods: list[Obj], phase: str) -> list[Obj]:
    return [p for p in pods if (p.get("status") or {}).get("phase") == phase]


def failure_message(pods: list[Obj]) -> str:
    """The first termination message of a failed container, for the Failed condition."""
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if terminated.get("exitCode", 0) != 0:
                message = str(terminated.get("message") or "").strip()
                where = f"pod {pod['metadata']['name']} exited with code {terminated['exitCode']}"
                return f"{where}: {message}" if message else where
    return ""


def publish_result(pods: list[Obj]) -> Adapter | None:
    """The URI, digest and size the publish container left in its termination message."""
    return next((adapter for line in _last_lines(pods) if (adapter := _adapter(line)) is not None), None)


def waiting_reasons(pods: list[Obj]) -> str:
    """Why pods are not running yet, as '; pod: reason: message' (a missing ConfigMap, Secret or claim, say).

    A container waiting with a message (CreateContainerConfigError, a volume source not found) and
    a pod the scheduler cannot place (a PersistentVolumeClaim that does not exist) both say why;
    at most three reasons are quoted.
    """
    reasons = []
    for pod in pods:
        status = pod.get("status") or {}
        scheduled = conditions_of(pod).get("PodScheduled") or {}
        if scheduled.get("status") == "False" and scheduled.get("message"):
            reasons.append(f"pod {pod['metadata']['name']}: {scheduled.get('reason')}: {scheduled['message']}")
            continue
        for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("message"):
                reasons.append(f"pod {pod['metadata']['name']}: {waiting.get('reason')}: {waiting['message']}")
                break
    return "; " + "; ".join(reasons[:3]) if reasons else ""


#: The reason of a condition that Karpenter has not looked at yet: nothing to report.
_NOT_YET: Final = frozenset({"", "AwaitingReconciliation"})


def launch_failure(claim: Obj) -> str | None:
    """Why Karpenter cannot launch ``claim``: its Launched condition, not True, with a reason of Karpenter's.

    Real Karpenter keeps a claim whose cloud call failed (quota, an unknown type, no offering) with
    Launched Unknown (False with some providers) and the cloud's reason and message, and retries it.
    """
    launched = conditions_of(claim).get("Launched")
    if not launched or launched.get("status") == "True" or claim["metadata"].get("deletionTimestamp"):
        return None
    reason = str(launched.get("reason") or "")
    if reason in _NOT_YET:
        return None
    message = str(launched.get("message") or "")
    return f"{reason}: {message}" if message else reason


#: The conditions of a NodePool that say why Karpenter will not launch its nodes (Ready sums them up).
_POOL_CONDITIONS: Final = ("ValidationSucceeded", "NodeClassReady", "NodeRegistrationHealthy", "Ready")
#: How old a Karpenter Warning event may be and still say why nodes are missing now.
EVENT_WINDOW: Final = datetime.timedelta(minutes=2)


def pool_failure(pool: Obj) -> str | None:
    """Why Karpenter will not launch nodes for ``pool``: the first of its conditions that is False, quoted."""
    found = conditions_of(pool)
    for kind in _POOL_CONDITIONS:
        condition = found.get(kind)
        if condition and condition.get("status") == "False":
            reason, message = condition.get("reason") or kind, condition.get("message") or ""
            return f"{kind} False, {reason}: {message}" if message else f"{kind} False, {reason}"
    return None


def karpenter_warning(events: list[Obj], pool: str, at: datetime.datetime) -> str | None:
    """The latest of Karpenter's Warning events about ``pool`` or its claims within :data:`EVENT_WINDOW` of ``at``.

    Karpenter deletes a claim it cannot launch for lack of capacity (InsufficientCapacityError, on
    the claim) and tries again, and says on the pool when its requirements leave no instance type
    (NoCompatibleInstanceTypes); neither stays in a condition, only in these events.
    """
    recent: list[tuple[datetime.datetime, str]] = []
    for event in events:
        involved = event.get("involved_object") or event.get("involvedObject") or {}
        name = str(involved.get("name") or "")
        if involved.get("kind") not in ("NodePool", "NodeClaim") or not (name == pool or name.startswith(f"{pool}-")):
            continue
        when = _event_time(event)
        if when is None or at - when > EVENT_WINDOW:
            continue
        recent.append((when, f"{event.get('reason')}: {event.get('message') or ''}".rstrip(": ")))
    return max(recent)[1] if recent else None


def _event_time(event: Obj) -> datetime.datetime | None:
    for key in ("last_timestamp", "lastTimestamp", "event_time", "eventTime"):
        value = event.get(key)
        if value:
            return value if isinstance(value, datetime.datetime) else parse_time(str(value))
    created = (event.get("metadata") or {}).get("creation_timestamp") or (event.get("metadata") or {}).get(
        "creationTimestamp"
    )
    if created:
        return created if isinstance(created, datetime.datetime) else parse_time(str(created))
    return None


def serving_claims_note(claims: list[Obj]) -> str:
    """What holds the serving NodeClaims up: their launch failures, else how many are not ready."""
    pending = [c for c in claims if conditions_of(c).get("Ready", {}).get("status") != "True"]
    failed = [
        f"NodeClaim {c['metadata']['name']}: {failure}" for c in claims if (failure := launch_failure(c)) is not None
    ]
    if failed:
        return "; " + "; ".join(failed)
    if pending:
        return f"; {len(pending)} serving node(s) not ready yet"
    return ""


def orphans(children: list[Obj], jobs: list[Obj], namespaces: tuple[str, ...] = ()) -> list[Obj]:
    """The cluster-scoped ``children`` whose FineTuneJob is not among ``jobs``.

    A child names its job by the namespace and job labels and, where it has one, the job's uid
    label: a job deleted and created again under the same name is another job. Children of
    namespaces outside ``namespaces`` (when given) belong to another operator's scope, and those
    being deleted already are left alone.
    """
    alive = {(j["metadata"]["namespace"], j["metadata"]["name"], j["metadata"]["uid"]) for j in jobs}
    alive_names = {(namespace, name) for namespace, name, _ in alive}
    found: list[Obj] = []
    for child in children:
        meta = child["metadata"]
        labels = meta.get("labels") or {}
        namespace, name, uid = (
            labels.get(names.NAMESPACE_LABEL),
            labels.get(names.JOB_LABEL),
            labels.get(names.UID_LABEL),
        )
        if not namespace or not name or meta.get("deletionTimestamp"):
            continue
        if namespaces and namespace not in namespaces:
            continue
        exists = (namespace, name, uid) in alive if uid else (namespace, name) in alive_names
        if not exists:
            found.append(child)
    return found


# -------------------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class NodeReadiness:
    ready: bool
    reason: str
    message: str
    gpus_per_node: int
    node_names: list[str]


def _node_ready(node: Obj) -> bool:
    ready = conditions_of(node).get("Ready", {}).get("status") == "True"
    return ready and not node.get("spec", {}).get("unschedulable", False)


def _gpus(node: Obj, resource: str) -> int:
    value = ((node.get("status") or {}).get("allocatable") or {}).get(resource, "0")
    return int(str(value)) if str(value).isdigit() else 0


def node_readiness(observed: Observed) -> NodeReadiness:
    """Whether the job's nodes are ready, and the GPUs each training pod gets."""
    return _karpenter_nodes(observed) if uses_karpenter(observed.job) else _byo_nodes(observed)


def planned_gpus(observed: Observed, ready_nodes: list[Obj]) -> int:
    """GPUs per training pod with provisioner karpenter: resources.gpusPerNode, else every GPU of the instance
    type (kubetune's table), else the fewest of the ready nodes, else 1 (a dynamic pool's pods come first)."""
    spec = observed.job.spec.resources
    if spec.gpus_per_node is not None:
        return spec.gpus_per_node
    shape = instance_shape(spec.instance_type)
    if shape is not None:
        return shape.gpus
    return min((_gpus(n, spec.gpu_resource_name) for n in ready_nodes), default=1)


def _karpenter_nodes(observed: Observed) -> NodeReadiness:
    spec = observed.job.spec
    wanted = spec.distributed.nodes
    gpu = spec.resources.gpu_resource_name
    pool = names.node_pool(observed.job.namespace, observed.job.name, names.ROLE_TRAINER)
    if not observed.karpenter_installed:
        return NodeReadiness(
            False,
            conditions.KARPENTER_MISSING,
            "provisioner karpenter needs Karpenter's NodePool and NodeClaim CRDs (karpenter.sh/v1), which are not "
            "installed; install Karpenter or use resources.provisioner: byo",
            0,
            [],
        )
    what = f"NodePool {pool} ({spec.resources.instance_type}, {spec.resources.capacity_type})"
    for claim in observed.node_claims:
        failure = launch_failure(claim)
        if failure is not None:
            return NodeReadiness(
                False,
                conditions.NODE_CLAIM_FAILED,
                f"NodeClaim {claim['metadata']['name']} of {what} cannot launch: {failure}",
                planned_gpus(observed, []),
                [],
            )
    for existing in observed.node_pools:
        failure = pool_failure(existing) if existing["metadata"]["name"] == pool else None
        if failure is not None:
            return NodeReadiness(
                False, conditions.NODE_POOL_NOT_READY, f"{what} is not ready: {failure}", planned_gpus(observed, []), []
            )
    ready_claims = [c for c in observed.node_claims if conditions_of(c).get("Ready", {}).get("status") == "True"]
    nodes = {n["metadata"]["name"]: n for n in observed.nodes}
    ready_nodes = [
        nodes[c["status"]["nodeName"]]
        for c in ready_claims
        if c.get("status", {}).get("nodeName") in nodes and _node_ready(nodes[c["status"]["nodeName"]])
    ]
    gpus = planned_gpus(observed, ready_nodes)
    with_gpus = [n for n in ready_nodes if _gpus(n, gpu) >= gpus]
    if len(with_gpus) < wanted:
        warning = karpenter_warning(observed.karpenter_events, pool, observed.now)
        if warning is not None:
            return NodeReadiness(
                False,
                conditions.NODE_CLAIM_FAILED,
                f"Karpenter cannot launch nodes of {what} ({len(with_gpus)} of {wanted} ready): {warning}",
                gpus,
                [],
            )
        return NodeReadiness(
            False,
            conditions.WAITING_FOR_NODES,
            f"waiting for {wanted} nodes of {spec.resources.instance_type} from NodePool {pool} "
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
