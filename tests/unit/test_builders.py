"""The operator's pure builders: the manifests of a FineTuneJob's children, cluster-free."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune_operator import names
from kubetune_operator.api import load_job
from kubetune_operator.builders import (
    Target,
    build_config_map,
    build_node_claims,
    build_pvc,
    build_service,
    build_training_job,
)
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.config import TrainerConfig
from tests.conftest import REPO, load_yaml

pytestmark = pytest.mark.unit


def target(
    spec: dict[str, Any] | None = None, *, gpus: int = 8, attempt: int = 0, example: str = "karpenter-aks"
) -> Target:
    manifest = load_yaml(REPO / "examples" / f"{example}.yaml")
    if spec is not None:
        manifest["spec"] = spec
    job = load_job(manifest)
    return Target(
        name=job.name,
        namespace=job.namespace,
        uid="0000-uid",
        spec=job.spec,
        settings=OperatorSettings(),
        gpus_per_node=gpus,
        attempt=attempt,
    )


def container(job: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = job["spec"]["template"]["spec"]["containers"]
    return containers[0]


class TestNodeClaims:
    def test_one_claim_per_node_with_instance_type_taint_and_job_labels(self) -> None:
        claims = build_node_claims(target())
        assert [c["metadata"]["name"] for c in claims] == ["ml-support-bot-0", "ml-support-bot-1"]
        claim = claims[0]
        assert claim["apiVersion"] == "karpenter.sh/v1"
        assert {
            "key": "node.kubernetes.io/instance-type",
            "operator": "In",
            "values": ["Standard_ND96asr_v4"],
        } in claim["spec"]["requirements"]
        assert claim["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]
        assert claim["metadata"]["labels"][names.UID_LABEL] == "0000-uid"
        assert claim["metadata"]["labels"][names.NAMESPACE_LABEL] == "ml"
        assert "ownerReferences" not in claim["metadata"], "cluster-scoped: released by the finalizer"


class TestTrainingJob:
    def test_indexed_gang_with_torchrun_shape_and_rank_from_the_completion_index(self) -> None:
        job = build_training_job(target(attempt=1))
        spec = job["spec"]
        assert job["metadata"]["name"] == "support-bot-train-1"
        assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
            "Indexed",
            2,
            2,
            0,
        )
        command = container(job)["command"]
        assert command[:4] == ["kubetune", "train", "--config", "/etc/kubetune/config.json"]
        flags = dict(zip(command[4::2], command[5::2], strict=True))
        assert flags == {
            "--nnodes": "2",
            "--node-rank": "$(JOB_COMPLETION_INDEX)",
            "--nproc-per-node": "8",
            "--master-addr": "support-bot-train-1-0.support-bot-train.ml.svc",
            "--master-port": "29500",
        }
        assert job["spec"]["template"]["spec"]["subdomain"] == "support-bot-train"

    def test_permanent_exit_code_fails_the_job_without_retry(self) -> None:
        rules = build_training_job(target())["spec"]["podFailurePolicy"]["rules"]
        assert rules == [
            {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}}
        ]

    def test_security_defaults(self) -> None:
        pod = build_training_job(target())["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container({"spec": {"template": {"spec": pod}}})["securityContext"]["capabilities"] == {"drop": ["ALL"]}

    def test_gpus_shm_and_placement_on_the_claimed_nodes(self) -> None:
        job = build_training_job(target(gpus=8))
        pod = job["spec"]["template"]["spec"]
        assert container(job)["resources"]["limits"] == {"nvidia.com/gpu": "8"}
        assert pod["nodeSelector"] == {names.UID_LABEL: "0000-uid"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}

    def test_byo_uses_the_spec_selector_and_tolerations(self) -> None:
        job = build_training_job(target(example="byo-gpu-nodes", gpus=4))
        pod = job["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"gpu-pool": "a100"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert container(job)["resources"]["requests"] == {"nvidia.com/gpu": "4", "memory": "200Gi"}

    def test_queue_label_and_suspended_start_with_kueue(self) -> None:
        job = build_training_job(target())
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert job["spec"]["suspend"] is True
        assert job["spec"]["activeDeadlineSeconds"] == 86400

    def test_threads_follow_the_cpu_request_per_process(self) -> None:
        spec = load_yaml(REPO / "examples" / "byo-gpu-nodes.yaml")["spec"]
        spec["resources"]["cpu"] = "16"
        spec["distributed"]["processesPerNode"] = 4
        env = {
            e["name"]: e["value"]
            for e in container(build_training_job(target(spec, gpus=4, example="byo-gpu-nodes")))["env"]
        }
        assert env["OMP_NUM_THREADS"] == "4"
        no_cpu = container(build_training_job(target(example="byo-gpu-nodes", gpus=4)))["env"]
        assert "OMP_NUM_THREADS" not in {e["name"] for e in no_cpu}

    def test_cpu_training_requests_no_gpu(self) -> None:
        job = build_training_job(target(example="byo-gpu-nodes", gpus=0))
        assert (
            "limits" not in container(job)["resources"] or "nvidia.com/gpu" not in container(job)["resources"]["limits"]
        )
        assert "--nproc-per-node" in container(job)["command"]

    def test_source_pvc_is_mounted_and_rendered_in_the_trainer_config(self) -> None:
        t = target(example="byo-gpu-nodes", gpus=4)
        job = build_training_job(t)
        mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
        assert "/var/run/kubetune/sources/pvc/models" in mounts
        claim_volume = next(
            v
            for v in job["spec"]["template"]["spec"]["volumes"]
            if v["name"] == mounts["/var/run/kubetune/sources/pvc/models"]
        )
        assert claim_volume["persistentVolumeClaim"] == {"claimName": "models"}
        config = TrainerConfig.model_validate(json.loads(build_config_map(t)["data"]["config.json"]))
        assert config.mounts.claims == {"models": "/var/run/kubetune/sources/pvc/models"}
        assert config.spec == t.spec


class TestStaging:
    def test_pvc_access_mode_follows_nodes_and_owner_is_the_job(self) -> None:
        pvc = build_pvc(target())
        assert pvc is not None
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        assert pvc["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"

    def test_existing_claim_means_no_pvc(self) -> None:
        spec = load_yaml(REPO / "examples" / "byo-gpu-nodes.yaml")["spec"]
        spec["resources"]["storage"] = {"existingClaim": "shared-ckpt"}
        t = target(spec, gpus=4, example="byo-gpu-nodes")
        assert build_pvc(t) is None
        volumes = build_training_job(t)["spec"]["template"]["spec"]["volumes"]
        assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "shared-ckpt"}} in volumes

    def test_headless_service_selects_the_trainers_before_ready(self) -> None:
        service = build_service(target())
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"][names.ROLE_LABEL] == "trainer"
