"""One reconcile pass for one FineTuneJob: observe the cluster, decide, act.

The decision itself is :func:`kubetune_operator.reconcile.decide` (pure); this module gathers
what it needs through :class:`~kubetune_operator.kube.Kube` and carries out its answer.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubetune_api import InvalidManifestError
from kubetune_api.resource import PHASES, FineTuneJob, FineTuneJobStatus, Progress, load_job
from kubetune_operator import conditions, metrics, names, progress
from kubetune_operator.kube import Kube
from kubetune_operator.reconcile import Decision, Observed, attempt_of, decide, job_state
from kubetune_operator.settings import OperatorSettings

Obj = dict[str, Any]
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


def _role(obj: Obj) -> str | None:
    role: str | None = (obj["metadata"].get("labels") or {}).get(names.ROLE_LABEL)
    return role


class Controller:
    """Reconciles FineTuneJobs; safe to call concurrently for different jobs."""

    def __init__(self, kube: Kube, settings: OperatorSettings) -> None:
        self.kube = kube
        self.settings = settings
        self._scraped: dict[str, tuple[float, Progress | None]] = {}
        self._phases: dict[str, str] = {}
        self._gpu_clock: dict[str, float] = {}
        self._restarts: dict[str, int] = {}
        self._nodes: dict[str, tuple[float, list[Obj]]] = {}
        self._written: dict[str, tuple[str, Obj]] = {}
        self._writers = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="write")
        self._lock = threading.Lock()
        # One pass at a time per job, and none once its deletion began: a pass in flight when the
        # job is deleted could otherwise create NodeClaims after the finalizer released them.
        self._passes: dict[str, threading.Lock] = {}
        self._deleted: set[str] = set()

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
        meta = obj["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        selector = names.selector(namespace, name)
        spec = job.spec
        karpenter = spec.resources.provisioner == "karpenter"
        installed = karpenter and self.kube.installed("karpenter.sh/v1", "NodeClaim")
        claims = self.kube.list("karpenter.sh/v1", "NodeClaim", labels=selector) if installed else []
        serving_claims = [c for c in claims if _role(c) == names.ROLE_SERVER]
        nodes = self.nodes(f"{names.UID_LABEL}={uid}" if karpenter else None)
        children = self.kube.list("batch/v1", "Job", namespace=namespace, labels=selector)
        jobs = [j for j in children if _role(j) != names.ROLE_PUBLISH]
        publish = next((j for j in children if _role(j) == names.ROLE_PUBLISH), None)
        attempt = max((attempt_of(j) for j in jobs), default=0)
        pods = (
            self.kube.list("v1", "Pod", namespace=namespace, labels=f"{selector},{names.ATTEMPT_LABEL}={attempt}")
            if jobs
            else []
        )
        # The publish pods carry its result (read once into status.adapter) or its failure message.
        recorded = job.status is not None and job.status.adapter is not None and job.status.adapter.digest is not None
        publish_pods = (
            self.kube.list(
                "v1", "Pod", namespace=namespace, labels=f"{selector},{names.ROLE_LABEL}={names.ROLE_PUBLISH}"
            )
            if publish is not None and not (recorded and job_state(publish) == "Succeeded")
            else []
        )
        deployment = None
        serving_pods: list[Obj] = []
        # A server exists only once the adapter is published, or while the job still says Serving.
        if (spec.serving.enabled and publish is not None) or (job.status and job.status.phase == "Serving"):
            found = self.kube.list("apps/v1", "Deployment", namespace=namespace, labels=selector)
            deployment = found[0] if found else None
            if deployment is not None and not (deployment.get("status") or {}).get("readyReplicas"):
                serving_pods = self.kube.list(
                    "v1", "Pod", namespace=namespace, labels=f"{selector},{names.ROLE_LABEL}={names.ROLE_SERVER}"
                )
        return Observed(
            job=job,
            generation=int(meta.get("generation", 1)),
            uid=uid,
            node_claims=[c for c in claims if _role(c) != names.ROLE_SERVER],
            nodes=nodes,
            karpenter_installed=installed or not karpenter,
            training_jobs=jobs,
            pods=pods,
            progress=self._progress(uid, pods),
            publish_job=publish,
            publish_pods=publish_pods,
            serving_claims=serving_claims,
            deployment=deployment,
            serving_pods=serving_pods,
        )

    def _progress(self, uid: str, pods: list[Obj]) -> Progress | None:
        """Rank 0's progress, read at most every progress_interval_seconds per job."""
        rank0 = next(
            (
                p
                for p in pods
                if p["metadata"].get("annotations", {}).get("batch.kubernetes.io/job-completion-index") == "0"
                and (p.get("status") or {}).get("phase") == "Running"
                and (p.get("status") or {}).get("podIP")
            ),
            None,
        )
        if rank0 is None:
            return None
        with self._lock:
            last = self._scraped.get(uid)
            if last is not None and time.monotonic() - last[0] < self.settings.progress_interval_seconds:
                return last[1]
        sample = progress.scrape(rank0["status"]["podIP"], self.settings.trainer_metrics_port)
        with self._lock:
            self._scraped[uid] = (time.monotonic(), sample)
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
            with self._lock:
                # Until the watch delivers our own write, a pass would see the object as read here.
                self._written[meta["uid"]] = (meta.get("resourceVersion", ""), status)
        for event in decision.events:
            self.kube.event(obj, event.type, event.reason, event.message)

    # ------------------------------------------------------------------------- reconcile

    def _pass_lock(self, uid: str) -> threading.Lock:
        with self._lock:
            return self._passes.setdefault(uid, threading.Lock())

    def reconcile(self, obj: Obj) -> Decision | None:
        """One pass for the FineTuneJob ``obj`` (as read from the API); none once its deletion began."""
        uid = obj["metadata"]["uid"]
        with self._pass_lock(uid):
            with self._lock:
                if uid in self._deleted:
                    return None
            return self._reconcile(obj)

    def _reconcile(self, obj: Obj) -> Decision | None:
        started = time.perf_counter()
        meta = obj["metadata"]
        with self._lock:
            written = self._written.get(meta["uid"])
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
        created = datetime.datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00"))
        age = (observed.now - created).total_seconds()
        before = {c.type: c.status for c in (previous.conditions if previous else [])}
        after = {c.type: c.status for c in status.conditions}
        if after.get(conditions.NODES_READY) == "True" and before.get(conditions.NODES_READY) != "True":
            metrics.PROVISIONING_SECONDS.observe(age)
        step_before = (previous.progress.step or 0) if previous and previous.progress else 0
        if status.progress and (status.progress.step or 0) > 0 and step_before == 0:
            metrics.FIRST_STEP_SECONDS.observe(age)
        with self._lock:
            # What this process decided last beats the object's status, which can lag our own write.
            phase_before = self._phases.get(uid, previous.phase if previous else None)
            restarts_before = self._restarts.get(uid, previous.restarts if previous else 0)
            self._phases[uid] = status.phase
            self._restarts[uid] = status.restarts
            counts: dict[str, int] = dict.fromkeys(PHASES, 0)
            for phase in self._phases.values():
                counts[phase] += 1
            now = time.monotonic()
            last = self._gpu_clock.get(uid)
            self._gpu_clock[uid] = now
        for phase, count in counts.items():
            metrics.JOBS_BY_PHASE.labels(phase=phase).set(count)
        if phase_before is None:
            metrics.JOBS_CREATED.inc()
        if status.phase != phase_before and status.phase in ("Complete", "Failed"):
            (metrics.JOBS_SUCCEEDED if status.phase == "Complete" else metrics.JOBS_FAILED).inc()
        if status.restarts > restarts_before:
            metrics.JOBS_RESTARTED.inc(status.restarts - restarts_before)
        if status.phase == "Training" and last is not None:
            running = [p for p in observed.pods if (p.get("status") or {}).get("phase") == "Running"]
            gpus = sum(
                int((c.get("resources") or {}).get("limits", {}).get(observed.job.spec.resources.gpu_resource_name, 0))
                for p in running
                for c in p["spec"]["containers"]
            )
            metrics.GPU_HOURS.labels(namespace=meta["namespace"]).inc(gpus * (now - last) / 3600)

    def forget(self, uid: str) -> None:
        """Drop a deleted job from the in-memory gauges."""
        with self._lock:
            self._phases.pop(uid, None)
            self._restarts.pop(uid, None)
            self._gpu_clock.pop(uid, None)
            self._scraped.pop(uid, None)
            self._written.pop(uid, None)

    def _invalid(self, obj: Obj, error: InvalidManifestError) -> None:
        """A job the models refuse (the CRD let it through, e.g. from an older version): Failed, with why."""
        message = "; ".join(str(p) for p in error.problems)
        status = {
            "phase": "Failed",
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "InvalidSpec",
                    "message": message[:32000],
                    "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            ],
        }
        self.kube.write_status(obj["metadata"]["namespace"], obj["metadata"]["name"], status)

    def release(self, namespace: str, name: str, uid: str) -> int:
        """Delete the job's NodeClaims (cluster-scoped: no owner reference reaches them); return how many remain.

        Waits for a pass of the job in flight and stops later ones first, so that nothing creates a
        claim after this ran.
        """
        with self._lock:
            self._deleted.add(uid)
        with self._pass_lock(uid):
            pass
        with self._lock:
            self._passes.pop(uid, None)
        if not self.kube.installed("karpenter.sh/v1", "NodeClaim"):
            return 0
        claims = self.kube.list("karpenter.sh/v1", "NodeClaim", labels=names.selector(namespace, name))
        for claim in claims:
            if not claim["metadata"].get("deletionTimestamp"):
                self.kube.delete("karpenter.sh/v1", "NodeClaim", claim["metadata"]["name"])
        return len(claims)
