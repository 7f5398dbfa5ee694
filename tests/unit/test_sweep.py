"""The sweep of orphaned cluster-scoped children: NodePools whose FineTuneJob went without the finalizer
running (removed by hand while no operator ran) are deleted; those of live jobs, of another operator's
namespaces and of unlabelled owners are not. The same for the NodePools of ModelServers."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_operator import names
from kubetune_operator.controller import Controller
from kubetune_operator.observed import orphans
from kubetune_operator.servers import ServerController, server_orphans
from kubetune_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

Obj = dict[str, Any]


def ftj(namespace: str, name: str, uid: str) -> Obj:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
    }


def claim(name: str, namespace: str, job: str, uid: str | None, **meta: Any) -> Obj:
    labels = {**names.job_labels(namespace, job), **({names.UID_LABEL: uid} if uid else {})}
    return {"apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": name, "labels": labels, **meta}}


def test_children_of_missing_or_replaced_jobs_are_orphans() -> None:
    jobs = [ftj("ml", "alive", "u1"), ftj("ml", "again", "u3")]
    children = [
        claim("ml-alive-0", "ml", "alive", "u1"),
        claim("ml-gone-0", "ml", "gone", "u2"),
        claim("ml-again-0", "ml", "again", "u-old"),  # deleted and created again under the same name
        claim("ml-old-0", "ml", "old", None),  # an older operator's claim: judged by name alone
        claim("ml-alive-legacy", "ml", "alive", None),
        claim("ml-going-0", "ml", "going", "u4", deletionTimestamp="2026-11-29T10:00:00Z"),
        {"metadata": {"name": "someone-elses", "labels": names.MANAGED_BY}},
    ]
    assert [c["metadata"]["name"] for c in orphans(children, jobs)] == ["ml-gone-0", "ml-again-0", "ml-old-0"]


def test_children_outside_the_watched_namespaces_are_another_operators() -> None:
    children = [claim("a-x-0", "a", "x", "u1"), claim("b-y-0", "b", "y", "u2")]
    assert [c["metadata"]["name"] for c in orphans(children, [], ("a",))] == ["a-x-0"]


class FakeKube:
    """The API as the sweep uses it: NodePools and FineTuneJobs by list, deletions recorded."""

    def __init__(self, claims: list[Obj], jobs: list[Obj], *, karpenter: bool = True) -> None:
        self.claims, self.jobs, self.karpenter = claims, jobs, karpenter
        self.lists: list[tuple[str, str | None, str | None]] = []
        self.deleted: list[str] = []

    def installed(self, api_version: str, kind: str) -> bool:
        return self.karpenter

    def list(
        self, api_version: str, kind: str, *, namespace: str | None = None, labels: str | None = None
    ) -> list[Obj]:
        self.lists.append((kind, namespace, labels))
        if kind == "NodePool":
            return self.claims
        return [j for j in self.jobs if namespace is None or j["metadata"]["namespace"] == namespace]

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        self.deleted.append(f"{kind}/{name}")


def test_sweep_lists_the_claims_first_then_the_jobs_and_deletes_the_orphans() -> None:
    kube = FakeKube([claim("ml-a-0", "ml", "a", "u1"), claim("ml-b-0", "ml", "b", "u2")], [ftj("ml", "a", "u1")])
    assert Controller(kube, OperatorSettings()).sweep() == 1  # type: ignore[arg-type]
    assert kube.deleted == ["NodePool/ml-b-0"]
    assert kube.lists == [("NodePool", None, "app.kubernetes.io/managed-by=kubetune"), ("FineTuneJob", None, None)]


def test_sweep_in_namespaces_reads_only_their_jobs() -> None:
    kube = FakeKube([claim("a-x-0", "a", "x", "u1"), claim("b-y-0", "b", "y", "u2")], [ftj("a", "x", "u1")])
    assert Controller(kube, OperatorSettings(namespaces=("a",))).sweep() == 0  # type: ignore[arg-type]
    assert kube.deleted == []
    assert ("FineTuneJob", "a", None) in kube.lists
    assert ("FineTuneJob", None, None) not in kube.lists


def test_sweep_without_karpenter_or_claims_reads_nothing_more() -> None:
    kube = FakeKube([], [], karpenter=False)
    assert Controller(kube, OperatorSettings()).sweep() == 0  # type: ignore[arg-type]
    assert kube.lists == []
    empty = FakeKube([], [ftj("ml", "a", "u1")])
    assert Controller(empty, OperatorSettings()).sweep() == 0  # type: ignore[arg-type]
    assert empty.lists == [("NodePool", None, "app.kubernetes.io/managed-by=kubetune")]


def ms(namespace: str, name: str, uid: str) -> Obj:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
    }


def server_pool(name: str, namespace: str, server: str, uid: str, **meta: Any) -> Obj:
    labels = {**names.server_labels(namespace, server), names.UID_LABEL: uid}
    return {"apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": name, "labels": labels, **meta}}


def test_the_pools_of_gone_or_replaced_model_servers_are_orphans_and_jobs_pools_are_not_theirs() -> None:
    pools = [
        server_pool("ml-alive-ms", "ml", "alive", "s1"),
        server_pool("ml-gone-ms", "ml", "gone", "s2"),
        server_pool("ml-again-ms", "ml", "again", "s-old"),  # deleted and created again under the same name
        server_pool("ml-going-ms", "ml", "going", "s4", deletionTimestamp="2026-11-29T10:00:00Z"),
        server_pool("other-x-ms", "other", "x", "s5"),
        claim("ml-job-0", "ml", "job", "u1"),  # a job's: the job sweep's to judge
    ]
    servers = [ms("ml", "alive", "s1"), ms("ml", "again", "s3")]
    found = server_orphans(pools, servers, ("ml",))
    assert [p["metadata"]["name"] for p in found] == ["ml-gone-ms", "ml-again-ms"]
    assert [c["metadata"]["name"] for c in orphans(pools, [ftj("ml", "job", "u1")])] == [], (
        "servers' pools are not jobs'"
    )


def test_the_server_sweep_lists_pools_first_then_servers_and_deletes_the_orphans() -> None:
    kube = FakeKube(
        [server_pool("ml-a-ms", "ml", "a", "s1"), server_pool("ml-b-ms", "ml", "b", "s2")], [ms("ml", "a", "s1")]
    )
    assert ServerController(kube, OperatorSettings()).sweep() == 1  # type: ignore[arg-type]
    assert kube.deleted == ["NodePool/ml-b-ms"]
    assert kube.lists == [("NodePool", None, "app.kubernetes.io/managed-by=kubetune"), ("ModelServer", None, None)]
    jobs_only = FakeKube([claim("ml-j-0", "ml", "j", "u1")], [])
    assert ServerController(jobs_only, OperatorSettings()).sweep() == 0  # type: ignore[arg-type]
    assert jobs_only.lists == [("NodePool", None, "app.kubernetes.io/managed-by=kubetune")], (
        "no server pool: no server read"
    )
