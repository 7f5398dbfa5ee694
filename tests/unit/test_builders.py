"""The operator's pure builders: the manifests of a FineTuneJob's children, cluster-free."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import pytest

from kubetune_api import InvalidManifestError, TrainerConfig
from kubetune_api.resource import load_job
from kubetune_local.pods.environment import expand
from kubetune_operator import names
from kubetune_operator.children import pod as pod_parts
from kubetune_operator.children.nodes import build_node_pool, build_serving_node_pool
from kubetune_operator.children.publish import build_publish_job
from kubetune_operator.children.serving import (
    build_serving_deployment,
    build_serving_service,
    endpoint_url,
    max_lora_rank,
)
from kubetune_operator.children.target import Target
from kubetune_operator.children.training import build_config_map, build_pvc, build_service, build_training_job
from kubetune_operator.settings import NodeClassRef, OperatorSettings
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


def pool_target(resources: dict[str, Any] | None = None, **sections: Any) -> Target:
    """The AKS example (2 nodes of Standard_ND96asr_v4, 8 GPUs each) with resources and other sections patched."""
    manifest = load_yaml(REPO / "examples" / "karpenter-aks.yaml")
    manifest["spec"]["resources"] = {**manifest["spec"]["resources"], **(resources or {})}
    for section, values in sections.items():
        manifest["spec"][section] = {**manifest["spec"].get(section, {}), **values}
    return target(manifest["spec"])


TRAIN_POOL = names.node_pool("ml", "support-bot", names.ROLE_TRAINER)
SERVE_POOL = names.node_pool("ml", "support-bot", names.ROLE_SERVER)


class TestNodePools:
    def test_dynamic_pool_of_the_jobs_instance_type_capped_at_its_nodes_and_gpus(self) -> None:
        pool = build_node_pool(pool_target())
        assert (pool["apiVersion"], pool["kind"]) == ("karpenter.sh/v1", "NodePool")
        meta, spec = pool["metadata"], pool["spec"]
        assert meta["name"] == names.node_pool("ml", "support-bot", names.ROLE_TRAINER)
        assert "ownerReferences" not in meta, "cluster-scoped: released by the finalizer"
        labels = {
            **names.job_labels("ml", "support-bot"),
            names.UID_LABEL: "0000-uid",
            names.ROLE_LABEL: "trainer",
        }
        assert meta["labels"] == labels
        template = spec["template"]
        assert template["metadata"]["labels"] == labels, "claims and nodes carry the job's labels"
        assert template["spec"]["requirements"] == [
            {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["Standard_ND96asr_v4"]},
            {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]},
            {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
        ]
        assert template["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]
        assert template["spec"]["nodeClassRef"] == {
            "group": "karpenter.azure.com",
            "kind": "AKSNodeClass",
            "name": "default",
        }
        assert template["spec"]["expireAfter"] == "Never"
        # Karpenter checks limits against whole instances: 2 nodes of 8 GPUs.
        assert spec["limits"] == {"nodes": "2", "nvidia.com/gpu": "16"}
        assert spec["disruption"]["consolidationPolicy"] == "WhenEmpty"
        assert spec["disruption"]["consolidateAfter"] == "5m"
        assert "replicas" not in spec

    def test_spot_capacity_and_the_node_class_of_the_settings(self) -> None:
        t = pool_target({"capacityType": "spot"})
        settings = dataclasses.replace(t.settings, node_class=NodeClassRef("karpenter.kwok.sh", "KWOKNodeClass", "x"))
        pool = build_node_pool(dataclasses.replace(t, settings=settings))
        template = pool["spec"]["template"]["spec"]
        assert {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["spot"]} in template["requirements"]
        assert template["nodeClassRef"] == {"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": "x"}

    def test_release_on_delete_keeps_empty_nodes(self) -> None:
        pool = build_node_pool(pool_target(runPolicy={"releaseNodes": "OnDelete"}))
        assert pool["spec"]["disruption"]["consolidateAfter"] == "Never"

    def test_unknown_instance_type_is_capped_by_nodes_only(self) -> None:
        pool = build_node_pool(pool_target({"instanceType": "x9.mystery"}))
        assert pool["spec"]["limits"] == {"nodes": "2"}

    def test_static_pool_keeps_replicas_and_only_the_node_limit(self) -> None:
        pool = build_node_pool(pool_target({"nodePool": {"mode": "static"}}))
        spec = pool["spec"]
        assert spec["replicas"] == 2
        assert spec["limits"] == {"nodes": "2"}, "the only limit Karpenter allows on a static pool"
        assert "disruption" not in spec, "ignored on static pools"

    def test_serving_pool_of_the_serving_instance_type_and_replicas(self) -> None:
        pool = build_serving_node_pool(
            serving_target(serving={"replicas": 3, "instanceType": "Standard_NC24ads_A100_v4"})
        )
        assert pool["metadata"]["name"] == names.node_pool("ml", "support-bot", names.ROLE_SERVER)
        assert pool["metadata"]["labels"][names.ROLE_LABEL] == "server"
        assert pool["spec"]["template"]["spec"]["requirements"][0]["values"] == ["Standard_NC24ads_A100_v4"]
        assert pool["spec"]["limits"] == {"nodes": "3", "nvidia.com/gpu": "3"}

    def test_long_names_are_cut_with_a_hash_and_stay_distinct(self) -> None:
        a = names.node_pool("n" * 63, "j" * 63, names.ROLE_TRAINER)
        b = names.node_pool("n" * 63, "j" * 62, names.ROLE_TRAINER)
        assert max(len(a), len(b)) <= names.NODE_POOL_MAX
        assert a != b
        assert a == names.node_pool("n" * 63, "j" * 63, names.ROLE_TRAINER), "deterministic"
        assert re.fullmatch(r"ml-bot-serve-[0-9a-f]{8}", names.node_pool("ml", "bot", names.ROLE_SERVER))

    def test_names_that_join_the_same_way_get_different_pools(self) -> None:
        # "a-b"/"c" and "a"/"b-c" both read "a-b-c": the hash keeps their pools (and nodes) apart.
        assert names.node_pool("a-b", "c", names.ROLE_TRAINER) != names.node_pool("a", "b-c", names.ROLE_TRAINER)
        assert names.node_pool("a-b", "c", names.ROLE_TRAINER).startswith("a-b-c-train-")


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
        assert pod["nodeSelector"] == {names.NODEPOOL_LABEL: TRAIN_POOL, names.UID_LABEL: "0000-uid"}
        assert job["spec"]["template"]["metadata"]["annotations"] == {"karpenter.sh/do-not-disrupt": "true"}
        (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname", "one pod per node, whatever fits"
        assert term["labelSelector"]["matchLabels"][names.ATTEMPT_LABEL] == "0"
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
            e["name"]: e.get("value")
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
        assert config.private_networks == [], "URL sources reach only public addresses by default"
        allowed = dataclasses.replace(t, settings=OperatorSettings(private_networks=("10.20.0.0/16",)))
        config = TrainerConfig.model_validate(json.loads(build_config_map(allowed)["data"]["config.json"]))
        assert config.private_networks == ["10.20.0.0/16"], "the admins' allow-list reaches the trainer"

    def test_mlflow_credentials_come_from_the_secret_by_reference_never_inline(self) -> None:
        spec = load_yaml(REPO / "examples" / "byo-gpu-nodes.yaml")["spec"]
        spec["training"] = {
            **spec.get("training", {}),
            "reportTo": ["tensorboard", "mlflow"],
            "tracking": {"mlflowTrackingUri": "https://mlflow.example.org", "secretRef": "mlflow-credentials"},
        }
        t = target(spec, gpus=4, example="byo-gpu-nodes")
        job = build_training_job(t)
        env = {e["name"]: e for e in container(job)["env"]}
        for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert env[key] == {
                "name": key,
                "valueFrom": {"secretKeyRef": {"name": "mlflow-credentials", "key": key, "optional": True}},
            }
        # The Secret is neither mounted nor copied anywhere: no volume names it, no env value holds it.
        volumes = job["spec"]["template"]["spec"]["volumes"]
        assert not any(v.get("secret", {}).get("secretName") == "mlflow-credentials" for v in volumes)
        assert not any("value" in e for name, e in env.items() if name.startswith("MLFLOW_"))
        # The rendered config carries the URI and the Secret's name, which the trainer reads; not a credential.
        config = TrainerConfig.model_validate(json.loads(build_config_map(t)["data"]["config.json"]))
        assert config.spec.training.tracking.mlflow_tracking_uri == "https://mlflow.example.org"
        assert config.mounts.secrets == {}, "the tracking Secret is not one of the mounted source Secrets"

    def test_no_mlflow_environment_without_mlflow_or_without_a_secret(self) -> None:
        spec = load_yaml(REPO / "examples" / "byo-gpu-nodes.yaml")["spec"]
        spec["training"] = {**spec.get("training", {}), "reportTo": ["tensorboard"]}
        names_ = {
            e["name"] for e in container(build_training_job(target(spec, gpus=4, example="byo-gpu-nodes")))["env"]
        }
        assert not any(n.startswith("MLFLOW_") for n in names_)
        spec["training"] = {
            **spec["training"],
            "reportTo": ["mlflow"],
            "tracking": {"mlflowTrackingUri": "http://mlflow.mlflow.svc:5000"},
        }
        names_ = {
            e["name"] for e in container(build_training_job(target(spec, gpus=4, example="byo-gpu-nodes")))["env"]
        }
        assert not any(n.startswith("MLFLOW_") for n in names_), "no secretRef: an anonymous tracking server"


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


def serving_target(**patch: Any) -> Target:
    """The AKS example with sections patched (``method={"type": "dora"}`` and so on)."""
    manifest = load_yaml(REPO / "examples" / "karpenter-aks.yaml")
    for section, values in patch.items():
        manifest["spec"][section] = {**manifest["spec"].get(section, {}), **values}
    return target(manifest["spec"])


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


ADAPTER = "oci://registry.example/adapters/support-bot:v1"


class TestPublishJob:
    def test_publishes_from_the_workspace_on_the_training_nodes_with_the_push_secret(self) -> None:
        job = build_publish_job(target())
        assert job["metadata"]["name"] == "support-bot-publish"
        assert job["metadata"]["labels"][names.ROLE_LABEL] == "publish"
        main = container(job)
        assert main["command"] == [
            "kubetune",
            "publish",
            "--config",
            "/etc/kubetune/config.json",
            "--default-uri",
            "pvc://support-bot-workspace/adapter",
        ]
        mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
        assert "/workspace" in mounts
        assert "/var/run/kubetune/secrets/push-creds" in mounts
        assert "nvidia.com/gpu" not in str(main["resources"])
        spec = job["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {names.NODEPOOL_LABEL: TRAIN_POOL, names.UID_LABEL: "0000-uid"}
        assert spec["automountServiceAccountToken"] is False
        rule = job["spec"]["podFailurePolicy"]["rules"][0]
        assert rule["onExitCodes"]["values"] == [2]
        assert rule["action"] == "FailJob"

    def test_full_fine_tuning_publishes_the_model_folder(self) -> None:
        job = build_publish_job(serving_target(method={"type": "full", "lora": None}))
        assert container(job)["command"][-1] == "pvc://support-bot-workspace/model"


class TestServingDeployment:
    def test_vllm_serves_the_base_with_the_pulled_adapter_on_a_gpu(self) -> None:
        deployment = build_serving_deployment(serving_target(), ADAPTER)
        spec = pod_spec(deployment)
        server = spec["containers"][0]
        assert server["image"] == OperatorSettings().vllm_image
        # The hub token is needed: the base is fetched by an init container, not by vLLM.
        assert server["command"][:3] == ["vllm", "serve", "/var/run/kubetune/model"]
        args = server["command"]
        assert args[args.index("--lora-modules") + 1] == "support-bot=/var/run/kubetune/adapter"
        assert args[args.index("--max-lora-rank") + 1] == "16"
        assert args[args.index("--port") + 1] == "8000"
        assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert server["readinessProbe"]["httpGet"]["path"] == "/health"
        inits = {c["name"]: c for c in spec["initContainers"]}
        assert inits["pull-adapter"]["command"] == [
            "kubetune",
            "pull",
            ADAPTER,
            "/var/run/kubetune/adapter",
            "--docker-config",
            "/var/run/kubetune/secrets/push-creds/.dockerconfigjson",
        ]
        assert inits["fetch-model"]["command"][:2] == ["kubetune", "fetch-model"]
        fetch_mounts = {m["mountPath"] for m in inits["fetch-model"]["volumeMounts"]}
        assert "/var/run/kubetune/secrets/hf-token" in fetch_mounts
        assert spec["nodeSelector"] == {names.NODEPOOL_LABEL: SERVE_POOL, names.UID_LABEL: "0000-uid"}
        assert "annotations" not in deployment["spec"]["template"]["metadata"], "a server may move"
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True

    def test_a_public_hub_base_is_downloaded_by_vllm_itself(self) -> None:
        deployment = build_serving_deployment(serving_target(model={"secretRef": None}), ADAPTER)
        args = pod_spec(deployment)["containers"][0]["command"]
        assert args[2] == "microsoft/Phi-3-mini-4k-instruct"
        assert "--revision" not in args
        assert [c["name"] for c in pod_spec(deployment)["initContainers"]] == ["pull-adapter"]

    def test_a_hub_revision_is_passed_to_vllm_as_its_own_flag(self) -> None:
        source = "hf://microsoft/Phi-3-mini-4k-instruct@0a67737cc96d2554230f90338b163bc6380a2a85"
        deployment = build_serving_deployment(serving_target(model={"source": source, "secretRef": None}), ADAPTER)
        args = pod_spec(deployment)["containers"][0]["command"]
        assert args[2] == "microsoft/Phi-3-mini-4k-instruct"
        assert args[args.index("--revision") + 1] == "0a67737cc96d2554230f90338b163bc6380a2a85"
        assert args[args.index("--tokenizer-revision") + 1] == "0a67737cc96d2554230f90338b163bc6380a2a85"

    def test_a_rank_above_what_vllm_serves_is_refused_at_admission(self) -> None:
        with pytest.raises(InvalidManifestError, match=r"method\.lora\.r.*at most 512"):
            serving_target(method={"lora": {"r": 600}})
        # Served by the built-in server, or merged (DoRA), the rank is not vLLM's concern.
        serving_target(method={"lora": {"r": 600}}, serving={"runtime": "transformers", "gpus": 0})
        serving_target(method={"type": "dora", "lora": {"r": 600}}, output={"merge": True})

    def test_rank_is_rounded_up_to_a_rank_vllm_accepts(self) -> None:
        deployment = build_serving_deployment(serving_target(method={"lora": {"r": 24}}), ADAPTER)
        args = pod_spec(deployment)["containers"][0]["command"]
        assert args[args.index("--max-lora-rank") + 1] == "32"
        assert max_lora_rank(8) == 8
        with pytest.raises(ValueError, match="512"):
            max_lora_rank(1024)

    def test_dora_with_vllm_serves_the_merged_model(self) -> None:
        deployment = build_serving_deployment(serving_target(method={"type": "dora"}, output={"merge": True}), ADAPTER)
        args = pod_spec(deployment)["containers"][0]["command"]
        assert "--enable-lora" not in args
        assert args[2] == "/var/run/kubetune/sources/pvc/support-bot-workspace/merged"
        assert args[args.index("--served-model-name") + 1] == "support-bot"

    def test_dora_with_vllm_without_merge_is_refused_naming_the_alternative(self) -> None:
        with pytest.raises(InvalidManifestError, match=r"output\.merge"):
            serving_target(method={"type": "dora"})

    def test_transformers_serves_base_and_adapter_from_volumes_on_the_cpu(self) -> None:
        deployment = build_serving_deployment(
            serving_target(
                model={"source": "pvc://models/toy/model", "secretRef": None},
                output={"destination": None, "secretRef": None},
                serving={"runtime": "transformers", "modelName": "toy", "port": 8123},
                resources={"cpu": "2", "memory": "4Gi"},
            ),
            "pvc://support-bot-workspace/adapter",
        )
        spec = pod_spec(deployment)
        server = spec["containers"][0]
        assert server["image"] == OperatorSettings().trainer_image
        assert server["command"] == [
            "kubetune",
            "serve",
            "--model",
            "/var/run/kubetune/sources/pvc/models/toy/model",
            "--port",
            "8123",
            "--adapter",
            "toy=/var/run/kubetune/sources/pvc/support-bot-workspace/adapter",
        ]
        assert "initContainers" not in spec
        assert server["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
        assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
        claims = {v["persistentVolumeClaim"]["claimName"]: v for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert set(claims) == {"models", "support-bot-workspace"}
        assert all(v["persistentVolumeClaim"]["readOnly"] for v in claims.values())
        assert {"name": "OMP_NUM_THREADS", "value": "2"} in server["env"]

    def test_service_and_endpoint_name_the_same_host_and_port(self) -> None:
        t = serving_target(serving={"port": 8123})
        service = build_serving_service(t)
        assert service["metadata"]["name"] == "support-bot-serve"
        assert service["spec"]["ports"] == [{"name": "http", "port": 8123, "targetPort": "http"}]
        assert service["spec"]["selector"][names.ROLE_LABEL] == "server"
        assert endpoint_url(t) == "http://support-bot-serve.ml.svc:8123/v1"


class TestCommandLines:
    """The kubelet expands $(VAR) in commands and args: strings from a spec must reach the process as written."""

    def test_argv_doubles_every_dollar_and_writes_references_for_the_kubelet(self) -> None:
        assert pod_parts.argv("a$b", "$(HOME)", "$$", pod_parts.EnvRef("JOB_COMPLETION_INDEX")) == [
            "a$$b",
            "$$(HOME)",
            "$$$$",
            "$(JOB_COMPLETION_INDEX)",
        ]

    def test_paths_from_the_spec_are_not_expanded_in_the_servers_command(self) -> None:
        deployment = build_serving_deployment(
            serving_target(
                model={"source": "pvc://models/$(HOME)/model", "secretRef": None},
                output={"destination": None, "secretRef": None},
                serving={"runtime": "transformers", "modelName": "toy"},
            ),
            "pvc://store/$(KUBERNETES_SERVICE_HOST)/adapter",
        )
        command = pod_spec(deployment)["containers"][0]["command"]
        assert "/var/run/kubetune/sources/pvc/models/$$(HOME)/model" in command
        assert "toy=/var/run/kubetune/sources/pvc/store/$$(KUBERNETES_SERVICE_HOST)/adapter" in command
        # What a kubelet makes of it, with both variables set: exactly the paths of the spec.
        expanded = [expand(a, {"HOME": "/leak", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}) for a in command]
        assert "/var/run/kubetune/sources/pvc/models/$(HOME)/model" in expanded
        assert "toy=/var/run/kubetune/sources/pvc/store/$(KUBERNETES_SERVICE_HOST)/adapter" in expanded

    def test_every_builders_command_round_trips_through_the_kubelets_expansion(self) -> None:
        t = target(attempt=1)
        containers = [
            container(build_training_job(t)),
            container(build_publish_job(t)),
            *pod_spec(build_serving_deployment(serving_target(), ADAPTER))["containers"],
            *pod_spec(build_serving_deployment(serving_target(), ADAPTER))["initContainers"],
        ]
        for built in containers:
            for arg in built["command"]:
                if arg == "$(JOB_COMPLETION_INDEX)":
                    continue
                assert expand(arg, {"JOB_COMPLETION_INDEX": "1"}) == arg.replace("$$", "$"), arg
                assert "$(" not in arg.replace("$$", ""), f"unescaped reference in {arg!r}"


class TestTrainerMetrics:
    def test_rank_zero_serves_its_metrics_on_the_pods_own_address(self) -> None:
        env = container(build_training_job(target()))["env"]
        # The variable the trainer reads (kubetune_api.METRICS_ADDRESS_ENV): a contract with the trainer image.
        assert {"name": "KUBETUNE_METRICS_ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in env
