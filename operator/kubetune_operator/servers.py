"""ModelServers: which adapters a shared server should hold, and one pass that makes its replicas hold them.

:func:`wanted` is pure: from the server and the FineTuneJobs of its namespace (with their publish
Jobs, whose recorded result is the only source of an adapter's location; a job's status is never
trusted), the adapters to hold, and for each job the server cannot take, why. :class:`ServerController`
applies the children (:mod:`kubetune_operator.children.modelserver`), then asks every ready replica
what it holds (``GET /v1/models``) and loads or unloads the difference through the server's runtime
adapter endpoints (``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, vLLM's and the
built-in server's alike), and writes the status from what the replicas answered.
"""

from __future__ import annotations

import contextlib
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Final

from pydantic import ValidationError

from kubetune_api import InvalidManifestError
from kubetune_api.modelserver import MS_KIND, ModelServer, ModelServerStatus, ServedAdapter
from kubetune_api.objects import Obj, now
from kubetune_api.resource import API_VERSION, Condition, FineTuneJob, load_job
from kubetune_operator import names
from kubetune_operator.children.modelserver import (
    adapter_path,
    build_adapters_config_map,
    build_server_deployment,
    build_server_node_pool,
    build_server_service,
    server_url,
)
from kubetune_operator.children.nodes import KARPENTER_API_VERSION, NODE_CLAIM_KIND, NODE_POOL_KIND
from kubetune_operator.children.serving import serving_model_name_of
from kubetune_operator.conditions import Conditions
from kubetune_operator.kube import Kube, list_in
from kubetune_operator.observed import recorded_result
from kubetune_operator.settings import OperatorSettings

log = logging.getLogger("kubetune.servers")

#: Seconds to the next pass while replicas start or adapters load.
SOON: Final = 3.0
#: Seconds a replica has to answer one call (a load reads the adapter from the claim).
CALL_TIMEOUT: Final = 30.0
READY: Final = "Ready"


@dataclass(frozen=True, slots=True)
class Wanted:
    """An adapter the server should hold, or a job it cannot take (``refused`` says why)."""

    name: str
    job: str
    path: str
    refused: str | None = None


def _serves(job: FineTuneJob, server: str) -> bool:
    return job.spec.serving.enabled and job.spec.serving.server == server


def wanted(server: ModelServer, jobs: list[Obj], publish_jobs: list[Obj]) -> list[Wanted]:
    """The adapters of the jobs that name ``server``, oldest job first; those it cannot hold carry the reason."""
    published = {
        (p["metadata"].get("labels") or {}).get(names.JOB_LABEL): recorded_result(p)
        for p in publish_jobs
        if (p["metadata"].get("labels") or {}).get(names.ROLE_LABEL) == names.ROLE_PUBLISH
    }
    candidates: list[tuple[str, str, FineTuneJob]] = []
    for obj in jobs:
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        try:
            job = load_job(obj)
        except InvalidManifestError:
            log.warning("FineTuneJob %s/%s is invalid; its own pass says why", meta.get("namespace"), meta.get("name"))
            continue
        if _serves(job, server.name) and published.get(job.name) is not None:
            candidates.append((meta.get("creationTimestamp") or "", job.name, job))
    result: list[Wanted] = []
    taken: dict[str, str] = {}
    held = 0
    for _, job_name, job in sorted(candidates, key=lambda c: (c[0], c[1])):
        adapter = published[job_name]
        assert adapter is not None
        name = serving_model_name_of(job)
        path = adapter_path(server, adapter.uri) or ""
        refused = _refusal(server, job, adapter.uri, path, holder=taken.get(name), held=held)
        if refused is None:
            taken[name] = job_name
            held += 1
        result.append(Wanted(name, job_name, path, refused))
    return result


def _refusal(  # noqa: PLR0911 - one answer per reason
    server: ModelServer, job: FineTuneJob, uri: str, path: str, *, holder: str | None, held: int
) -> str | None:
    spec = server.spec
    if job.spec.model.source != spec.model.source:
        return (
            f"the job trained on {job.spec.model.source} and ModelServer {server.name} serves "
            f"{spec.model.source}; an adapter only fits its own base"
        )
    if job.spec.method.type == "full":
        return "a fully fine-tuned model is a whole model, not an adapter: remove serving.server to serve it on its own"
    if spec.runtime == "vllm" and job.spec.method.type == "dora":
        return f"vLLM cannot load DoRA adapters: use a ModelServer with runtime transformers, not {server.name}"
    lora = job.spec.method.effective_lora
    if spec.runtime == "vllm" and lora is not None and lora.r > spec.max_lora_rank:
        return f"LoRA rank {lora.r} is above ModelServer {server.name}'s maxLoraRank {spec.max_lora_rank}"
    if not path:
        return (
            f"the adapter is at {uri}, not on ModelServer {server.name}'s adapter claim {spec.adapter_claim}: "
            f"set spec.output.destination to pvc://{spec.adapter_claim}/<path>"
        )
    if holder is not None:
        return (
            f"the model name {serving_model_name_of(job)} is taken on ModelServer {server.name} by job {holder}: "
            "set serving.modelName"
        )
    if held >= spec.max_adapters:
        return f"ModelServer {server.name} holds at most {spec.max_adapters} adapters (spec.maxAdapters)"
    return None


def changed_jobs(obj: Obj, status: ModelServerStatus) -> list[str]:
    """The jobs whose entry the pass changed (added, dropped, loaded elsewhere, refused otherwise): only they
    are woken, so that a job's pass, which wakes the server, does not wake the server's pass again and again."""

    def entries(adapters: list[Obj]) -> set[tuple[str, str, int, str]]:
        return {
            (str(a.get("job")), str(a.get("name")), int(a.get("loadedReplicas") or 0), str(a.get("message") or ""))
            for a in adapters
        }

    before = entries((obj.get("status") or {}).get("adapters") or [])
    after = entries([a.model_dump(by_alias=True) for a in status.adapters])
    return sorted({entry[0] for entry in before ^ after})


def server_orphans(pools: list[Obj], servers: list[Obj], namespaces: tuple[str, ...] = ()) -> list[Obj]:
    """The ModelServers' NodePools among ``pools`` whose server (namespace, name and uid) is not among ``servers``.

    A job's pools, those of namespaces outside ``namespaces`` (when given) and those being deleted
    already are left alone.
    """
    alive = {(s["metadata"]["namespace"], s["metadata"]["name"], s["metadata"]["uid"]) for s in servers}
    found = []
    for pool in pools:
        meta = pool["metadata"]
        labels = meta.get("labels") or {}
        key = (labels.get(names.NAMESPACE_LABEL), labels.get(names.SERVER_LABEL), labels.get(names.UID_LABEL))
        if not all(key) or meta.get("deletionTimestamp") or (namespaces and key[0] not in namespaces):
            continue
        if key not in alive:
            found.append(pool)
    return found


def ready_pods(pods: list[Obj]) -> list[Obj]:
    """Replicas that are Ready, with an address, and not being deleted."""
    return [
        p
        for p in pods
        if (p.get("status") or {}).get("podIP")
        and not p["metadata"].get("deletionTimestamp")
        and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (p.get("status") or {}).get("conditions") or []
        )
    ]


# ---------------------------------------------------------------------------- replicas


class ReplicaError(Exception):
    """A replica refused a call or did not answer; the message is the server's own."""


def _call(url: str, body: Obj | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - the URL is a pod's http address
        url, data=data, method="GET" if body is None else "POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as response:  # noqa: S310
            answer: bytes = response.read()
            return answer
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            text = str(json.loads(text)["error"]["message"])
        raise ReplicaError(f"HTTP {exc.code}: {text[:400]}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ReplicaError(f"no answer: {exc}") from None


def held_by(base: str, ip: str, port: int) -> set[str]:
    """The adapters a replica holds: every model it lists but its base."""
    answer = json.loads(_call(f"http://{ip}:{port}/v1/models"))
    return {str(m["id"]) for m in answer.get("data", []) if m.get("id") != base}


def sync_replica(base: str, ip: str, port: int, adapters: dict[str, str]) -> tuple[set[str], dict[str, str]]:
    """Load what the replica lacks and unload what it should not hold; what it holds then, and its refusals."""
    holds = held_by(base, ip, port)
    errors: dict[str, str] = {}
    for name in sorted(holds - adapters.keys()):
        try:
            _call(f"http://{ip}:{port}/v1/unload_lora_adapter", {"lora_name": name})
            holds.discard(name)
            log.info("unloaded %s from %s", name, ip)
        except ReplicaError as exc:
            log.warning("unloading %s from %s: %s", name, ip, exc)
    for name in sorted(adapters.keys() - holds):
        try:
            _call(f"http://{ip}:{port}/v1/load_lora_adapter", {"lora_name": name, "lora_path": adapters[name]})
            holds.add(name)
            log.info("loaded %s from %s into %s", name, adapters[name], ip)
        except ReplicaError as exc:
            errors[name] = str(exc)
            log.warning("loading %s into %s: %s", name, ip, exc)
    return holds, errors


# ---------------------------------------------------------------------------- controller


class ServerController:
    """Reconciles ModelServers; one pass per server at a time (the kopf daemon's loop)."""

    def __init__(self, kube: Kube, settings: OperatorSettings) -> None:
        self.kube = kube
        self.settings = settings

    def reconcile(self, obj: Obj) -> tuple[float, list[str]]:
        """One pass: seconds to the next, and the jobs whose serving state may have changed."""
        meta = obj["metadata"]
        namespace = meta["namespace"]
        try:
            server = ModelServer.model_validate(obj, by_alias=True, by_name=False)
        except ValidationError as exc:
            log.error("ModelServer %s/%s is invalid: %s", namespace, meta["name"], exc)
            return self.settings.resync_seconds, []
        uid = meta["uid"]
        jobs = self.kube.list(API_VERSION, "FineTuneJob", namespace=namespace)
        publish_jobs = self.kube.list(
            "batch/v1", "Job", namespace=namespace, labels=f"{names.ROLE_LABEL}={names.ROLE_PUBLISH}"
        )
        wants = wanted(server, jobs, publish_jobs)
        adapters = {w.name: w.path for w in wants if w.refused is None}
        no_pool = self._pool(server, uid)
        for manifest in (
            build_adapters_config_map(server, uid, adapters),
            build_server_deployment(server, uid, self.settings),
            build_server_service(server, uid),
        ):
            self.kube.apply(manifest)
        selector = names.server_selector(namespace, server.name)
        ready = ready_pods(self.kube.list("v1", "Pod", namespace=namespace, labels=selector))
        loaded: dict[str, int] = dict.fromkeys(adapters, 0)
        failures: dict[str, str] = {}
        for replica in ready:
            ip = replica["status"]["podIP"]
            try:
                holds, errors = sync_replica(server.name, ip, server.spec.port, adapters)
            except ReplicaError as exc:
                log.warning("ModelServer %s/%s replica %s: %s", namespace, server.name, ip, exc)
                continue
            for name in holds & adapters.keys():
                loaded[name] += 1
            failures.update(errors)
        status = self._status(server, obj, wants, loaded=loaded, failures=failures, ready=len(ready), no_pool=no_pool)
        self.kube.write_status(
            namespace, server.name, status.model_dump(mode="json", by_alias=True, exclude_none=True), kind=MS_KIND
        )
        settled = status.phase == READY or server.spec.replicas == 0
        return (self.settings.resync_seconds if settled else SOON), changed_jobs(obj, status)

    def _karpenter_installed(self) -> bool:
        return self.kube.installed(KARPENTER_API_VERSION, NODE_POOL_KIND)

    def _pool(self, server: ModelServer, uid: str) -> str | None:
        """Apply the server's NodePool (spec.instanceType) and delete any other of its pools; why there is none."""
        if not self._karpenter_installed():
            if server.spec.instance_type:
                return (
                    f"spec.instanceType {server.spec.instance_type} needs Karpenter's NodePools (karpenter.sh/v1), "
                    "which this cluster does not serve; install Karpenter, or unset instanceType and place the "
                    "replicas on existing nodes with nodeSelector"
                )
            return None
        wanted_pool = build_server_node_pool(server, uid, self.settings) if server.spec.instance_type else None
        if wanted_pool is not None:
            self.kube.apply(wanted_pool)
        keep = wanted_pool["metadata"]["name"] if wanted_pool else None
        selector = names.server_selector(server.namespace, server.name)
        for pool in self.kube.list(KARPENTER_API_VERSION, NODE_POOL_KIND, labels=selector):
            meta = pool["metadata"]
            stale = meta["name"] != keep or (meta.get("labels") or {}).get(names.UID_LABEL) != uid
            if stale and not meta.get("deletionTimestamp"):
                log.info(
                    "deleting NodePool %s: ModelServer %s/%s no longer uses it",
                    meta["name"],
                    server.namespace,
                    server.name,
                )
                self.kube.delete(KARPENTER_API_VERSION, NODE_POOL_KIND, meta["name"])
        return None

    def release(self, namespace: str, name: str) -> int:
        """Delete a deleted ModelServer's NodePools; how many of them and of their NodeClaims remain."""
        if not self._karpenter_installed():
            return 0
        selector = names.server_selector(namespace, name)
        pools = self.kube.list(KARPENTER_API_VERSION, NODE_POOL_KIND, labels=selector)
        for pool in pools:
            if not pool["metadata"].get("deletionTimestamp"):
                self.kube.delete(KARPENTER_API_VERSION, NODE_POOL_KIND, pool["metadata"]["name"])
        # The claims carry the pool's template labels, the server's among them.
        claims = self.kube.list(KARPENTER_API_VERSION, NODE_CLAIM_KIND, labels=selector)
        remaining = self.kube.list(KARPENTER_API_VERSION, NODE_POOL_KIND, labels=selector) if pools else []
        return len(remaining) + len(claims)

    def sweep(self) -> int:
        """Delete the NodePools whose ModelServer is gone (its finalizer removed while no operator ran); how many.

        The pools are listed before the servers: a pool's server, created before it, is then in the list if it exists.
        """
        if not self._karpenter_installed():
            return 0
        pools = self.kube.list(KARPENTER_API_VERSION, NODE_POOL_KIND, labels=names.managed_selector())
        if not any(names.SERVER_LABEL in (p["metadata"].get("labels") or {}) for p in pools):
            return 0
        namespaces = self.settings.namespaces
        servers = list_in(self.kube, API_VERSION, MS_KIND, namespaces)
        doomed = server_orphans(pools, servers, namespaces)
        for pool in doomed:
            labels = pool["metadata"].get("labels") or {}
            log.warning(
                "deleting NodePool %s: its ModelServer %s/%s (uid %s) no longer exists",
                pool["metadata"]["name"],
                labels.get(names.NAMESPACE_LABEL),
                labels.get(names.SERVER_LABEL),
                labels.get(names.UID_LABEL),
            )
            self.kube.delete(KARPENTER_API_VERSION, NODE_POOL_KIND, pool["metadata"]["name"])
        return len(doomed)

    def _status(
        self,
        server: ModelServer,
        obj: Obj,
        wants: list[Wanted],
        *,
        loaded: dict[str, int],
        failures: dict[str, str],
        ready: int,
        no_pool: str | None = None,
    ) -> ModelServerStatus:
        entries = [
            ServedAdapter(
                name=w.name,
                job=w.job,
                path=w.path,
                loaded_replicas=loaded.get(w.name, 0) if w.refused is None else 0,
                message=w.refused or failures.get(w.name),
            )
            for w in wants
        ]
        previous = [Condition.model_validate(c) for c in (obj.get("status") or {}).get("conditions") or []]
        conds = Conditions(previous, generation=int(obj["metadata"].get("generation", 1)), now=now())
        missing = [e.name for e in entries if e.message is None and e.loaded_replicas < ready]
        replicas = server.spec.replicas
        if no_pool is not None:
            phase = "Pending" if ready == 0 else "NotReady"
            conds.set(READY, "False", "KarpenterNotInstalled", no_pool)
        elif ready == 0:
            phase = "Pending"
            conds.set(READY, "False", "NoReplicaReady", f"0/{replicas} replicas ready")
        elif ready < replicas or missing or failures:
            phase = "NotReady"
            detail = f"; adapters still loading: {', '.join(missing)}" if missing else ""
            detail += "".join(f"; {name}: {error}" for name, error in sorted(failures.items()))
            conds.set(READY, "False", "Loading", f"{ready}/{replicas} replicas ready{detail}")
        else:
            phase = "Ready"
            held = sum(1 for e in entries if e.message is None)
            conds.set(READY, "True", "Ready", f"{ready}/{replicas} replicas ready, each holding {held} adapters")
        return ModelServerStatus(
            phase=phase,
            observed_generation=int(obj["metadata"].get("generation", 1)),
            ready_replicas=ready,
            url=server_url(server),
            adapters=entries,
            conditions=conds.items,
        )
