"""Several operator replicas with kopf peering: one works, the others pause, and one takes over."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_api.resource import GROUP, PLURAL, VERSION
from kubetune_local import cluster
from tests.factories import MINIMAL, finetunejob, read_job, wait_until
from tests.integration.conftest import OperatorProcess

pytestmark = pytest.mark.integration

PEERING_CRDS = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "crds" / "kopf.dev_peerings.yaml"


@pytest.fixture
def replicas(
    local_cluster: cluster.Cluster, api: client.ApiClient, crd: None, tmp_path: Path
) -> Iterator[list[OperatorProcess]]:
    local_cluster.kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))
    custom = client.CustomObjectsApi(api)
    extensions = client.ApiextensionsV1Api(api)

    def established() -> bool:
        found = extensions.read_custom_resource_definition("clusterkopfpeerings.kopf.dev")
        return any(c.type == "Established" and c.status == "True" for c in found.status.conditions or [])

    wait_until(established, what="kopf's peering CRD")
    try:
        custom.create_cluster_custom_object(
            "kopf.dev",
            "v1",
            "clusterkopfpeerings",
            {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "kubetune-ha"}},
        )
    except ApiException as exc:
        if exc.status != 409:
            raise
    started = []
    for index, priority in enumerate((100, 200)):
        replica = OperatorProcess(
            local_cluster.kubeconfig,
            tmp_path / f"replica-{index}.log",
            "--peering",
            "kubetune-ha",
            "--peering-priority",
            str(priority),
        )
        replica.start()
        started.append(replica)
    yield started
    for replica in started:
        replica.stop()


def job(name: str) -> dict[str, Any]:
    """A job that waits for nodes that never come: it is handled (has a phase) and stays put."""
    return finetunejob(name, base=MINIMAL, resources={"provisioner": "byo", "nodeSelector": {"kubetune.io/none": "x"}})


def last_peering_word(replica: OperatorProcess) -> str:
    """ "Pausing" or "Resuming": kopf's last peering decision in the replica's log."""
    lines = [line for line in replica.log.read_text().splitlines() if "kopf._core.engines.peering" in line]
    return lines[-1].split(": ", 1)[1].split(" ", 1)[0] if lines else ""


def handled(api: client.ApiClient, namespace: str, name: str) -> bool:
    return bool(read_job(api, namespace, name).get("status", {}).get("phase"))


def test_one_replica_works_and_another_takes_over(
    replicas: list[OperatorProcess], api: client.ApiClient, namespace: str
) -> None:
    low, high = replicas
    wait_until(lambda: last_peering_word(low) == "Pausing", what="the lower-priority replica to pause")
    assert last_peering_word(high) != "Pausing"
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job("first"))
    wait_until(lambda: handled(api, namespace, "first"), what="the active replica to handle a job")
    assert last_peering_word(low) == "Pausing", "the lower-priority replica stayed paused"

    high.kill()
    # The dead replica's keep-alive expires (kopf's peering lifetime, 60 s); the survivor resumes.
    wait_until(lambda: last_peering_word(low) == "Resuming", timeout=150, what="the surviving replica to resume")
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job("second"))
    wait_until(lambda: handled(api, namespace, "second"), what="the surviving replica to handle a new job")
