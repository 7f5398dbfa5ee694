"""Real Kueue (v0.17.0) on the local runtime: its webhook suspends queued Jobs, its scheduler admits
them within a ClusterQueue's quota and says why one waits.

A cluster of its own, started with ``kueue=True``; skipped until the Kueue manager is built
(``make kueue``, or ``kubetune local build --kueue``: about 13 minutes on 2 cores). Nothing is
mocked: the apiserver calls Kueue's webhooks on loopback, Kueue's controllers create the
Workloads and unsuspend the Jobs, and the admitted Jobs' pods run as processes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubetune_local import cluster, kueue
from kubetune_local.controlplane import pid_alive
from kubetune_local.kube import api_client
from tests.factories import absent, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not kueue.binary_path().exists(), reason="Kueue is not built (make kueue)"),
]

GROUP, VERSION = kueue.API_GROUP, kueue.API_VERSION
QUEUES = Path(__file__).resolve().parents[2] / "examples" / "kueue-queues.yaml"
PYTHON = "python:3.11"  # recorded as the image; the local runtime runs the command in this environment


@pytest.fixture(scope="module")
def kueue_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Cluster]:
    home = Path(tmp_path_factory.mktemp("kubetune-kueue"))
    started = cluster.up(home, kueue=True)
    try:
        assert started.state.kueue
        assert pid_alive(cluster.State.load(home).pids[cluster.KUEUE])
        yield started
    finally:
        cluster.down(home, progress=lambda _line: None)
    assert [n for n, pid in cluster.State.load(home).pids.items() if pid_alive(pid)] == []
    assert cluster.marked_processes(home) == []


@pytest.fixture(scope="module")
def kapi(kueue_cluster: cluster.Cluster) -> client.ApiClient:
    return api_client(kueue_cluster.kubeconfig)


@pytest.fixture(scope="module")
def example_queues(kueue_cluster: cluster.Cluster, kapi: client.ApiClient) -> str:
    """examples/kueue-queues.yaml applied with kubectl, in the namespace examples/kueue.yaml uses."""
    (local_queue,) = [d for d in yaml.safe_load_all(QUEUES.read_text(encoding="utf-8")) if d["kind"] == "LocalQueue"]
    namespace = local_queue["metadata"]["namespace"]
    client.CoreV1Api(kapi).create_namespace({"metadata": {"name": namespace}})
    applied = kueue_cluster.kubectl("apply", "-f", str(QUEUES), check=False)
    assert applied.returncode == 0, applied.stderr
    wait_until(
        lambda: _condition(_cluster_queue(kapi, "gpus"), "Active").get("status") == "True",
        what="ClusterQueue gpus to be Active",
    )
    return str(namespace)


@pytest.fixture
def namespace(kapi: client.ApiClient) -> Iterator[str]:
    name = f"q-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kapi)
    core.create_namespace({"metadata": {"name": name}})
    wait_until(lambda: core.list_namespaced_service_account(name).items, what=f"default ServiceAccount in {name}")
    yield name
    core.delete_namespace(name)


def job(name: str, *, queue: str | None, requests: dict[str, str], script: str = "") -> dict[str, Any]:
    """A Job created unsuspended (Kueue's webhook is what suspends it), one pod running ``script``
    (by default: sleep for 10 minutes)."""
    labels = {kueue.QUEUE_LABEL: queue} if queue else {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "suspend": False,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": PYTHON,
                            "command": ["python", "-c", script or "import time; time.sleep(600)"],
                            "resources": {"requests": requests, "limits": requests},
                        }
                    ],
                }
            },
        },
    }


def _cluster_queue(api: client.ApiClient, name: str) -> dict[str, Any]:
    found: dict[str, Any] = client.CustomObjectsApi(api).get_cluster_custom_object(
        GROUP, VERSION, "clusterqueues", name
    )
    return found


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition["type"] == kind:
            return dict(condition)
    return {}


def workload_of(api: client.ApiClient, namespace: str, job_name: str) -> dict[str, Any] | None:
    """The Workload Kueue made for the Job (owned by it), or None."""
    uid = client.BatchV1Api(api).read_namespaced_job(job_name, namespace).metadata.uid
    listing = client.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, namespace, "workloads")
    for workload in listing["items"]:
        if any(o["uid"] == uid for o in workload["metadata"].get("ownerReferences") or []):
            return dict(workload)
    return None


def admitted(api: client.ApiClient, namespace: str, job_name: str) -> dict[str, Any] | None:
    workload = workload_of(api, namespace, job_name)
    if workload and _condition(workload, "Admitted").get("status") == "True":
        return workload
    return None


def suspended(api: client.ApiClient, namespace: str, job_name: str) -> bool:
    return bool(client.BatchV1Api(api).read_namespaced_job(job_name, namespace).spec.suspend)


def local_queue_and_flavor(api: client.ApiClient, namespace: str, *, cpu: str) -> str:
    """A ResourceFlavor without node labels and a ClusterQueue with ``cpu`` of quota (and 1Gi), named
    after ``namespace``, and the LocalQueue ``one-at-a-time`` in it; returns the LocalQueue's name."""
    custom = client.CustomObjectsApi(api)
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "resourceflavors",
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor", "metadata": {"name": f"cpu-{namespace}"}},
    )
    quota = [{"name": "cpu", "nominalQuota": cpu}, {"name": "memory", "nominalQuota": "1Gi"}]
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "clusterqueues",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ClusterQueue",
            "metadata": {"name": namespace},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory"],
                        "flavors": [{"name": f"cpu-{namespace}", "resources": quota}],
                    }
                ],
            },
        },
    )
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "localqueues",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "LocalQueue",
            "metadata": {"name": "one-at-a-time"},
            "spec": {"clusterQueue": namespace},
        },
    )
    wait_until(
        lambda: _condition(_cluster_queue(api, namespace), "Active").get("status") == "True",
        what=f"ClusterQueue {namespace} to be Active",
    )
    return "one-at-a-time"


def test_a_queued_job_created_unsuspended_is_suspended_by_the_webhook_and_admitted_to_the_gpu_flavor(
    kapi: client.ApiClient, example_queues: str
) -> None:
    batch = client.BatchV1Api(kapi)
    namespace = example_queues
    created = batch.create_namespaced_job(
        namespace, job("queued", queue="team-b-gpus", requests={"cpu": "100m", "nvidia.com/gpu": "1"})
    )
    assert created.spec.suspend is True, "Kueue's mutating webhook suspends a Job with a queue label"
    workload = wait_until(lambda: workload_of(kapi, namespace, "queued"), timeout=30, what="the Job's Workload")
    assert workload["spec"]["queueName"] == "team-b-gpus"
    assert workload["metadata"]["labels"]["kueue.x-k8s.io/job-uid"] == created.metadata.uid

    workload = wait_until(lambda: admitted(kapi, namespace, "queued"), timeout=30, what="the Workload to be admitted")
    admission = workload["status"]["admission"]
    assert admission["clusterQueue"] == "gpus"
    (pod_set,) = admission["podSetAssignments"]
    assert pod_set["flavors"] == {"cpu": "a100-p4d", "nvidia.com/gpu": "a100-p4d"}
    wait_until(lambda: not suspended(kapi, namespace, "queued"), timeout=30, what="Kueue to unsuspend the Job")
    selector = batch.read_namespaced_job("queued", namespace).spec.template.spec.node_selector
    assert selector == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}, "the flavor's node labels"
    batch.delete_namespaced_job("queued", namespace, propagation_policy="Foreground")
    wait_until(lambda: absent(lambda: batch.read_namespaced_job("queued", namespace)), what="the Job to be gone")


def test_a_job_without_a_queue_label_is_left_alone(kapi: client.ApiClient, namespace: str) -> None:
    batch = client.BatchV1Api(kapi)
    created = batch.create_namespaced_job(
        namespace, job("unqueued", queue=None, requests={"cpu": "10m"}, script="pass")
    )
    assert created.spec.suspend is False, "manageJobsWithoutQueueName: false"
    wait_until(
        lambda: batch.read_namespaced_job("unqueued", namespace).status.succeeded == 1,
        what="the unqueued Job to run to completion",
    )
    assert workload_of(kapi, namespace, "unqueued") is None


def test_kueue_serves_the_v1beta1_api_through_its_conversion_webhook(
    kapi: client.ApiClient, example_queues: str
) -> None:
    old = client.CustomObjectsApi(kapi).get_cluster_custom_object(GROUP, "v1beta1", "clusterqueues", "gpus")
    assert old["apiVersion"] == f"{GROUP}/v1beta1"
    flavor = old["spec"]["resourceGroups"][0]["flavors"][0]
    assert flavor["name"] == "a100-p4d"


def pending_reason(api: client.ApiClient, namespace: str, job_name: str) -> dict[str, Any] | None:
    """The Workload's QuotaReserved condition once Kueue has said why it cannot reserve quota."""
    workload = workload_of(api, namespace, job_name)
    reserved = _condition(workload, "QuotaReserved") if workload else {}
    return reserved if reserved.get("status") == "False" and reserved.get("message") else None


def test_jobs_beyond_the_quota_wait_with_kueues_reason_until_one_finishes_or_is_deleted(
    kapi: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    batch = client.BatchV1Api(kapi)
    queue = local_queue_and_flavor(kapi, namespace, cpu="1")
    requests = {"cpu": "600m", "memory": "64Mi"}
    done = tmp_path / "first-may-finish"  # the pod is a process of this machine: it sees the file
    until_done = f"import os, time\nwhile not os.path.exists({str(done)!r}): time.sleep(0.2)"

    batch.create_namespaced_job(namespace, job("first", queue=queue, requests=requests, script=until_done))
    wait_until(lambda: admitted(kapi, namespace, "first"), timeout=30, what="the first Job's Workload admitted")
    wait_until(lambda: not suspended(kapi, namespace, "first"), timeout=30, what="the first Job to be unsuspended")

    created = batch.create_namespaced_job(namespace, job("second", queue=queue, requests=requests))
    assert created.spec.suspend is True
    reserved = wait_until(
        lambda: pending_reason(kapi, namespace, "second"), timeout=30, what="the second Workload's QuotaReserved=False"
    )
    print(f"\nsecond Workload's QuotaReserved: {reserved}")  # the shape the operator quotes (-s shows it)
    assert reserved["reason"] == "Pending"
    assert reserved["message"] == (
        f"couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor cpu-{namespace}, "
        "200m more needed"
    )
    second = workload_of(kapi, namespace, "second")
    assert second is not None
    assert "Admitted" not in {c["type"] for c in second["status"]["conditions"]}, "no Admitted condition yet"
    assert suspended(kapi, namespace, "second")
    pods = client.CoreV1Api(kapi).list_namespaced_pod(namespace, label_selector="job-name=second").items
    assert pods == [], "a suspended Job has no pods"

    done.touch()  # the first Job succeeds: Kueue marks its Workload Finished and frees its quota
    wait_until(lambda: admitted(kapi, namespace, "second"), timeout=30, what="the second Workload admitted")
    wait_until(lambda: not suspended(kapi, namespace, "second"), timeout=30, what="the second Job to be unsuspended")
    first = workload_of(kapi, namespace, "first")
    assert first is not None
    finished = _condition(first, "Finished")
    print(f"first Workload's Finished: {finished}")
    assert (finished["status"], finished["reason"]) == ("True", "Succeeded")

    # Created only now: Kueue orders by creation time in whole seconds and breaks ties by uid, so a
    # third Job created in the second Job's second could have been admitted before it.
    batch.create_namespaced_job(namespace, job("third", queue=queue, requests=requests))
    wait_until(lambda: pending_reason(kapi, namespace, "third"), timeout=30, what="the third Workload pending")

    # Deleting the running second Job frees its quota once the garbage collector has deleted its
    # Workload (owned by the Job): at once in a cluster older than about 30 s, up to 30 s in a younger
    # one, whose collector has not yet rediscovered the resources (Kueue's CRDs came after its start).
    batch.delete_namespaced_job("second", namespace, propagation_policy="Background")
    wait_until(lambda: admitted(kapi, namespace, "third"), timeout=60, what="the third Workload admitted")
    wait_until(lambda: not suspended(kapi, namespace, "third"), timeout=30, what="the third Job to be unsuspended")


def test_a_job_larger_than_the_whole_quota_is_told_it_can_never_fit(kapi: client.ApiClient, namespace: str) -> None:
    queue = local_queue_and_flavor(kapi, namespace, cpu="1")
    client.BatchV1Api(kapi).create_namespaced_job(
        namespace, job("too-big", queue=queue, requests={"cpu": "1500m", "memory": "64Mi"})
    )

    reserved = wait_until(
        lambda: pending_reason(kapi, namespace, "too-big"), timeout=30, what="the Workload's QuotaReserved=False"
    )
    print(f"\ntoo-big Workload's QuotaReserved: {reserved}")
    assert reserved["reason"] == "Pending"
    assert reserved["message"] == (
        f"couldn't assign flavors to pod set main: insufficient quota for cpu in flavor cpu-{namespace}, "
        "previously considered podsets requests (0) + current podset request (1500m) > maximum capacity (1)"
    )
    assert suspended(kapi, namespace, "too-big")
