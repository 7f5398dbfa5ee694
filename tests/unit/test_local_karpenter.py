"""The Karpenter groundwork's pure pieces: the kwok catalog, which Nodes the daemon adopts, their
resources, and which taints it lifts."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_local.adopt import is_karpenter_node, node_resources, without_startup_taints
from kubetune_local.catalog import CATALOG
from kubetune_local.karpenter import command, kwok_catalog

pytestmark = pytest.mark.unit


def _node(**overrides: object) -> dict[str, object]:
    node: dict[str, object] = {
        "metadata": {
            "name": "kwok-job-a-9q2x9-scaleflicker-1-29z520ufmt-2199668137",
            "labels": {
                "karpenter.sh/nodepool": "job-a",
                "node.kubernetes.io/instance-type": "Standard_NC24ads_A100_v4",
                "kubernetes.io/hostname": "job-a-9q2x9",
                "kwok.x-k8s.io/node": "fake",
            },
        },
        "spec": {"providerID": "kwok://kwok-job-a-9q2x9-scaleflicker-1-29z520ufmt-2199668137"},
        # What the KWOK provider writes: the claim's requests as capacity, the type's allocatable.
        "status": {
            "capacity": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1", "pods": "1"},
            "allocatable": {"cpu": "23900m", "memory": "225270Mi", "nvidia.com/gpu": "1", "pods": "110"},
        },
    }
    node.update(overrides)
    return node


class TestKwokCatalog:
    def test_every_type_has_its_real_gpus_and_an_on_demand_and_a_spot_offering(self) -> None:
        entries = {e["name"]: e for e in kwok_catalog()}
        assert set(entries) == set(CATALOG)
        p5 = entries["p5.48xlarge"]
        assert p5["resources"] == {
            "cpu": "192",
            "memory": "2048Gi",
            "ephemeral-storage": "500Gi",
            "pods": "110",
            "nvidia.com/gpu": "8",
        }
        kinds = [o["Requirements"][0]["values"][0] for o in p5["offerings"]]
        assert kinds == ["on-demand", "spot"]
        assert all(o["Available"] for o in p5["offerings"])
        assert p5["offerings"][1]["Price"] < p5["offerings"][0]["Price"]
        assert "nvidia.com/gpu" not in entries["local-cpu"]["resources"]

    def test_an_unavailable_type_keeps_its_offerings_but_none_is_available(self) -> None:
        entries = {e["name"]: e for e in kwok_catalog(["Standard_ND96isr_H100_v5"])}
        assert [o["Available"] for o in entries["Standard_ND96isr_H100_v5"]["offerings"]] == [False, False]
        assert all(o["Available"] for o in entries["p4d.24xlarge"]["offerings"])

    def test_the_command_enables_static_capacity_and_disables_leader_election(self) -> None:
        line = command(Path("/bin/karpenter-kwok"), Path("/tmp/c.json"), metrics_port=0, health_port=0)
        assert "--disable-leader-election" in line
        assert any(a.startswith("--feature-gates=") and "StaticCapacity=true" in a for a in line)
        assert "--instance-types-file-path=/tmp/c.json" in line


class TestAdoption:
    def test_only_nodes_the_kwok_provider_created_are_adopted(self) -> None:
        assert is_karpenter_node(_node())
        bare_claim = {"name": "kwok-ml-bare-0-x", "labels": {"kwok.x-k8s.io/node": "fake"}}
        assert is_karpenter_node(_node(metadata=bare_claim)), "a NodeClaim without a NodePool"
        assert not is_karpenter_node(_node(spec={"providerID": "kubetune-local:///eastus-1/x"}))
        assert not is_karpenter_node(_node(metadata={"name": "kubetune-local", "labels": {}}))
        assert not is_karpenter_node(_node(spec={}))

    def test_capacity_comes_from_the_catalog_and_allocatable_from_karpenter(self) -> None:
        capacity, allocatable = node_resources(_node())
        assert (capacity["cpu"], capacity["memory"], capacity["nvidia.com/gpu"]) == ("24", "220Gi", "1")
        assert (allocatable["cpu"], allocatable["pods"]) == ("23900m", "110")
        assert allocatable["ephemeral-storage"] == capacity["ephemeral-storage"]

    def test_an_unknown_type_keeps_what_karpenter_wrote(self) -> None:
        node = _node()
        node["metadata"]["labels"]["node.kubernetes.io/instance-type"] = "x9.huge"  # type: ignore[index]
        capacity, allocatable = node_resources(node)
        assert capacity == allocatable == node["status"]["allocatable"]  # type: ignore[index]

    def test_startup_taints_are_lifted_by_key_and_effect(self) -> None:
        taints = [
            {"key": "nvidia.com/gpu", "effect": "NoSchedule"},
            {"key": "kubetune.io/gpu-not-ready", "effect": "NoSchedule"},
            {"key": "karpenter.sh/disrupted", "effect": "NoSchedule"},
        ]
        kept = without_startup_taints(taints, [{"key": "kubetune.io/gpu-not-ready", "effect": "NoSchedule"}])
        assert [t["key"] for t in kept] == ["nvidia.com/gpu", "karpenter.sh/disrupted"]
        assert without_startup_taints(taints, []) == taints
