"""kopf wiring: thin handlers that only trigger the level-triggered reconcile.

Each FineTuneJob gets a daemon that reconciles it, then sleeps until a child event pokes it or
its requeue time comes; each ModelServer gets one too, poked by its jobs' passes and its pods, and
it pokes the jobs whose adapters it holds. Child watches (Jobs, Pods, Deployments, NodeClaims, Nodes) only poke. Deletion runs
one handler, behind the operator's finalizer, that releases the job's (or the ModelServer's) NodePools
(cluster-scoped, out of reach of garbage collection); namespaced children follow their owner reference.
A sweep, at start-up and every resync, deletes the NodePools of jobs and servers that went without the
finalizer running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import hashlib
import json
import logging
import random
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf
from prometheus_client import start_http_server

from kubetune_api.modelserver import MS_PLURAL
from kubetune_api.resource import GROUP, PLURAL, VERSION
from kubetune_operator import metrics, names
from kubetune_operator.controller import Controller
from kubetune_operator.kube import Kube
from kubetune_operator.servers import ServerController
from kubetune_operator.settings import OperatorSettings

log = logging.getLogger("kubetune.handlers")


class SpecDigestStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's last-handled configuration as a digest of the spec, in an annotation of fixed size.

    kopf's own essence copies the labels and annotations into an annotation; a job carrying a legal
    200 KB annotation then needs more than the 256 KB all annotations may take, every patch
    (finalizer removal included) is refused, and the job can never be deleted. kubetune's handlers
    never read kopf's diffs (the daemon reconciles the whole object), so the essence needs only to
    change when the spec does.
    """

    def build(self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None) -> kopf.BodyEssence:
        spec = json.dumps(dict(body.spec), sort_keys=True, separators=(",", ":"), default=str)
        return cast(kopf.BodyEssence, {"spec": {"sha256": hashlib.sha256(spec.encode()).hexdigest()}})


def build_registry(settings: OperatorSettings, kube: Kube | None = None) -> kopf.OperatorRegistry:  # noqa: PLR0915 - handlers declared in one place
    """A kopf registry with kubetune's handlers bound to ``settings``."""
    registry = kopf.OperatorRegistry()
    state: dict[str, Any] = {"controller": None}
    # The API client is synchronous: reconciles run on their own pool, sized by settings.workers.
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="reconcile")
    pokes: dict[tuple[str, str], asyncio.Event] = {}
    server_pokes: dict[tuple[str, str], asyncio.Event] = {}

    def controller() -> Controller:
        if state["controller"] is None:
            state["controller"] = Controller(kube or Kube(), settings)
        ctl: Controller = state["controller"]
        return ctl

    def poke(namespace: str | None, name: str | None) -> None:
        if namespace and name and (namespace, name) in pokes:
            pokes[(namespace, name)].set()

    def servers() -> ServerController:
        if state.get("servers") is None:
            state["servers"] = ServerController(controller().kube, settings)
        ctl: ServerController = state["servers"]
        return ctl

    def poke_server(namespace: str | None, spec: Mapping[str, Any] | None) -> None:
        server = ((spec or {}).get("serving") or {}).get("server")
        if namespace and server and (namespace, server) in server_pokes:
            server_pokes[(namespace, server)].set()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A custom registry has none of kopf's default login handlers: in-cluster first, then kubeconfig.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.server_timeout = _settings.watch_server_timeout_seconds
        settings.watching.client_timeout = _settings.watch_client_timeout_seconds
        settings.watching.connect_timeout = 30
        settings.persistence.finalizer = names.FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = SpecDigestStorage(prefix=GROUP, key="last-handled-configuration")
        settings.posting.level = logging.WARNING
        settings.execution.max_workers = _settings.workers
        settings.batching.error_delays = (1, 2, 5, 10, 30)
        if _settings.metrics_port:
            start_http_server(_settings.metrics_port)

    _settings = settings

    async def sweep_forever() -> None:
        """Delete orphaned cluster-scoped children at start-up and then every resync (Controller.sweep)."""
        loop = asyncio.get_running_loop()
        while True:
            for sweep in (controller().sweep, servers().sweep):
                try:
                    await loop.run_in_executor(executor, sweep)
                except Exception:
                    log.exception("sweeping orphaned NodePools failed; retrying")
            await asyncio.sleep(_settings.resync_seconds)

    @kopf.on.startup(registry=registry)
    async def start_sweeping(**_: Any) -> None:
        state["sweeper"] = asyncio.get_running_loop().create_task(sweep_forever(), name="kubetune-sweep")

    @kopf.on.cleanup(registry=registry)
    async def stop_sweeping(**_: Any) -> None:
        sweeper = state.get("sweeper")
        if sweeper is not None:
            sweeper.cancel()

    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=10)
    async def run(name: str, namespace: str | None, body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
        assert namespace is not None, "FineTuneJobs are namespaced"
        woken = pokes.setdefault((namespace, name), asyncio.Event())
        loop = asyncio.get_running_loop()
        try:
            while not stopped:
                woken.clear()
                # kopf keeps ``body`` current from its watch: no read per pass.
                obj = copy.deepcopy(dict(body))
                if obj["metadata"].get("deletionTimestamp"):
                    return
                try:
                    decision = await loop.run_in_executor(executor, controller().reconcile, obj)
                    wait = decision.requeue_after if decision and decision.requeue_after else _settings.resync_seconds
                except Exception:
                    log.exception("reconcile of %s/%s failed; retrying", namespace, name)
                    metrics.RECONCILE_ERRORS.labels(kind="FineTuneJob").inc()
                    wait = 5.0
                # A shared server picks up (or drops) the job's adapter on its next pass.
                poke_server(namespace, obj.get("spec"))
                await _sleep(wait, woken, stopped)
        finally:
            pokes.pop((namespace, name), None)

    @kopf.daemon(GROUP, VERSION, MS_PLURAL, registry=registry, cancellation_timeout=10)
    async def serve(name: str, namespace: str | None, body: kopf.Body, stopped: kopf.DaemonStopped, **_: Any) -> None:
        assert namespace is not None, "ModelServers are namespaced"
        woken = server_pokes.setdefault((namespace, name), asyncio.Event())
        loop = asyncio.get_running_loop()
        try:
            while not stopped:
                woken.clear()
                obj = copy.deepcopy(dict(body))
                if obj["metadata"].get("deletionTimestamp"):
                    return
                try:
                    wait, jobs = await loop.run_in_executor(executor, servers().reconcile, obj)
                    for job in jobs:
                        poke(namespace, job)
                except Exception:
                    log.exception("reconcile of ModelServer %s/%s failed; retrying", namespace, name)
                    metrics.RECONCILE_ERRORS.labels(kind="ModelServer").inc()
                    wait = 5.0
                await _sleep(wait, woken, stopped)
        finally:
            server_pokes.pop((namespace, name), None)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def release(name: str, namespace: str | None, uid: str, spec: Mapping[str, Any], **_: Any) -> None:
        assert namespace is not None, "FineTuneJobs are namespaced"
        poke_server(namespace, spec)  # its adapter is unloaded from a shared server
        controller().forget(uid)
        remaining = controller().release(namespace, name, uid)
        if remaining:
            raise kopf.TemporaryError(f"waiting for {remaining} NodePools and NodeClaims to be released", delay=2)

    @kopf.on.delete(GROUP, VERSION, MS_PLURAL, registry=registry)
    def release_server(name: str, namespace: str | None, **_: Any) -> None:
        assert namespace is not None, "ModelServers are namespaced"
        remaining = servers().release(namespace, name)
        if remaining:
            raise kopf.TemporaryError(f"waiting for {remaining} NodePools and NodeClaims to be released", delay=2)

    managed = {"app.kubernetes.io/managed-by": "kubetune"}

    @kopf.on.event("apps", "v1", "deployments", labels=managed, registry=registry)
    @kopf.on.event("batch", "v1", "jobs", labels=managed, registry=registry)
    @kopf.on.event("v1", "pods", labels=managed, registry=registry)
    def child_changed(labels: Mapping[str, str], **_: Any) -> None:
        poke(labels.get(names.NAMESPACE_LABEL), labels.get(names.JOB_LABEL))
        server = labels.get(names.SERVER_LABEL)
        if server and (labels.get(names.NAMESPACE_LABEL), server) in server_pokes:
            server_pokes[(labels[names.NAMESPACE_LABEL], server)].set()

    @kopf.on.event("karpenter.sh", "v1", "nodeclaims", labels=managed, registry=registry)
    def claim_changed(labels: Mapping[str, str], **_: Any) -> None:
        poke(labels.get(names.NAMESPACE_LABEL), labels.get(names.JOB_LABEL))
        server = (labels.get(names.NAMESPACE_LABEL), labels.get(names.SERVER_LABEL))
        if server in server_pokes:
            server_pokes[server].set()

    @kopf.on.event("v1", "nodes", registry=registry)
    def node_changed(**_: Any) -> None:
        # A node can satisfy any waiting job (byo selectors): wake them all; they are cheap to check.
        for event in pokes.values():
            event.set()

    return registry


async def _sleep(seconds: float, woken: asyncio.Event, stopped: kopf.DaemonStopped) -> None:
    """Sleep until a poke, the daemon's stop, or ``seconds`` pass."""

    async def stop() -> None:
        await stopped.wait()

    waits = [asyncio.create_task(woken.wait()), asyncio.create_task(stop())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()


def run_operator(settings: OperatorSettings, *, standalone: bool) -> None:
    """Run until interrupted (``kubetune operator``)."""
    registry = build_registry(settings)
    priority = settings.peering_priority
    if settings.peering is not None and priority is None:
        # Replicas of equal priority all pause (kopf calls it a conflict): give each its own.
        priority = random.SystemRandom().randint(1, 2**31 - 1)
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=standalone or settings.peering is None,
            peering_name=settings.peering,
            priority=priority,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
        )
    )
