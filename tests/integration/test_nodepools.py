"""The operator's per-job NodePools under real Karpenter (core v1.13 + its KWOK provider) on the local runtime.

The session's cluster (every local cluster runs Karpenter) and the module's operator whose NodePools
point at the ``KWOKNodeClass``. Karpenter launches the NodeClaims, the node daemon adopts their
Nodes and runs the pods as processes; a 2-node ZeRO-2 LoRA job trains the toy model through a
dynamic pool and through a static one, a type Karpenter cannot launch is quoted in NodesReady,
and an operator SIGKILLed ten times makes one pool and two claims.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from kubernetes import client, watch

from kubetune_local.catalog import FAILURES_CONFIGMAP
from kubetune_operator import names
from tests.factories import create_job, read_job, wait_until
from tests.integration.conftest import OperatorProcess
from tests.integration.test_operator import children, delete_and_expect_nothing_left
from tests.integration.test_operator_training import ended, toy_claim, toy_job

pytestmark = [
    pytest.mark.integration,
    pytest.mark.trainer,
]

KARPENTER = ("karpenter.sh", "v1")


class Counter:
    """Every NodePool and NodeClaim the apiserver reports ADDED while it runs, by name (a watch per kind)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.added: dict[str, list[str]] = {"nodepools": [], "nodeclaims": []}
        self.created: dict[str, str] = {}
        """creationTimestamp by name."""
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._watch, args=(plural,), daemon=True) for plural in self.added]

    def _watch(self, plural: str) -> None:
        while not self.stop.is_set():
            stream = watch.Watch().stream(self.custom.list_cluster_custom_object, *KARPENTER, plural, timeout_seconds=2)
            for event in stream:
                name = event["object"]["metadata"]["name"]
                if event["type"] == "ADDED" and name not in self.added[plural]:
                    self.added[plural].append(name)
                    self.created[name] = event["object"]["metadata"]["creationTimestamp"]
                if self.stop.is_set():
                    return

    def __enter__(self) -> Counter:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)

    def claims_of(self, pool: str) -> list[str]:
        return sorted(c for c in self.added["nodeclaims"] if c.startswith(f"{pool}-"))


def pools(api: client.ApiClient, namespace: str, job: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = client.CustomObjectsApi(api).list_cluster_custom_object(
        *KARPENTER, "nodepools", label_selector=names.selector(namespace, job)
    )["items"]
    return found


def karpenter_left(api: client.ApiClient, pool: str) -> dict[str, list[str]]:
    """The pool, its NodeClaims and its Nodes that still exist."""
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    selector = f"{names.NODEPOOL_LABEL}={pool}"
    found = {
        "NodePool": [
            p["metadata"]["name"] for p in custom.list_cluster_custom_object(*KARPENTER, "nodepools")["items"]
        ],
        "NodeClaim": [
            c["metadata"]["name"]
            for c in custom.list_cluster_custom_object(*KARPENTER, "nodeclaims", label_selector=selector)["items"]
        ],
        "Node": [n.metadata.name for n in core.list_node(label_selector=selector).items],
    }
    found["NodePool"] = [p for p in found["NodePool"] if p == pool]
    return {kind: items for kind, items in found.items() if items}


def condition(api: client.ApiClient, namespace: str, name: str, kind: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = next(
        (c for c in read_job(api, namespace, name).get("status", {}).get("conditions", []) if c["type"] == kind), None
    )
    return found


def train_through_a_pool(api: client.ApiClient, namespace: str, name: str, mode: str) -> None:
    """A 2-node ZeRO-2 LoRA job through its ``mode`` pool: the pool, 2 claims and nodes, Complete, then nothing."""
    toy_claim(api, namespace)
    body = toy_job(name, steps=20, every=10)
    body["spec"]["resources"]["nodePool"] = {"mode": mode}
    pool = names.node_pool(namespace, name, names.ROLE_TRAINER)
    started = time.monotonic()
    with Counter(api) as counter:
        create_job(api, namespace, body)
        (created,) = wait_until(lambda: pools(api, namespace, name), what=f"the job's {mode} NodePool")
        assert created["metadata"]["name"] == pool
        assert created["spec"]["template"]["spec"]["requirements"][1]["values"] == ["on-demand"]
        if mode == "static":
            assert created["spec"]["replicas"] == 2
        else:
            assert "replicas" not in created["spec"]
            assert created["spec"]["limits"] == {"nodes": "2"}
        batch = client.BatchV1Api(api)
        training = wait_until(
            lambda: batch.list_namespaced_job(namespace, label_selector=f"{names.ATTEMPT_LABEL}=0").items,
            timeout=300,
            what="the training Job",
        )[0]
        launched = training.metadata.creation_timestamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        wait_until(lambda: len(counter.claims_of(pool)) == 2, timeout=120, what=f"2 NodeClaims of {pool}")
        claim_times = [counter.created[c] for c in counter.claims_of(pool)]
        if mode == "static":
            assert max(claim_times) <= launched, "static: the nodes come before the Job"
        else:
            assert min(claim_times) >= launched, "dynamic: nothing is claimed before the Job's pods are pending"
        result = wait_until(lambda: ended(api, namespace, name), timeout=600, what=f"the {mode} 2-node job to end")
        status = read_job(api, namespace, name)["status"]
        assert result == "Complete", json.dumps(status, indent=1)
        trained = time.monotonic() - started
        # Released on completion: Karpenter drains and deletes the pool's nodes and claims.
        wait_until(lambda: not karpenter_left(api, pool), timeout=120, what=f"{pool}, its claims and nodes to go")
        released = time.monotonic() - started - trained
    assert counter.added["nodepools"].count(pool) == 1
    assert len(counter.claims_of(pool)) == 2, counter.claims_of(pool)
    jobs = {j.metadata.name for j in client.BatchV1Api(api).list_namespaced_job(namespace).items}
    # A gang restart (the local runtime's pods share the host's ports with whatever else runs) keeps
    # the pool and its nodes: still one pool and two claims.
    assert {f"{name}-publish", f"{name}-train-0"} <= jobs, jobs
    print(f"{mode}: Complete after {trained:.1f} s, pool and nodes gone {released:.1f} s later")
    delete_and_expect_nothing_left(api, namespace, name)


@pytest.mark.usefixtures("operator")
def test_dynamic_pool_trains_a_two_node_zero_job_and_leaves_nothing(api: client.ApiClient, namespace: str) -> None:
    train_through_a_pool(api, namespace, "dyn", "dynamic")


@pytest.mark.usefixtures("operator")
def test_static_pool_trains_a_two_node_zero_job_and_leaves_nothing(api: client.ApiClient, namespace: str) -> None:
    train_through_a_pool(api, namespace, "stat", "static")


@pytest.mark.usefixtures("operator")
@pytest.mark.parametrize(
    ("name", "instance_type", "failure", "quoted"),
    [
        # The provider refuses the launch: the claim stays, Launched Unknown with the provider's reason.
        (
            "quota",
            "g5.12xlarge",
            "QuotaExceeded: vCPU quota for G5 instances in us-east-1 is exhausted",
            "QuotaExceeded: vCPU quota for G5 instances in us-east-1 is exhausted",
        ),
        # No capacity: Karpenter deletes the claim and tries again; only its Warning event says why.
        (
            "nocap",
            "g6.12xlarge",
            "InsufficientCapacity: no g6.12xlarge capacity in us-east-1a",
            "no g6.12xlarge capacity in us-east-1a",
        ),
    ],
)
def test_a_type_karpenter_cannot_launch_is_quoted_within_a_minute(
    api: client.ApiClient, namespace: str, name: str, instance_type: str, failure: str, quoted: str
) -> None:
    toy_claim(api, namespace)
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(
        "kube-system", {"metadata": {"name": FAILURES_CONFIGMAP}, "data": {instance_type: failure}}
    )
    pool = names.node_pool(namespace, name, names.ROLE_TRAINER)
    try:
        body = toy_job(name, steps=4)
        body["spec"]["distributed"]["nodes"] = 1
        body["spec"]["resources"] = {"provisioner": "karpenter", "instanceType": instance_type, "cpu": "1"}
        started = time.monotonic()
        create_job(api, namespace, body)

        def reported() -> dict[str, Any] | None:
            found = condition(api, namespace, name, "NodesReady")
            return found if found and found["reason"] == "NodeClaimFailed" else None

        found = wait_until(reported, timeout=60, what="NodesReady False quoting Karpenter's reason")
        took = time.monotonic() - started
        assert found["status"] == "False"
        assert quoted in found["message"], found
        assert pool in found["message"]
        assert read_job(api, namespace, name)["status"]["phase"] == "Provisioning"
        print(
            f"{name}: NodesReady quoted Karpenter's reason {took:.1f} s after the job was created: {found['message']}"
        )
    finally:
        core.delete_namespaced_config_map(FAILURES_CONFIGMAP, "kube-system")
    delete_and_expect_nothing_left(api, namespace, name)
    assert not karpenter_left(api, pool)


def test_operator_sigkilled_ten_times_makes_one_pool_and_two_claims(
    operator: OperatorProcess, api: client.ApiClient, namespace: str
) -> None:
    import random  # noqa: PLC0415

    toy_claim(api, namespace)
    pool = names.node_pool(namespace, "chaos", names.ROLE_TRAINER)
    rng = random.Random(7)
    with Counter(api) as counter:
        create_job(api, namespace, toy_job("chaos", steps=40))
        try:
            for _ in range(10):
                time.sleep(rng.uniform(0.5, 4.0))
                operator.kill()
                time.sleep(rng.uniform(0.0, 1.0))
                operator.start()
        finally:
            if operator.process is None or operator.process.poll() is not None:
                operator.start()
        result = wait_until(
            lambda: ended(api, namespace, "chaos"), timeout=900, what="the job to end despite the kills"
        )
        assert result == "Complete", read_job(api, namespace, "chaos")["status"]
        wait_until(lambda: not karpenter_left(api, pool), timeout=120, what=f"{pool} and its nodes to go")
    assert counter.added["nodepools"].count(pool) == 1, counter.added["nodepools"]
    assert len(counter.claims_of(pool)) == 2, counter.claims_of(pool)
    jobs = sorted(j.metadata.name for j in client.BatchV1Api(api).list_namespaced_job(namespace).items)
    assert jobs == ["chaos-publish", "chaos-train-0"], "one Job per attempt, one publish Job"
    delete_and_expect_nothing_left(api, namespace, "chaos")
    assert not children(api, namespace, "chaos")
