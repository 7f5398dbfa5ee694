"""Kueue first, against real Kueue (v0.17.0) and real Karpenter on the local runtime: no NodePool,
NodeClaim or Node exists for a FineTuneJob before Kueue admits it, and an evicted job gives its
nodes back and resumes from its checkpoint when admitted again.

A cluster of its own, started with ``kueue=True``, and an operator. The jobs are the toy 2-node
ZeRO-2 LoRA job on ``g5.xlarge`` nodes (1 fake A10G each: the pods ask for ``nvidia.com/gpu: 1``
and train on the CPU), queued in a ClusterQueue whose GPU quota fits one job. Skipped until
Kueue is built (``make kueue``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubetune_local import cluster, kueue
from kubetune_local.kube import api_client
from kubetune_operator import names
from tests.factories import create_job, read_job, wait_until
from tests.integration.conftest import OperatorProcess, install_crd, operator_running
from tests.integration.test_kueue import job as plain_job
from tests.integration.test_nodepools import Counter, condition, karpenter_left
from tests.integration.test_operator import delete_and_expect_nothing_left
from tests.integration.test_operator_training import ended, phase, toy_claim, toy_job

pytestmark = [
    pytest.mark.integration,
    pytest.mark.trainer,
    pytest.mark.skipif(not kueue.binary_path().exists(), reason="Kueue is not built (make kueue)"),
]

GROUP, VERSION = kueue.API_GROUP, kueue.API_VERSION
INSTANCE = "g5.xlarge"
#: The priority of the workload that preempts a training job (a plain Job with Kueue's label).
URGENT = "urgent"


@pytest.fixture(scope="module")
def kueue_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Cluster]:
    home = Path(tmp_path_factory.mktemp("kubetune-kueue-first"))
    started = cluster.up(home, kueue=True)
    try:
        yield started
    finally:
        cluster.down(home, progress=lambda _line: None)
    assert cluster.marked_processes(home) == []


@pytest.fixture(scope="module")
def api(kueue_cluster: cluster.Cluster) -> client.ApiClient:
    """This module's cluster, with the CRD, one ResourceFlavor of g5.xlarge nodes and a ClusterQueue of 2 GPUs."""
    install_crd(kueue_cluster)
    kapi = api_client(kueue_cluster.kubeconfig)
    custom = client.CustomObjectsApi(kapi)
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "resourceflavors",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ResourceFlavor",
            "metadata": {"name": "a10g"},
            "spec": {"nodeLabels": {"node.kubernetes.io/instance-type": INSTANCE}},
        },
    )
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "clusterqueues",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ClusterQueue",
            "metadata": {"name": "two-gpus"},
            "spec": {
                "namespaceSelector": {},
                "queueingStrategy": "StrictFIFO",
                # A workload of a higher priority takes the quota of a running one.
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": "a10g",
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "8"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": "2"},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
    )
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "workloadpriorityclasses",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": URGENT},
            "value": 1000,
        },
    )

    def active() -> bool:
        found = custom.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", "two-gpus")
        return any(
            c["type"] == "Active" and c["status"] == "True" for c in found.get("status", {}).get("conditions", [])
        )

    wait_until(active, what="ClusterQueue two-gpus to be Active")
    return kapi


@pytest.fixture(scope="module")
def operator(
    kueue_cluster: cluster.Cluster, api: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    with operator_running(kueue_cluster, tmp_path_factory.mktemp("operator") / "operator.log") as running:
        yield running


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    """A namespace with the LocalQueue ``gpus`` of ClusterQueue two-gpus."""
    name = f"k-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    wait_until(lambda: core.list_namespaced_service_account(name).items, what=f"default ServiceAccount in {name}")
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP,
        VERSION,
        name,
        "localqueues",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "LocalQueue",
            "metadata": {"name": "gpus"},
            "spec": {"clusterQueue": "two-gpus"},
        },
    )
    yield name
    core.delete_namespace(name)


def queued_job(name: str, *, steps: int, every: int = 10) -> dict[str, Any]:
    """The toy 2-node job on g5.xlarge nodes, one GPU per pod, through the LocalQueue gpus."""
    body = toy_job(name, steps=steps, every=every)
    body["spec"]["resources"] = {"provisioner": "karpenter", "instanceType": INSTANCE, "gpusPerNode": 1, "cpu": "1"}
    body["spec"]["runPolicy"]["queueName"] = "gpus"
    return body


def training_condition(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return condition(api, namespace, name, "Training") or {}


@pytest.mark.usefixtures("operator")
def test_of_two_jobs_applied_at_once_one_waits_queued_with_no_node_until_the_other_is_done(
    api: client.ApiClient, namespace: str
) -> None:
    toy_claim(api, namespace)
    pools = {n: names.node_pool(namespace, n, names.ROLE_TRAINER) for n in ("one", "two")}
    with Counter(api) as counter:
        # Applied in the same second: Kueue orders them by creation time in seconds, then by uid,
        # so which one it admits is its choice; the other must wait with nothing provisioned.
        create_job(api, namespace, queued_job("one", steps=40))
        create_job(api, namespace, queued_job("two", steps=40))
        seen: dict[str, Any] = {}

        def one_trains_one_waits() -> tuple[str, str, str] | None:
            seen.update(
                {name: read_job(api, namespace, name).get("status", {}) for name in pools},
                workloads=[
                    (w["metadata"]["name"], w.get("status", {}).get("conditions"))
                    for w in client.CustomObjectsApi(api).list_namespaced_custom_object(
                        GROUP, VERSION, namespace, "workloads"
                    )["items"]
                ],
            )
            for admitted, waiting in (("one", "two"), ("two", "one")):
                message = str(training_condition(api, namespace, waiting).get("message", ""))
                trains = phase(api, namespace, admitted) in ("Provisioning", "Initializing", "Training")
                if trains and "insufficient unused quota for nvidia.com/gpu" in message:
                    return admitted, waiting, message
            return None

        try:
            admitted, waiting, message = wait_until(
                one_trains_one_waits, timeout=180, what="one job training and the other Queued with Kueue's reason"
            )
        except pytest.fail.Exception:
            pytest.fail(f"not one training and one queued: {seen}")
        started = time.monotonic()
        assert phase(api, namespace, waiting) == "Queued"
        assert "QuotaReserved False, Pending: couldn't assign flavors to pod set" in message, message
        print(f"{waiting}: {message}")

        # Kueue frees the quota when the admitted job's training Job completes (its publish Job is
        # not queued) and admits the other then: nothing of the other may be older than that.
        result = wait_until(lambda: ended(api, namespace, admitted), timeout=600, what=f"{admitted} to end")
        assert result == "Complete"
        done = client.BatchV1Api(api).read_namespaced_job(f"{admitted}-train-0", namespace).status.completion_time
        freed = done.strftime("%Y-%m-%dT%H:%M:%SZ")
        waited = time.monotonic() - started
        assert len(counter.claims_of(pools[admitted])) == 2, counter.claims_of(pools[admitted])
        result = wait_until(lambda: ended(api, namespace, waiting), timeout=600, what=f"{waiting} to end")
        assert result == "Complete", read_job(api, namespace, waiting)["status"]
    made = sorted(counter.created[n] for n in [pools[waiting], *counter.claims_of(pools[waiting])])
    assert made[0] >= freed, f"the waiting job's pool or claims ({made}) came before Kueue freed the quota ({freed})"
    assert counter.added["nodepools"].count(pools[waiting]) == 1
    assert len(counter.claims_of(pools[waiting])) == 2, counter.claims_of(pools[waiting])
    print(f"{waiting}: Queued with no pool for {waited:.0f} s while {admitted} trained, then admitted and Complete")
    for name in pools:
        delete_and_expect_nothing_left(api, namespace, name)


def urgent_job() -> dict[str, Any]:
    """A plain Job of a higher priority asking for the queue's 2 GPUs (it need never run: its admission is the point)."""
    body = plain_job("urgent", queue="gpus", requests={"nvidia.com/gpu": "2", "cpu": "1"})
    body["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] = URGENT
    return body


@pytest.mark.usefixtures("operator")
def test_an_evicted_job_releases_its_nodes_and_resumes_from_its_checkpoint(
    kueue_cluster: cluster.Cluster, api: client.ApiClient, namespace: str
) -> None:
    toy_claim(api, namespace)
    pool = names.node_pool(namespace, "low", names.ROLE_TRAINER)
    create_job(api, namespace, queued_job("low", steps=60, every=10))

    def past_a_checkpoint() -> bool:
        progress = read_job(api, namespace, "low").get("status", {}).get("progress") or {}
        return int(progress.get("step") or 0) >= 15

    wait_until(past_a_checkpoint, timeout=600, what="training to pass its first checkpoint")
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, urgent_job())

    def evicted() -> str | None:
        message = str(training_condition(api, namespace, "low").get("message", ""))
        return message if phase(api, namespace, "low") == "Queued" and "evicted by Kueue" in message else None

    message = wait_until(evicted, timeout=120, what="the job to go back to Queued, evicted by Kueue")
    assert "Preempted" in message, message
    print(f"low: {message}")
    wait_until(lambda: not karpenter_left(api, pool), timeout=120, what=f"{pool}, its claims and nodes to go")
    batch.delete_namespaced_job("urgent", namespace, propagation_policy="Background")
    result = wait_until(lambda: ended(api, namespace, "low"), timeout=900, what="the job to be readmitted and end")
    status = read_job(api, namespace, "low")["status"]
    assert result == "Complete", status
    assert status["progress"]["step"] == 60
    assert status.get("restarts", 0) == 0, "an eviction is no gang failure: the same attempt resumes"
    jobs = sorted(j.metadata.name for j in batch.list_namespaced_job(namespace).items)
    assert jobs == ["low-publish", "low-train-0"], jobs
    rank0 = next(
        p.metadata.name
        for p in client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="kubetune.io/attempt=0").items
        if p.metadata.name.startswith("low-train-0-0")
    )
    log = cluster.pod_log(kueue_cluster.home, rank0, namespace=namespace)
    assert "resuming from" in log, "re-admitted, the gang resumed from its checkpoint"
    assert "checkpoint-" in log
    delete_and_expect_nothing_left(api, namespace, "low")
