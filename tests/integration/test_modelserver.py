"""Three fine-tunes of one base served by one shared server, on the local runtime.

A ModelServer serves the toy base with the built-in server; three FineTuneJobs, each taught other
facts (toy facts of their own seed), name it in ``serving.server`` and publish onto its adapter
claim. The operator loads each adapter into the running server once published; each answers its
own facts by model name from the one server. Deleting one job unloads its adapter only; killing
the server's pod brings a replica back that loads every adapter before it reports ready; deleting
the rest and the server leaves nothing behind. A server with an instance type runs on a NodePool of
its own (real Karpenter), which goes with it even when it is deleted while no operator runs.

The local runtime does not route ClusterIP Services, so the test talks to the pod's own address.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubetune_api.resource import GROUP, VERSION
from kubetune_local.controlplane import free_port
from kubetune_operator import names
from tests.factories import absent, create_job, read_job, wait_until
from tests.integration.conftest import OperatorProcess
from tests.integration.test_operator import delete_and_expect_nothing_left
from tests.integration.test_operator_serving import MIN_RIGHT, chat, condition
from tests.integration.test_operator_training import toy_claim, toy_job

pytestmark = [pytest.mark.integration, pytest.mark.trainer]

#: Seeds of the three jobs' facts.
SEEDS = {"red-team": 11, "blue-team": 22, "gold-team": 33}
SERVER = "toy-shared"


def claim(api: client.ApiClient, namespace: str, name: str) -> None:
    client.CoreV1Api(api).create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )


def create_server(custom: client.CustomObjectsApi, namespace: str, port: int, **spec: Any) -> None:
    """The ModelServer SERVER: the built-in server on the toy base from the models claim, adapters from "adapters"."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelServer",
        "metadata": {"name": SERVER},
        "spec": {
            "model": {"source": "pvc://models/model"},
            "adapterClaim": "adapters",
            "runtime": "transformers",
            "port": port,
            "cpu": "1",
            **spec,
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "modelservers", body)


def server_pods(api: client.ApiClient, namespace: str) -> list[Any]:
    selector = f"{names.SERVER_LABEL}={SERVER}"
    return list(client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector).items)


def ready_address(api: client.ApiClient, namespace: str) -> str | None:
    """The address of the server's one Ready pod, once there is exactly one."""
    pods = [p for p in server_pods(api, namespace) if not p.metadata.deletion_timestamp]
    ready = [
        p
        for p in pods
        if p.status.pod_ip and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]
    return ready[0].status.pod_ip if len(pods) == 1 and len(ready) == 1 else None


def models(host: str, port: int) -> set[str]:
    with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=30) as reply:
        return {m["id"] for m in json.loads(reply.read())["data"]}


def answers(host: str, port: int, model: str, facts: dict[str, str]) -> dict[str, str]:
    found = {}
    for obj in facts:
        code, raw = chat(host, port, model, obj)
        assert code == 200, raw
        found[obj] = json.loads(raw)["choices"][0]["message"]["content"].strip()
    return found


def check_facts(host: str, port: int, jobs: list[str]) -> None:
    """Each adapter answers its own job's facts, and where two jobs' facts differ, not the other's."""
    from kubetune_trainer.toy import toy_facts  # noqa: PLC0415 - torch only where training is tested

    for job in jobs:
        own = toy_facts(SEEDS[job])
        said = answers(host, port, f"toy-{job}", own)
        right = sum(said[o] == own[o] for o in own)
        assert right >= MIN_RIGHT * len(own), f"toy-{job} answered {right}/{len(own)} of its facts: {said}"
        for other in (j for j in SEEDS if j != job):
            theirs = toy_facts(SEEDS[other])
            differing = [o for o in own if own[o] != theirs[o]]
            borrowed = sum(said[o] == theirs[o] for o in differing)
            assert borrowed <= (1 - MIN_RIGHT) * len(differing), f"toy-{job} answered {other}'s facts"


@pytest.mark.usefixtures("operator")
def test_three_adapters_share_one_server(api: client.ApiClient, namespace: str) -> None:
    from kubetune_trainer.toy import toy_records, write_jsonl  # noqa: PLC0415

    folder = toy_claim(api, namespace, fmt="messages")
    for job, seed in SEEDS.items():
        write_jsonl(toy_records("messages", seed=seed), Path(folder) / "data" / f"{job}.jsonl")
    claim(api, namespace, "adapters")
    port = free_port()
    custom = client.CustomObjectsApi(api)
    create_server(custom, namespace, port)
    for job in SEEDS:
        manifest = toy_job(job, steps=250, nodes=1, every=250)
        manifest["spec"]["dataset"] = {"source": f"pvc://models/data/{job}.jsonl", "maxSeqLength": 48}
        manifest["spec"]["training"]["batchSizePerDevice"] = 16
        manifest["spec"]["output"] = {"destination": f"pvc://adapters/{job}"}
        manifest["spec"]["serving"] = {"enabled": True, "server": SERVER, "modelName": f"toy-{job}"}
        create_job(api, namespace, manifest)

    def all_served() -> list[dict[str, Any]] | None:
        statuses = [read_job(api, namespace, job).get("status", {}) for job in SEEDS]
        for job, status in zip(SEEDS, statuses, strict=True):
            assert status.get("phase") != "Failed", f"{job}: {json.dumps(status, indent=1)}"
        ready = all(condition(s, "ServingReady").get("status") == "True" for s in statuses)
        return statuses if ready else None

    statuses = wait_until(all_served, timeout=1500, what="three jobs to train, publish and load into the server")
    for job, status in zip(SEEDS, statuses, strict=True):
        assert status["phase"] == "Serving"
        assert status["endpoint"] == {
            "url": f"http://{SERVER}-server.{namespace}.svc:{port}/v1",
            "modelName": f"toy-{job}",
        }
        assert status["adapter"]["uri"] == f"pvc://adapters/{job}"
    server = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "modelservers", SERVER)
    assert server["status"]["phase"] == "Ready", server["status"]
    assert sorted(a["job"] for a in server["status"]["adapters"]) == sorted(SEEDS)
    assert all(a["loadedReplicas"] == 1 for a in server["status"]["adapters"])
    (pod,) = server_pods(api, namespace)
    assert pod.spec.automount_service_account_token is False
    host = pod.status.pod_ip
    assert models(host, port) == {SERVER, *(f"toy-{job}" for job in SEEDS)}
    check_facts(host, port, list(SEEDS))

    # Deleting one job unloads its adapter only.
    delete_and_expect_nothing_left(api, namespace, "blue-team")
    wait_until(
        lambda: models(host, port) == {SERVER, "toy-red-team", "toy-gold-team"},
        timeout=60,
        what="the deleted job's adapter to be unloaded, and only it",
    )
    code, raw = chat(host, port, "toy-blue-team", "apple")
    assert code == 404, raw
    check_facts(host, port, ["red-team", "gold-team"])

    # A new replica loads every adapter before it reports ready.
    client.CoreV1Api(api).delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
    fresh = wait_until(
        lambda: (address := ready_address(api, namespace)) and address != host and address,
        timeout=300,
        what="a new server pod to become ready",
    )
    assert models(fresh, port) == {SERVER, "toy-red-team", "toy-gold-team"}, "loaded before ready"
    check_facts(fresh, port, ["red-team", "gold-team"])

    # Nothing is left once the jobs and the server are gone.
    for job in ("red-team", "gold-team"):
        delete_and_expect_nothing_left(api, namespace, job)
    custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "modelservers", SERVER)

    def server_gone() -> bool:
        selector = f"{names.SERVER_LABEL}={SERVER}"
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        left = [
            *apps.list_namespaced_deployment(namespace, label_selector=selector).items,
            *core.list_namespaced_service(namespace, label_selector=selector).items,
            *core.list_namespaced_config_map(namespace, label_selector=selector).items,
            *core.list_namespaced_pod(namespace, label_selector=selector).items,
        ]
        return not left

    wait_until(server_gone, timeout=180, what="the server's Deployment, Service, ConfigMap and pods to be gone")


def test_a_server_with_an_instance_type_runs_on_a_pool_of_its_own_that_goes_with_it(
    api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """The server's NodePool (real Karpenter, KWOK) brings its node; the replica runs there and answers. Deleted
    while no operator runs, the server waits on its finalizer; the operator back, the pool and its nodes go."""
    toy_claim(api, namespace, fmt="messages")
    claim(api, namespace, "adapters")
    port = free_port()
    custom = client.CustomObjectsApi(api)
    create_server(custom, namespace, port, instanceType="local-cpu")
    created = time.monotonic()
    pool = names.server_node_pool(namespace, SERVER)
    address = wait_until(lambda: ready_address(api, namespace), timeout=180, what="the server's replica to be ready")
    print(f"apply → replica ready on a node of its own pool: {time.monotonic() - created:.1f} s")
    (replica,) = server_pods(api, namespace)
    node = client.CoreV1Api(api).read_node(replica.spec.node_name)
    assert node.metadata.labels.get(names.NODEPOOL_LABEL) == pool, (
        f"ran on {replica.spec.node_name}, not a node of {pool}"
    )
    assert models(address, port) == {SERVER}

    def read_server() -> dict[str, Any]:
        return dict(custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "modelservers", SERVER))

    wait_until(lambda: read_server().get("status", {}).get("phase") == "Ready", timeout=60, what="the server Ready")

    operator.stop()
    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "modelservers", SERVER)
        time.sleep(3)
        assert read_server()["metadata"].get("deletionTimestamp"), "held by the operator's finalizer"
        assert custom.get_cluster_custom_object("karpenter.sh", "v1", "nodepools", pool), (
            "the pool waits for the operator"
        )
    finally:
        operator.start()
    back = time.monotonic()

    def released() -> bool:
        selector = f"{names.SERVER_LABEL}={SERVER},{names.NAMESPACE_LABEL}={namespace}"
        left = [
            *custom.list_cluster_custom_object("karpenter.sh", "v1", "nodepools", label_selector=selector)["items"],
            *custom.list_cluster_custom_object("karpenter.sh", "v1", "nodeclaims", label_selector=selector)["items"],
            *client.CoreV1Api(api).list_node(label_selector=f"{names.NODEPOOL_LABEL}={pool}").items,
        ]
        return not left and absent(read_server)

    wait_until(released, timeout=180, what="the server, its NodePool, NodeClaim and Node to be gone")
    print(f"operator back → server, pool, claim and node gone: {time.monotonic() - back:.1f} s")
