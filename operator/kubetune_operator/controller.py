"""One reconcile pass for one FineTuneJob: observe the cluster, decide, act.

The decision itself is :func:`kubetune_operator.reconcile.decide` (pure), and what to read is
ruled in :mod:`kubetune_operator.observed`; this module fetches through
:class:`~kubetune_operator.kube.Kube`, carries out the answer, and remembers a little per job
(:class:`JobMemory`) between passes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kubetune_api import InvalidManifestError
from kubetune_api.modelserver import MS_KIND
from kubetune_api.objects import Obj, parse_time
from kubetune_api.resource import API_VERSION, KIND, PHASES, FineTuneJob, FineTuneJobStatus, Progress, load_job
from kubetune_operator import conditions, metrics, names, progress
from kubetune_operator.children.nodes import (
    CLUSTER_SCOPED_CHILDREN,
    KARPENTER_API_VERSION,
    NODE_CLAIM_KIND,
    NODE_POOL_KIND,
)
from kubetune_operator.decision import Decision
from kubetune_operator.kube import Kube, list_in
from kubetune_operator.observed import (
    KUEUE_API_VERSIONS,
    KUEUE_JOB_UID_LABEL,
    Observed,
    attempt_of,
    claims_selector,
    current_attempt,
    in_phase,
    job_state,
    node_labels,
    orphans,
    preflight_job,
    publish_job,
    rank_zero,
    reads_preflight_pods,
    reads_publish_pods,
    reads_serving,
    reads_serving_pods,
    reads_workload,
    serving_claims,
    training_claims,
    training_jobs,
    uses_karpenter,
    waits_for_nodes,
)
from kubetune_operator.reconcile import decide
from kubetune_operator.settings import OperatorSettings

log = logging.getLogger("kubetune.controller")


def merge_patch(before: Obj, after: Obj) -> Obj:
    """A JSON merge patch (RFC 7386) from ``before`` to ``after``: keys that are gone are set to null."""
    patch: Obj = {}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            nested = merge_patch(old, value)
            if nested:
                patch[key] = nested
        elif value != old:
            patch[key] = value
    patch.update((key, None) for key in before if key not in after)
    return patch


@dataclass
class JobMemory:
    """What the controller keeps about one job between passes (the fields under the controller's lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held by the job's pass in flight: one pass at a time per job."""
    scraped: tuple[float, Progress | None] | None = None
    """When rank 0's progress was last read (monotonic clock), and what it said."""
    phase: str | None = None
    """The phase this process decided last (the object's status can lag the controller's own write)."""
    restarts: int | None = None
    """The restarts this process decided last."""
    gpu_clock: float | None = None
    """When GPU-hours were last counted (monotonic clock)."""
    written: tuple[str, Obj] | None = None
    """The resourceVersion the last status write was based on, and the status written."""
    series: tuple[str, str, str, frozenset[str]] | None = None
    """The per-job gauges' labels last set: namespace, name, phase and the condition types."""

    def forget(self) -> None:
        self.scraped = self.phase = self.restarts = self.gpu_clock = self.written = None
        _drop_series(self.series)
        self.series = None


def _drop_series(series: tuple[str, str, str, frozenset[str]] | None) -> None:
    """Remove a job's per-job gauges (its phase, conditions and restarts)."""
    if series is None:
        return
    namespace, name, phase, kinds = series
    with contextlib.suppress(KeyError):
        metrics.JOB_PHASE.remove(namespace, name, phase)
    for kind in kinds:
        with contextlib.suppress(KeyError):
            metrics.JOB_CONDITION.remove(namespace, name, kind)
    with contextlib.suppress(KeyError):
        metrics.JOB_RESTARTS.remove(namespace, name)


class Controller:
    """Reconciles FineTuneJobs; safe to call concurrently for different jobs."""

    def __init__(self, kube: Kube, settings: OperatorSettings) -> None:
        self.kube = kube
        self.settings = settings
        self._jobs: dict[str, JobMemory] = {}
        self._nodes: dict[str, tuple[float, list[Obj]]] = {}
        self._writers = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="write")
        self._lock = threading.Lock()
        # One pass at a time per job (JobMemory.lock), and none once its deletion began: a pass in flight
        # when the job is deleted could otherwise create NodeClaims after the finalizer released them.
        self._deleted: set[str] = set()

    def _memory(self, uid: str) -> JobMemory:
        with self._lock:
            return self._jobs.setdefault(uid, JobMemory())

    def nodes(self, labels: str | None) -> list[Obj]:
        """Nodes (by label), cached for a second: many waiting jobs read the same few nodes."""
        key = labels or ""
        with self._lock:
            cached = self._nodes.get(key)
            if cached is not None and time.monotonic() - cached[0] < 1.0:
                return cached[1]
        found = self.kube.list("v1", "Node", labels=labels)
        with self._lock:
            self._nodes[key] = (time.monotonic(), found)
        return found

    # ---------------------------------------------------------------------------- observe

    def observe(self, obj: Obj, job: FineTuneJob) -> Observed:
        """Fetch what :mod:`~kubetune_operator.observed`'s rules say this pass needs."""
        meta = obj["metadata"]
        namespace, uid = meta["namespace"], meta["uid"]
        selector = names.selector(namespace, meta["name"])
        karpenter = uses_karpenter(job)
        installed = karpenter and self._karpenter_installed()
        pools = self.kube.list(KARPENTER_API_VERSION, NODE_POOL_KIND, labels=selector) if installed else []
        claims = (
            self.kube.list(KARPENTER_API_VERSION, NODE_CLAIM_KIND, labels=claims_selector(namespace, meta["name"]))
            if installed
            else []
        )
        nodes = self.nodes(node_labels(job, uid))
        events = self._karpenter_events() if installed and waits_for_nodes(job, pools, claims) else []
        children = self.kube.list("batch/v1", "Job", namespace=namespace, labels=selector)
        jobs, publish, preflight = training_jobs(children), publish_job(children), preflight_job(children)
        pods = (
            self.kube.list(
                "v1", "Pod", namespace=namespace, labels=f"{selector},{names.ATTEMPT_LABEL}={current_attempt(jobs)}"
            )
            if jobs
            else []
        )
        publish_pods = (
            self.kube.list(
                "v1", "Pod", namespace=namespace, labels=f"{selector},{names.ROLE_LABEL}={names.ROLE_PUBLISH}"
            )
            if reads_publish_pods(publish)
            else []
        )
        preflight_pods = (
            self.kube.list(
                "v1", "Pod", namespace=namespace, labels=f"{selector},{names.ROLE_LABEL}={names.ROLE_PREFLIGHT}"
            )
            if reads_preflight_pods(preflight)
            else []
        )
        current = max(jobs, key=attempt_of) if jobs else None
        workload = self._workload(namespace, current) if reads_workload(job, current) else None
        deployment = None
        serving_pods: list[Obj] = []
        model_server = None
        if reads_serving(job, publish) and job.spec.serving.server:
            found = self.kube.list(
                API_VERSION, MS_KIND, namespace=namespace, fields=f"metadata.name={job.spec.serving.server}"
            )
            model_server = found[0] if found else None
        if reads_serving(job, publish):
            found = self.kube.list("apps/v1", "Deployment", namespace=namespace, labels=selector)
            deployment = found[0] if found else None
            if reads_serving_pods(deployment):
                serving_pods = self.kube.list(
                    "v1", "Pod", namespace=namespace, labels=f"{selector},{names.ROLE_LABEL}={names.ROLE_SERVER}"
                )
        return Observed(
            job=job,
            generation=int(meta.get("generation", 1)),
            uid=uid,
            node_pools=pools,
            node_claims=training_claims(claims, namespace, meta["name"]),
            karpenter_events=events,
            nodes=nodes,
            karpenter_installed=installed or not karpenter,
            training_jobs=jobs,
            pods=pods,
            progress=self._progress(uid, pods),
            preflight_job=preflight,
            preflight_pods=preflight_pods,
            publish_job=publish,
            publish_pods=publish_pods,
            serving_claims=serving_claims(claims, namespace, meta["name"]),
            deployment=deployment,
            serving_pods=serving_pods,
            model_server=model_server,
            workload=workload,
        )

    def _workload(self, namespace: str, job: Obj | None) -> Obj | None:
        """Kueue's Workload of ``job`` (by Kueue's job-uid label), in the newest Kueue API the cluster serves."""
        if job is None:
            return None
        for api_version in KUEUE_API_VERSIONS:
            if self.kube.installed(api_version, "Workload"):
                labels = f"{KUEUE_JOB_UID_LABEL}={job['metadata']['uid']}"
                found = self.kube.list(api_version, "Workload", namespace=namespace, labels=labels)
                return found[0] if found else None
        return None

    def _karpenter_events(self) -> list[Obj]:
        """Karpenter's Warning events about NodePools and NodeClaims: cluster-scoped objects, so in ``default``."""
        return self.kube.list(
            "v1", "Event", namespace="default", fields=f"involvedObject.apiVersion={KARPENTER_API_VERSION},type=Warning"
        )

    def _karpenter_installed(self) -> bool:
        return self.kube.installed(KARPENTER_API_VERSION, NODE_POOL_KIND) and self.kube.installed(
            KARPENTER_API_VERSION, NODE_CLAIM_KIND
        )

    def _progress(self, uid: str, pods: list[Obj]) -> Progress | None:
        """Rank 0's progress, read at most every progress_interval_seconds per job."""
        rank0 = rank_zero(pods)
        if rank0 is None:
            return None
        memory = self._memory(uid)
        with self._lock:
            last = memory.scraped
            if last is not None and time.monotonic() - last[0] < self.settings.progress_interval_seconds:
                return last[1]
        sample = progress.scrape(rank0["status"]["podIP"], self.settings.trainer_metrics_port)
        with self._lock:
            memory.scraped = (time.monotonic(), sample)
        return sample

    # ------------------------------------------------------------------------------- act

    def act(self, obj: Obj, decision: Decision, previous: FineTuneJobStatus | None) -> None:
        # Children are independent of each other: write them concurrently (a launch is five writes).
        writes: list[Callable[[], object]] = [functools.partial(self.kube.create, m) for m in decision.create]
        writes += [functools.partial(self.kube.apply, m) for m in decision.apply]
        if len(writes) > 1:
            for future in [self._writers.submit(write) for write in writes]:
                future.result()
        elif writes:
            writes[0]()
        for target, patch in decision.patch:
            self.kube.merge_patch(target, patch)
        for api_version, kind, namespace, name in decision.delete:
            self.kube.delete(api_version, kind, name, namespace)
        status = decision.status.model_dump(mode="json", by_alias=True, exclude_none=True)
        before = previous.model_dump(mode="json", by_alias=True, exclude_none=True) if previous else None
        if status != before:
            meta = obj["metadata"]
            self.kube.write_status(meta["namespace"], meta["name"], merge_patch(before or {}, status))
            memory = self._memory(meta["uid"])
            with self._lock:
                # Until the watch delivers our own write, a pass would see the object as read here.
                memory.written = (meta.get("resourceVersion", ""), status)
        for event in decision.events:
            self.kube.event(obj, event.type, event.reason, event.message)

    # ------------------------------------------------------------------------- reconcile

    def reconcile(self, obj: Obj) -> Decision | None:
        """One pass for the FineTuneJob ``obj`` (as read from the API); none once its deletion began."""
        uid = obj["metadata"]["uid"]
        with self._memory(uid).lock:
            with self._lock:
                if uid in self._deleted:
                    return None
            return self._reconcile(obj)

    def _reconcile(self, obj: Obj) -> Decision | None:
        started = time.perf_counter()
        meta = obj["metadata"]
        memory = self._memory(meta["uid"])
        with self._lock:
            written = memory.written
        if written is not None and written[0] == meta.get("resourceVersion"):
            obj = {**obj, "status": written[1]}
        try:
            try:
                job = load_job(obj)
            except InvalidManifestError as exc:
                self._invalid(obj, exc)
                return None
            observed = self.observe(obj, job)
            decision = decide(observed, self.settings)
            self.act(obj, decision, job.status)
            self._measure(obj, observed, decision, job.status)
            return decision
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)

    def _measure(self, obj: Obj, observed: Observed, decision: Decision, previous: FineTuneJobStatus | None) -> None:
        """Phase gauge, provisioning latency, time to first step and GPU-hours."""
        meta = obj["metadata"]
        uid, status = meta["uid"], decision.status
        created = parse_time(meta["creationTimestamp"])
        assert created is not None, "the apiserver sets metadata.creationTimestamp"
        age = (observed.now - created).total_seconds()
        before = {c.type: c.status for c in (previous.conditions if previous else [])}
        after = {c.type: c.status for c in status.conditions}
        if after.get(conditions.NODES_READY) == "True" and before.get(conditions.NODES_READY) != "True":
            # Provisioning starts once the pre-flight passed (nothing is claimed before).
            passed = conditions.get(status.conditions, conditions.PREFLIGHT_PASSED)
            since = passed.last_transition_time if passed is not None and passed.status == "True" else created
            metrics.PROVISIONING_SECONDS.observe((observed.now - since).total_seconds())
        step_before = (previous.progress.step or 0) if previous and previous.progress else 0
        if status.progress and (status.progress.step or 0) > 0 and step_before == 0:
            metrics.FIRST_STEP_SECONDS.observe(age)
        memory = self._memory(uid)
        with self._lock:
            # What this process decided last beats the object's status, which can lag our own write.
            phase_before = memory.phase if memory.phase is not None else (previous.phase if previous else None)
            restarts_before = memory.restarts if memory.restarts is not None else (previous.restarts if previous else 0)
            memory.phase = status.phase
            memory.restarts = status.restarts
            counts: dict[str, int] = dict.fromkeys(PHASES, 0)
            for remembered in self._jobs.values():
                if remembered.phase is not None:
                    counts[remembered.phase] += 1
            now = time.monotonic()
            last = memory.gpu_clock
            memory.gpu_clock = now
        for phase, count in counts.items():
            metrics.JOBS_BY_PHASE.labels(phase=phase).set(count)
        self._per_job(memory, meta, status)
        if phase_before is None:
            metrics.JOBS_CREATED.inc()
        if status.phase != phase_before and status.phase in ("Complete", "Failed"):
            (metrics.JOBS_SUCCEEDED if status.phase == "Complete" else metrics.JOBS_FAILED).inc()
        if status.restarts > restarts_before:
            metrics.JOBS_RESTARTED.inc(status.restarts - restarts_before)
        if status.phase == "Training" and last is not None:
            gpus = sum(
                int((c.get("resources") or {}).get("limits", {}).get(observed.job.spec.resources.gpu_resource_name, 0))
                for p in in_phase(observed.pods, "Running")
                for c in p["spec"]["containers"]
            )
            metrics.GPU_SECONDS.labels(namespace=meta["namespace"]).inc(gpus * (now - last))

    def _per_job(self, memory: JobMemory, meta: Obj, status: FineTuneJobStatus) -> None:
        """The job's own series: its phase, its conditions and its restarts (the alert rules' inputs)."""
        namespace, name = meta["namespace"], meta["name"]
        series = (namespace, name, status.phase, frozenset(c.type for c in status.conditions))
        with self._lock:
            before, memory.series = memory.series, series
        if before is not None and before[2] != status.phase:
            with contextlib.suppress(KeyError):
                metrics.JOB_PHASE.remove(namespace, name, before[2])
        metrics.JOB_PHASE.labels(namespace=namespace, finetunejob=name, phase=status.phase).set(1)
        for condition in status.conditions:
            value = 1 if condition.status == "True" else 0
            metrics.JOB_CONDITION.labels(namespace=namespace, finetunejob=name, condition=condition.type).set(value)
        metrics.JOB_RESTARTS.labels(namespace=namespace, finetunejob=name).set(status.restarts)

    def forget(self, uid: str) -> None:
        """Drop a deleted job from the in-memory gauges."""
        with self._lock:
            memory = self._jobs.get(uid)
            if memory is not None:
                memory.forget()

    def _invalid(self, obj: Obj, error: InvalidManifestError) -> None:
        """A job the models refuse (the CRD let it through, e.g. from an older version): Failed, with why."""
        message = "; ".join(str(p) for p in error.problems)
        failed = conditions.set_condition(
            [], conditions.FAILED, "True", conditions.INVALID_SPEC, message[:32000], generation=None
        )
        status = {
            "phase": "Failed",
            "conditions": [c.model_dump(mode="json", by_alias=True, exclude_none=True) for c in failed],
        }
        self.kube.write_status(obj["metadata"]["namespace"], obj["metadata"]["name"], status)

    def release(self, namespace: str, name: str, uid: str) -> int:
        """Delete the job's NodePools (cluster-scoped: no owner reference reaches them); return how many of them
        and of their NodeClaims remain.

        Karpenter drains and deletes the pools' nodes and claims; the finalizer waits until none is
        left. Waits for a pass of the job in flight and stops later ones first, so that nothing
        applies a pool after this ran.
        """
        with self._lock:
            self._deleted.add(uid)
        with self._memory(uid).lock:
            pass
        with self._lock:
            gone = self._jobs.pop(uid, None)
        if gone is not None:
            _drop_series(gone.series)
        if not self._karpenter_installed():
            return 0
        selector = names.selector(namespace, name)
        pools = self.kube.list(KARPENTER_API_VERSION, NODE_POOL_KIND, labels=selector)
        # The claims carry the pools' template labels, the job's among them.
        claims = self.kube.list(KARPENTER_API_VERSION, NODE_CLAIM_KIND, labels=selector)
        if pools or claims:
            self._stop_gang(namespace, selector)
        for pool in pools:
            if not pool["metadata"].get("deletionTimestamp"):
                self.kube.delete(KARPENTER_API_VERSION, NODE_POOL_KIND, pool["metadata"]["name"])
        remaining = self.kube.list(KARPENTER_API_VERSION, NODE_POOL_KIND, labels=selector) if pools else []
        return len(remaining) + len(claims)

    def _stop_gang(self, namespace: str, selector: str) -> None:
        """Suspend the job's running Jobs, whose pods carry karpenter.sh/do-not-disrupt.

        Karpenter never evicts such a pod while it runs, so a deleted pool's node would wait for it
        and the finalizer for the node; the pods go with the FineTuneJob only once the finalizer is
        done. Suspending the Jobs makes the Job controller delete their pods now (the Jobs themselves
        go with the FineTuneJob, by garbage collection).
        """
        for job in self.kube.list("batch/v1", "Job", namespace=namespace, labels=selector):
            if job_state(job) in ("Pending", "Running"):
                meta = {"name": job["metadata"]["name"], "namespace": namespace}
                ref: Obj = {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta}
                self.kube.merge_patch(ref, {"spec": {"suspend": True}})

    def sweep(self) -> int:
        """Delete the cluster-scoped children whose FineTuneJob is gone; return how many.

        The finalizer releases them when a job is deleted; a job whose finalizer was removed while
        no operator ran (by hand, or by a namespace's forced cleanup) leaves them behind with
        nothing to reach them. The operator sweeps at start-up and then every resync. The children
        are listed before the jobs: a child's job, created before it, is then in the list if it exists.
        """
        children: list[tuple[str, str, Obj]] = []
        for api_version, kind in CLUSTER_SCOPED_CHILDREN:
            if self.kube.installed(api_version, kind):
                found = self.kube.list(api_version, kind, labels=names.managed_selector())
                children += [(api_version, kind, child) for child in found]
        if not children:
            return 0
        namespaces = self.settings.namespaces
        jobs = list_in(self.kube, API_VERSION, KIND, namespaces)
        doomed = {id(child) for child in orphans([c for _, _, c in children], jobs, namespaces)}
        for api_version, kind, child in children:
            if id(child) in doomed:
                labels = child["metadata"].get("labels") or {}
                log.warning(
                    "deleting %s %s: its FineTuneJob %s/%s (uid %s) no longer exists",
                    kind,
                    child["metadata"]["name"],
                    labels.get(names.NAMESPACE_LABEL),
                    labels.get(names.JOB_LABEL),
                    labels.get(names.UID_LABEL),
                )
                self.kube.delete(api_version, kind, child["metadata"]["name"])
        return len(doomed)
