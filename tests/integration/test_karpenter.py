"""Real Karpenter (core + KWOK provider) on the local runtime: NodePools get process-backed nodes.

A cluster of its own (every local cluster runs Karpenter, built once by ``kubetune local build``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubetune_local import cluster
from kubetune_local.catalog import FAILURES_CONFIGMAP
from kubetune_local.controlplane import pid_alive
from kubetune_local.kube import api_client
from tests.factories import absent, wait_until

pytestmark = [
    pytest.mark.integration,
]

GROUP, VERSION = "karpenter.sh", "v1"
POOL_LABEL = "kubetune.io/nodepool"


@pytest.fixture(scope="module")
def kapi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[client.ApiClient]:
    home = Path(tmp_path_factory.mktemp("kubetune-karpenter"))
    started = cluster.up(home)
    try:
        assert cluster.State.load(home).pids.get(cluster.KARPENTER)
        yield api_client(started.kubeconfig)
    finally:
        cluster.down(home, progress=lambda _line: None)
    assert [n for n, pid in cluster.State.load(home).pids.items() if pid_alive(pid)] == []


def node_pool(name: str, instance_type: str, *, replicas: int | None = None, gpus: int = 8) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "template": {
            "metadata": {"labels": {POOL_LABEL: name}},
            "spec": {
                "nodeClassRef": {"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": "default"},
                "requirements": [
                    {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": [instance_type]},
                    {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]},
                ],
                "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}],
                "startupTaints": [{"key": "kubetune.io/gpu-not-ready", "effect": "NoSchedule"}],
                "expireAfter": "Never",
            },
        },
    }
    if replicas is None:
        spec["limits"] = {"nvidia.com/gpu": str(gpus)}
        spec["disruption"] = {"consolidationPolicy": "WhenEmpty", "consolidateAfter": "Never"}
    else:
        spec["replicas"] = replicas
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NodePool", "metadata": {"name": name}, "spec": spec}


def gpu_pod(name: str, pool: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {POOL_LABEL: pool},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11",
                    "command": ["python", "-c", "import time; time.sleep(60)"],
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ],
        },
    }


def claims(api: client.ApiClient, pool: str) -> list[dict[str, Any]]:
    listing = client.CustomObjectsApi(api).list_cluster_custom_object(
        GROUP, VERSION, "nodeclaims", label_selector=f"karpenter.sh/nodepool={pool}"
    )
    return list(listing["items"])


def conditions(claim: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (claim.get("status") or {}).get("conditions") or []}


def delete_pool_and_wait(api: client.ApiClient, pool: str) -> None:
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    custom.delete_cluster_custom_object(GROUP, VERSION, "nodepools", pool, propagation_policy="Foreground")

    wait_until(
        lambda: absent(lambda: custom.get_cluster_custom_object(GROUP, VERSION, "nodepools", pool)),
        timeout=60,
        what=f"NodePool {pool} to be gone (foreground)",
    )
    assert claims(api, pool) == []
    assert core.list_node(label_selector=f"karpenter.sh/nodepool={pool}").items == []


def test_a_pending_gpu_pod_gets_an_adopted_node_and_runs_and_deleting_the_pool_leaves_nothing(
    kapi: client.ApiClient, namespace_k: str
) -> None:
    custom, core = client.CustomObjectsApi(kapi), client.CoreV1Api(kapi)
    custom.create_cluster_custom_object(GROUP, VERSION, "nodepools", node_pool("dyn", "p4d.24xlarge"))
    core.create_namespaced_pod(namespace_k, gpu_pod("trainer", "dyn"))

    def running() -> str | None:
        pod = json.loads(core.read_namespaced_pod("trainer", namespace_k, _preload_content=False).data)
        return pod["spec"].get("nodeName") if pod.get("status", {}).get("phase") == "Running" else None

    node_name = wait_until(running, timeout=60, what="the GPU pod to run on Karpenter's node")

    def initialized() -> dict[str, Any] | None:
        (claim,) = claims(kapi, "dyn")
        status = {t: c["status"] for t, c in conditions(claim).items()}
        wanted = [status.get(t) for t in ("Launched", "Registered", "Initialized", "Ready")]
        return claim if wanted == ["True"] * 4 else None

    claim = wait_until(initialized, timeout=30, what="the NodeClaim to be Launched, Registered, Initialized, Ready")
    assert claim["status"]["nodeName"] == node_name
    node = core.read_node(node_name)
    assert node.spec.provider_id.startswith("kwok://")
    assert node.status.capacity["nvidia.com/gpu"] == "8"
    assert node.status.capacity["cpu"] == "96"
    assert all(t.key != "kubetune.io/gpu-not-ready" for t in node.spec.taints or []), "startup taint lifted"

    delete_pool_and_wait(kapi, "dyn")

    wait_until(
        lambda: absent(lambda: core.read_namespaced_pod("trainer", namespace_k)),
        timeout=30,
        what="the evicted pod to be removed",
    )


def test_a_static_pool_gets_its_replicas_without_pods(kapi: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(kapi)
    custom.create_cluster_custom_object(GROUP, VERSION, "nodepools", node_pool("static", "g6.12xlarge", replicas=2))

    def two_ready() -> list[dict[str, Any]] | None:
        found = claims(kapi, "static")
        ready = [c for c in found if conditions(c).get("Ready", {}).get("status") == "True"]
        return found if len(ready) == 2 else None

    wait_until(two_ready, timeout=60, what="two Ready NodeClaims for replicas: 2")
    delete_pool_and_wait(kapi, "static")


def test_an_injected_launch_failure_is_quoted_on_the_claim(kapi: client.ApiClient, namespace_k: str) -> None:
    custom, core = client.CustomObjectsApi(kapi), client.CoreV1Api(kapi)
    message = "vCPU quota for G5 instances in us-east-1 is exhausted"
    core.create_namespaced_config_map(
        "kube-system", {"metadata": {"name": FAILURES_CONFIGMAP}, "data": {"g5.12xlarge": f"QuotaExceeded: {message}"}}
    )
    try:
        custom.create_cluster_custom_object(GROUP, VERSION, "nodepools", node_pool("failing", "g5.12xlarge"))
        core.create_namespaced_pod(namespace_k, gpu_pod("waiting", "failing"))

        def launch_failure() -> dict[str, Any] | None:
            for claim in claims(kapi, "failing"):
                launched = conditions(claim).get("Launched")
                if launched and launched["reason"] == "QuotaExceeded":
                    return launched
            return None

        launched = wait_until(launch_failure, timeout=60, what="the injected reason on the pool's NodeClaim")
        assert launched["status"] == "Unknown"
        assert launched["message"] == message
    finally:
        core.delete_namespaced_config_map(FAILURES_CONFIGMAP, "kube-system")
    delete_pool_and_wait(kapi, "failing")


@pytest.fixture
def namespace_k(kapi: client.ApiClient) -> Iterator[str]:
    name = f"k-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kapi)
    core.create_namespace({"metadata": {"name": name}})
    wait_until(lambda: core.list_namespaced_service_account(name).items, what=f"default ServiceAccount in {name}")
    yield name
    core.delete_namespace(name)
