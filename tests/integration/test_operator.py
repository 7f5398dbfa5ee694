"""The operator against the local runtime's real apiserver: provisioning, staging, launch, cleanup.

The operator runs as a real process (``kubetune operator``); nothing is mocked.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_api.resource import GROUP, PLURAL, VERSION
from kubetune_local.catalog import FAILURES_CONFIGMAP
from kubetune_local.daemon import DEFAULT_NODE
from kubetune_operator import names
from tests.factories import create_job, find_job, finetunejob, read_job, wait_until
from tests.integration.conftest import OperatorProcess

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("operator")]


def two_claimed_nodes(name: str, instance_type: str) -> dict[str, Any]:
    """A 2-node job on a Karpenter NodePool of ``instance_type``."""
    return finetunejob(
        name, distributed={"nodes": 2}, resources={"provisioner": "karpenter", "instanceType": instance_type}
    )


def models_claim(api: client.ApiClient, namespace: str) -> None:
    """An empty claim `models`: Karpenter launches nothing for pods whose claims do not exist."""
    client.CoreV1Api(api).create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "models"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )


def condition(api: client.ApiClient, namespace: str, name: str, kind: str) -> dict[str, Any] | None:
    for found in read_job(api, namespace, name).get("status", {}).get("conditions", []):
        if found["type"] == kind:
            return dict(found)
    return None


def children(api: client.ApiClient, namespace: str, job: str) -> dict[str, list[str]]:
    """Everything labelled for the job, namespaced and cluster-scoped."""
    selector = names.selector(namespace, job)
    core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
    apps = client.AppsV1Api(api)
    claims = custom.list_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", label_selector=selector)["items"]
    pools = custom.list_cluster_custom_object("karpenter.sh", "v1", "nodepools", label_selector=selector)["items"]
    return {
        kind: items
        for kind, items in {
            "Job": [j.metadata.name for j in batch.list_namespaced_job(namespace, label_selector=selector).items],
            "Pod": [p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector=selector).items],
            "Deployment": [
                d.metadata.name for d in apps.list_namespaced_deployment(namespace, label_selector=selector).items
            ],
            "Service": [
                s.metadata.name for s in core.list_namespaced_service(namespace, label_selector=selector).items
            ],
            "ConfigMap": [
                c.metadata.name for c in core.list_namespaced_config_map(namespace, label_selector=selector).items
            ],
            "PersistentVolumeClaim": [
                p.metadata.name
                for p in core.list_namespaced_persistent_volume_claim(namespace, label_selector=selector).items
            ],
            "NodePool": [p["metadata"]["name"] for p in pools],
            "NodeClaim": [c["metadata"]["name"] for c in claims],
            "Node": [n.metadata.name for n in core.list_node(label_selector=selector).items],
        }.items()
        if items
    }


def delete_and_expect_nothing_left(api: client.ApiClient, namespace: str, name: str) -> None:
    client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def gone() -> bool:
        try:
            read_job(api, namespace, name)
        except ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_until(gone, timeout=60, what=f"FineTuneJob {name} to be deleted (finalizer released)")
    left: dict[str, list[str]] = {}

    def nothing_left() -> bool:
        left.clear()
        left.update(children(api, namespace, name))
        return not left

    # Garbage collection cascades (FineTuneJob → Jobs → Pods, PVC protection) and pods bound to
    # released nodes wait for the pod GC's 40 s quarantine: slow on a loaded 2-core machine.
    try:
        wait_until(nothing_left, timeout=180, what=f"every child of {name} to be gone")
    except pytest.fail.Exception:
        nodes = [
            {
                "name": n.metadata.name,
                "deleting": n.metadata.deletion_timestamp,
                "finalizers": n.metadata.finalizers,
                "created": n.metadata.creation_timestamp,
                "taints": n.spec.taints,
            }
            for n in client.CoreV1Api(api).list_node(label_selector=names.selector(namespace, name)).items
        ]
        pytest.fail(f"children of {name} still there after 180 s: {left}; nodes: {nodes}")


def test_byo_waits_for_a_matching_node_then_launches(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    pool = {"kubetune.io/test-pool": namespace}
    create_job(
        api, namespace, finetunejob("byo", resources={"provisioner": "byo", "nodeSelector": pool, "gpusPerNode": 0})
    )

    def waiting() -> dict[str, Any] | None:
        found = condition(api, namespace, "byo", "NodesReady")
        return found if found and found["reason"] == "WaitingForNodes" else None

    message = wait_until(waiting, what="a NodesReady condition saying what it waits for")["message"]
    assert f"kubetune.io/test-pool={namespace}" in message
    assert read_job(api, namespace, "byo")["status"]["phase"] == "Provisioning"
    assert "Job" not in children(api, namespace, "byo")

    core.patch_node(DEFAULT_NODE, {"metadata": {"labels": pool}})
    try:
        wait_until(lambda: "Job" in children(api, namespace, "byo"), what="the training Job once a node matches")
        found = children(api, namespace, "byo")
        assert found["Job"] == ["byo-train-0"]
        assert found["Service"] == ["byo-train"]
        assert found["ConfigMap"] == ["byo-config"]
        assert found["PersistentVolumeClaim"] == ["byo-workspace"]
        config = json.loads(core.read_namespaced_config_map("byo-config", namespace).data["config.json"])
        assert config["kind"] == "TrainerConfig"
        assert config["mounts"]["claims"] == {"models": "/var/run/kubetune/sources/pvc/models"}
        delete_and_expect_nothing_left(api, namespace, "byo")
    finally:
        core.patch_node(DEFAULT_NODE, {"metadata": {"labels": {"kubetune.io/test-pool": None}}})


def test_a_failing_claim_shows_its_reason_and_deleting_while_provisioning_leaks_nothing(
    api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    models_claim(api, namespace)
    # Karpenter keeps a claim whose launch failed with the provider's reason (Launched Unknown) and
    # retries it; an InsufficientCapacity error would delete the claim instead (an Event only).
    failure = "QuotaExceeded: no g5.12xlarge quota left in us-east-1a"
    core.create_namespaced_config_map(
        "kube-system", {"metadata": {"name": FAILURES_CONFIGMAP}, "data": {"g5.12xlarge": failure}}
    )
    try:
        create_job(api, namespace, two_claimed_nodes("quota", "g5.12xlarge"))

        def claim_failed() -> dict[str, Any] | None:
            found = condition(api, namespace, "quota", "NodesReady")
            return found if found and found["reason"] == "NodeClaimFailed" else None

        message = wait_until(claim_failed, what="the claim's failure in NodesReady")["message"]
        assert "QuotaExceeded: no g5.12xlarge quota left in us-east-1a" in message
        assert children(api, namespace, "quota")["NodeClaim"], "Karpenter's claims of the job's pool"
    finally:
        core.delete_namespaced_config_map(FAILURES_CONFIGMAP, "kube-system")
    delete_and_expect_nothing_left(api, namespace, "quota")


def test_deleting_after_nodes_are_ready_removes_claims_nodes_and_children(
    api: client.ApiClient, namespace: str
) -> None:
    create_job(api, namespace, two_claimed_nodes("gpus", "Standard_NC24ads_A100_v4"))
    # A dynamic pool: the Job comes first, and its pending pods bring the nodes.
    wait_until(lambda: "Job" in children(api, namespace, "gpus"), what="the training Job of the job's NodePool")
    assert children(api, namespace, "gpus")["NodePool"] == [names.node_pool(namespace, "gpus", names.ROLE_TRAINER)]
    job = client.BatchV1Api(api).read_namespaced_job("gpus-train-0", namespace)
    container = job.spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1", "every GPU of the instance type"

    def says_why_pods_wait() -> str | None:
        # The toy's source claim `models` does not exist here: the scheduler says so, and the status quotes it.
        found = condition(api, namespace, "gpus", "Training")
        message = str((found or {}).get("message", ""))
        return message if 'persistentvolumeclaim "models" not found' in message else None

    message = wait_until(says_why_pods_wait, what="the Training condition to say why the pods wait")
    assert message.startswith("attempt 0: 0/2 pods running; pod gpus-train-0-")
    assert read_job(api, namespace, "gpus")["status"]["phase"] == "Provisioning"
    models_claim(api, namespace)
    wait_until(
        lambda: len(children(api, namespace, "gpus").get("Node", [])) == 2, timeout=90, what="the pool's 2 nodes"
    )
    delete_and_expect_nothing_left(api, namespace, "gpus")


def test_operator_metrics_count_jobs_and_reconciles(
    operator: OperatorProcess, api: client.ApiClient, namespace: str
) -> None:
    create_job(api, namespace, finetunejob("counted", resources={"provisioner": "byo", "nodeSelector": {"none": "x"}}))
    wait_until(lambda: condition(api, namespace, "counted", "NodesReady"), what="a first reconcile")
    text = operator.metrics()
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")
    }
    assert samples["kubetune_jobs_created_total"] >= 1
    assert samples['kubetune_jobs{phase="Provisioning"}'] >= 1
    assert samples["kubetune_reconcile_duration_seconds_count"] >= 1
    assert (
        0
        < samples["kubetune_reconcile_duration_seconds_sum"] / samples["kubetune_reconcile_duration_seconds_count"]
        < 5
    )


def test_claims_of_a_job_deleted_past_its_finalizer_are_swept_when_the_operator_returns(
    operator: OperatorProcess, api: client.ApiClient, namespace: str
) -> None:
    """The job's finalizer is removed while no operator runs: the restarted operator's sweep finds its
    NodePool without a FineTuneJob (by namespace, name and uid) and deletes it, and its claim and node go."""
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    models_claim(api, namespace)
    create_job(
        api, namespace, finetunejob("bypass", resources={"provisioner": "karpenter", "instanceType": "local-cpu"})
    )
    wait_until(lambda: "Node" in children(api, namespace, "bypass"), what="the job's claimed node")
    claims = children(api, namespace, "bypass")["NodeClaim"]
    nodes = children(api, namespace, "bypass")["Node"]
    pools = children(api, namespace, "bypass")["NodePool"]
    operator.kill()
    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "bypass")
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "bypass", {"metadata": {"finalizers": None}}
        )
        wait_until(lambda: find_job(api, namespace, "bypass") is None, what="the job to go without its finalizer")
        assert children(api, namespace, "bypass")["NodePool"] == pools, "nothing released it"
    finally:
        operator.start()

    def swept() -> bool:
        left = children(api, namespace, "bypass")
        return "NodePool" not in left and "NodeClaim" not in left and "Node" not in left

    wait_until(swept, timeout=90, what="the orphaned NodePool, its claim and its node to be removed")
    assert claims, "the pool had a claim"
    assert all(n.metadata.name not in nodes for n in core.list_node().items)


def test_a_job_with_a_legal_200_kb_annotation_is_reconciled_and_can_be_deleted(
    api: client.ApiClient, namespace: str
) -> None:
    """kopf's copy of the annotations in its last-handled configuration would take all annotations
    above the 256 KB limit, and every patch (the finalizer's removal too) would then be refused."""
    body = finetunejob("heavy", resources={"provisioner": "byo", "nodeSelector": {"none": "x"}})
    body["metadata"]["annotations"] = {"team.example.com/notes": "x" * 200_000}
    create_job(api, namespace, body)

    def handled() -> bool:
        meta = read_job(api, namespace, "heavy")["metadata"]
        return names.FINALIZER in meta.get("finalizers", []) and f"{GROUP}/last-handled-configuration" in meta.get(
            "annotations", {}
        )

    wait_until(handled, what="the finalizer and kopf's last-handled configuration on the job")
    wait_until(lambda: condition(api, namespace, "heavy", "NodesReady"), what="the job's status (reconciled)")
    stored = read_job(api, namespace, "heavy")["metadata"]["annotations"][f"{GROUP}/last-handled-configuration"]
    assert len(stored) < 200, "a digest of the spec, not a copy of the job"
    delete_and_expect_nothing_left(api, namespace, "heavy")
