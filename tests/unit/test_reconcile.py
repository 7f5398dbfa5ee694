"""The pure reconcile decision for each situation a FineTuneJob meets (no cluster: observed objects are data)."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from kubetune_api.resource import FineTuneJob, Progress, load_job
from kubetune_operator import conditions, names
from kubetune_operator.decision import Decision
from kubetune_operator.observed import Observed, waits_for_nodes
from kubetune_operator.reconcile import decide
from kubetune_operator.settings import OperatorSettings
from tests.conftest import REPO, load_yaml
from tests.factories import LLAMA_8B_CONFIG

pytestmark = pytest.mark.unit
SETTINGS = OperatorSettings()


def job(example: str = "karpenter-aks", status: dict[str, Any] | None = None, **spec_patch: Any) -> FineTuneJob:
    manifest = load_yaml(REPO / "examples" / f"{example}.yaml")
    manifest["spec"]["runPolicy"] = {**manifest["spec"].get("runPolicy", {}), "queueName": None}
    manifest["spec"]["runPolicy"] = {k: v for k, v in manifest["spec"]["runPolicy"].items() if v is not None}
    # The pre-flight's own situations are in TestPreflight; the others start after it.
    manifest["spec"]["preflight"] = {"enabled": False}
    for section, values in spec_patch.items():
        manifest["spec"][section] = {**manifest["spec"].get(section, {}), **values}
    if status:
        manifest["status"] = status
    return load_job(manifest)


TRAIN_POOL = names.node_pool("ml", "support-bot", names.ROLE_TRAINER)
SERVE_POOL = names.node_pool("ml", "support-bot", names.ROLE_SERVER)


def claim(
    name: str, *, ready: bool = True, failed: str | None = None, launched: str = "False", message: str = ""
) -> dict[str, Any]:
    """A NodeClaim as Karpenter leaves it: ready, not yet ready, or unable to launch (``failed`` is the reason)."""
    conds = []
    if failed:
        text = message or "no capacity in eastus-2"
        conds.append({"type": "Launched", "status": launched, "reason": failed, "message": text})
    elif ready:
        conds += [{"type": "Launched", "status": "True"}, {"type": "Ready", "status": "True"}]
    else:
        conds.append({"type": "Launched", "status": "Unknown", "reason": "AwaitingReconciliation", "message": "x"})
    pool = SERVE_POOL if "serve" in name else TRAIN_POOL
    return {
        "metadata": {"name": name, "labels": {names.NODEPOOL_LABEL: pool}},
        "status": {"nodeName": name, "conditions": conds},
    }


def pool(name: str = TRAIN_POOL, *, deleting: bool = False, replicas: int | None = None) -> dict[str, Any]:
    """A NodePool as the apiserver returns it: dynamic, or static with ``replicas``."""
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-29T12:00:00Z"
    spec: dict[str, Any] = {} if replicas is None else {"replicas": replicas}
    return {"apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": meta, "spec": spec}


def applied(decision: Decision, kind: str = "NodePool") -> list[str]:
    return [m["metadata"]["name"] for m in decision.apply if m["kind"] == kind]


def pools_deleted(decision: Decision) -> list[str]:
    return sorted(d[3] for d in decision.delete if d[1] == "NodePool")


def node(name: str, gpus: int = 8, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": {"nvidia.com/gpu": str(gpus)}},
    }


def training_job(attempt: int, state: str, reason: str = "") -> dict[str, Any]:
    conds: list[dict[str, str]] = []
    status: dict[str, Any] = {"startTime": "2026-11-29T10:00:00Z"}
    if state == "complete":
        conds = [{"type": "Complete", "status": "True"}]
        status["completionTime"] = "2026-11-29T12:00:00Z"
    elif state == "failed":
        conds = [{"type": "Failed", "status": "True", "reason": reason}]
    elif state == "active":
        status["active"] = 2
    status["conditions"] = conds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"support-bot-train-{attempt}",
            "namespace": "ml",
            "labels": {names.ATTEMPT_LABEL: str(attempt)},
        },
        "spec": {"suspend": state == "suspended"},
        "status": status,
    }


def pod(index: int, phase: str = "Running", exit_code: int | None = None, message: str = "") -> dict[str, Any]:
    state: dict[str, Any] = (
        {"running": {}} if exit_code is None else {"terminated": {"exitCode": exit_code, "message": message}}
    )
    return {
        "metadata": {
            "name": f"support-bot-train-0-{index}",
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "spec": {"nodeName": f"ml-support-bot-{index}"},
        "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]},
    }


def run(ftj: FineTuneJob, **observed: Any) -> Decision:
    return decide(Observed(job=ftj, generation=1, uid="uid-1", **observed), SETTINGS)


def ready_nodes() -> dict[str, Any]:
    return {
        "node_pools": [pool()],
        "node_claims": [claim("ml-support-bot-0"), claim("ml-support-bot-1")],
        "nodes": [node("ml-support-bot-0"), node("ml-support-bot-1")],
    }


def condition(decision: Decision, kind: str) -> tuple[str, str, str]:
    found = conditions.get(decision.status.conditions, kind)
    assert found is not None, f"no {kind} condition"
    return found.status, found.reason, found.message


class TestProvisioning:
    def test_a_new_karpenter_job_applies_its_node_pool_and_waits_for_it(self) -> None:
        decision = run(job())
        assert applied(decision) == [TRAIN_POOL]
        assert decision.create == [], "the Job comes once the pool exists"
        assert decision.status.phase == "Provisioning"
        status, reason, message = condition(decision, conditions.NODES_READY)
        assert (status, reason) == ("False", conditions.WAITING_FOR_NODES)
        assert "Standard_ND96asr_v4" in message
        assert TRAIN_POOL in message

    def test_dynamic_pool_launches_the_job_before_any_node_so_its_pods_bring_them(self) -> None:
        decision = run(job(), node_pools=[pool()])
        assert applied(decision) == [TRAIN_POOL], "applied on every pass"
        (training,) = [m for m in decision.create if m["kind"] == "Job"]
        template = training["spec"]["template"]
        assert template["spec"]["nodeSelector"][names.NODEPOOL_LABEL] == TRAIN_POOL
        assert template["metadata"]["annotations"] == {names.DO_NOT_DISRUPT: "true"}
        limits = template["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8", "every GPU of the instance type, known before any node"
        assert decision.status.phase == "Provisioning"
        assert condition(decision, conditions.NODES_READY)[:2] == ("False", conditions.WAITING_FOR_NODES)

    def test_pending_pods_on_claims_not_yet_ready_are_provisioning_then_training(self) -> None:
        waiting = run(
            job(),
            node_pools=[pool()],
            node_claims=[claim("ml-support-bot-0", ready=False)],
            training_jobs=[training_job(0, "active")],
            pods=[pod(0, "Pending"), pod(1, "Pending")],
        )
        assert waiting.status.phase == "Provisioning"
        assert "(0 ready, 1 claimed)" in condition(waiting, conditions.NODES_READY)[2]
        assert waiting.create == []
        assert waiting.requeue_after == 5.0
        running = run(job(), training_jobs=[training_job(0, "active")], pods=[pod(0), pod(1)], **ready_nodes())
        assert running.status.phase == "Training"
        assert condition(running, conditions.NODES_READY)[0] == "True"

    def test_static_pool_keeps_its_replicas_and_waits_for_them_before_the_job(self) -> None:
        ftj = job(resources={"nodePool": {"mode": "static"}})
        decision = run(
            ftj,
            node_pools=[pool(replicas=2)],
            node_claims=[claim("ml-support-bot-0")],
            nodes=[node("ml-support-bot-0")],
        )
        (applied_pool,) = [m for m in decision.apply if m["kind"] == "NodePool"]
        assert applied_pool["spec"]["replicas"] == 2
        assert decision.create == [], "static: no Job until the nodes are Ready"
        assert decision.status.phase == "Provisioning"
        ready = run(ftj, **ready_nodes())
        assert sorted(m["kind"] for m in ready.create) == ["Job", "PersistentVolumeClaim", "Service"]

    def test_a_claim_karpenter_cannot_launch_is_quoted_with_its_reason(self) -> None:
        quota = "vCPU quota for family ND96asr_v4 in eastus-2 exhausted"
        failing = claim(f"{TRAIN_POOL}-x7k2p", failed="QuotaExceeded", launched="Unknown", message=quota)
        decision = run(
            job(),
            node_pools=[pool()],
            node_claims=[failing],
            training_jobs=[training_job(0, "active")],
            pods=[pod(0, "Pending"), pod(1, "Pending")],
        )
        status, reason, message = condition(decision, conditions.NODES_READY)
        assert (status, reason) == ("False", conditions.NODE_CLAIM_FAILED)
        assert f"QuotaExceeded: {quota}" in message
        assert f"{TRAIN_POOL}-x7k2p" in message
        assert decision.status.phase == "Provisioning"

    def test_a_failed_claim_surfaces_the_providers_reason(self) -> None:
        decision = run(job(), node_claims=[claim("ml-support-bot-0", failed="InsufficientCapacity")])
        status, reason, message = condition(decision, conditions.NODES_READY)
        assert (status, reason) == ("False", conditions.NODE_CLAIM_FAILED)
        assert "InsufficientCapacity" in message
        assert "no capacity in eastus-2" in message

    def test_karpenters_insufficient_capacity_event_is_quoted_while_the_pods_wait(self) -> None:
        # Karpenter deletes a claim it has no capacity for and tries again: only its event says why.
        at = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.UTC)
        ice = karpenter_event(f"{TRAIN_POOL}-q8z2x", "InsufficientCapacityError", "no p5 capacity", at)
        other = karpenter_event("other-pool-train-0-abcde", "InsufficientCapacityError", "not ours", at)
        stale = karpenter_event(f"{TRAIN_POOL}-old00", "InsufficientCapacityError", "an hour ago", at, minutes=-60)
        waiting = {
            "node_pools": [pool()],
            "training_jobs": [training_job(0, "active")],
            "pods": [pod(0, "Pending"), pod(1, "Pending")],
            "now": at + datetime.timedelta(seconds=30),
        }
        decision = run(job(), karpenter_events=[other, ice, stale], **waiting)
        status, reason, message = condition(decision, conditions.NODES_READY)
        assert (status, reason) == ("False", conditions.NODE_CLAIM_FAILED)
        assert "InsufficientCapacityError: NodeClaim" in message
        assert "no p5 capacity" in message
        assert "not ours" not in message
        assert TRAIN_POOL in message
        assert decision.status.phase == "Provisioning"
        quiet = run(job(), karpenter_events=[other, stale], **waiting)
        assert condition(quiet, conditions.NODES_READY)[1] == conditions.WAITING_FOR_NODES, "old news is no reason"

    def test_switching_the_pool_mode_replaces_the_pool(self) -> None:
        # Karpenter refuses to add or drop replicas on an existing pool: the operator deletes the
        # dynamic pool, applies nothing until it is gone, then creates the static one.
        dynamic = pool()
        static = job(resources={"nodePool": {"mode": "static"}})
        switching = run(static, node_pools=[dynamic])
        assert pools_deleted(switching) == [TRAIN_POOL]
        assert applied(switching) == []
        going = dict(dynamic, metadata={**dynamic["metadata"], "deletionTimestamp": "2026-12-03T12:00:00Z"})
        waiting = run(static, node_pools=[going])
        assert (pools_deleted(waiting), applied(waiting)) == ([], [])
        created = run(static)
        assert applied(created) == [TRAIN_POOL]
        (manifest,) = [m for m in created.apply if m["kind"] == "NodePool"]
        assert manifest["spec"]["replicas"] == 2

    def test_a_pool_condition_that_is_false_is_quoted(self) -> None:
        refused = pool()
        refused["status"] = {
            "conditions": [
                {"type": "ValidationSucceeded", "status": "True", "reason": "ValidationSucceeded"},
                {
                    "type": "NodeClassReady",
                    "status": "False",
                    "reason": "NodeClassNotFound",
                    "message": "no AKSNodeClass default",
                },
                {"type": "Ready", "status": "False", "reason": "UnhealthyDependents"},
            ]
        }
        decision = run(job(), node_pools=[refused])
        status, reason, message = condition(decision, conditions.NODES_READY)
        assert (status, reason) == ("False", conditions.NODE_POOL_NOT_READY)
        assert "NodeClassReady False, NodeClassNotFound: no AKSNodeClass default" in message

    def test_only_a_pool_short_of_ready_claims_reads_karpenters_events(self) -> None:
        ftj = job()
        assert waits_for_nodes(ftj, [pool()], [claim("ml-support-bot-0")])
        assert not waits_for_nodes(ftj, [pool()], [claim("ml-support-bot-0"), claim("ml-support-bot-1")])
        assert not waits_for_nodes(ftj, [], [])

    def test_a_claim_karpenter_has_not_looked_at_yet_is_no_failure(self) -> None:
        decision = run(job(), node_pools=[pool()], node_claims=[claim("ml-support-bot-0", ready=False)])
        assert condition(decision, conditions.NODES_READY)[1] == conditions.WAITING_FOR_NODES

    def test_nothing_is_made_for_a_pool_being_deleted(self) -> None:
        decision = run(job(), node_pools=[pool(deleting=True)])
        assert not [m for m in decision.create if m["kind"] == "Job"], "its pods would wait for a pool that goes"

    def test_karpenter_not_installed_is_explained(self) -> None:
        decision = run(job(), karpenter_installed=False)
        assert condition(decision, conditions.NODES_READY)[1] == conditions.KARPENTER_MISSING
        assert decision.create == []
        assert decision.apply == []

    def test_byo_without_matching_nodes_says_what_it_waits_for(self) -> None:
        decision = run(job("byo-gpu-nodes"), nodes=[node("other", labels={"gpu-pool": "v100"})])
        assert decision.status.phase == "Provisioning"
        message = condition(decision, conditions.NODES_READY)[2]
        assert "gpu-pool=a100" in message
        assert "at least 4 allocatable nvidia.com/gpu" in message

    def test_byo_with_a_matching_node_launches(self) -> None:
        decision = run(job("byo-gpu-nodes"), nodes=[node("gpu-1", gpus=4, labels={"gpu-pool": "a100"})])
        assert decision.status.phase == "Initializing"
        assert sorted(m["kind"] for m in decision.create) == ["Job", "PersistentVolumeClaim", "Service"]


class TestLaunch:
    def test_ready_nodes_stage_and_launch_attempt_zero_with_gpus_from_the_nodes(self) -> None:
        decision = run(job(), **ready_nodes())
        assert [m["kind"] for m in decision.apply] == ["NodePool", "ConfigMap"], "the config names the attempt"
        assert sorted(m["kind"] for m in decision.create) == [
            "Job",
            "PersistentVolumeClaim",
            "Service",
        ]
        (training,) = [m for m in decision.create if m["kind"] == "Job"]
        assert training["metadata"]["name"] == "support-bot-train-0"
        limits = training["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8"
        assert decision.status.phase == "Initializing"
        assert condition(decision, conditions.NODES_READY)[0] == "True"

    def test_all_pods_running_is_training_and_progress_is_read(self) -> None:
        progress = Progress(step=41, total_steps=100, percent=41, loss=1.237)
        decision = run(
            job(), training_jobs=[training_job(0, "active")], pods=[pod(0), pod(1)], progress=progress, **ready_nodes()
        )
        assert decision.status.phase == "Training"
        assert decision.status.progress == progress
        assert decision.scrape_progress is True
        assert decision.create == []
        assert decision.status.workload is not None
        assert decision.status.workload.nodes == ["ml-support-bot-0", "ml-support-bot-1"]

    def test_pods_waiting_for_a_missing_secret_or_claim_say_so_in_the_training_condition(self) -> None:
        secret = pod(0, phase="Pending")
        secret["status"]["containerStatuses"][0]["state"] = {
            "waiting": {"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}
        }
        claim_missing = pod(1, phase="Pending")
        claim_missing["status"] = {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": 'persistentvolumeclaim "models" not found',
                }
            ],
        }
        decision = run(job(), training_jobs=[training_job(0, "active")], pods=[secret, claim_missing], **ready_nodes())
        assert decision.status.phase == "Initializing"
        status, reason, message = condition(decision, conditions.TRAINING)
        assert (status, reason) == ("False", conditions.STARTING)
        assert message == (
            "attempt 0: 0/2 pods running; "
            'pod support-bot-train-0-0: CreateContainerConfigError: secret "hf-token" not found; '
            'pod support-bot-train-0-1: Unschedulable: persistentvolumeclaim "models" not found'
        )

    def test_reconciling_twice_changes_nothing(self) -> None:
        first = run(job(), training_jobs=[training_job(0, "active")], pods=[pod(0), pod(1)], **ready_nodes())
        again_job = job(status=first.status.model_dump(mode="json", by_alias=True, exclude_none=True))
        second = run(again_job, training_jobs=[training_job(0, "active")], pods=[pod(0), pod(1)], **ready_nodes())
        assert second.status == first.status
        assert second.events == []
        assert second.create == []


def publish_job(state: str, reason: str = "") -> dict[str, Any]:
    found = training_job(0, state, reason)
    found["metadata"] = {"name": "support-bot-publish", "namespace": "ml", "labels": {names.ROLE_LABEL: "publish"}}
    return found


RESULT = '{"uri": "oci://registry.example/adapters/support-bot:v1", "digest": "sha256:abc", "sizeBytes": 1234}'


def published(**observed: Any) -> dict[str, Any]:
    """Observations of a job whose training and publishing both succeeded."""
    return {
        "training_jobs": [training_job(0, "complete")],
        "publish_job": publish_job("complete"),
        "publish_pods": [pod(0, "Succeeded", exit_code=0, message=f"pushed\n{RESULT}")],
        **ready_nodes(),
        **observed,
    }


class TestFinishing:
    def test_pods_that_finished_before_the_job_completes_still_read_as_training(self) -> None:
        ftj = job(status={"phase": "Training"})
        decision = run(
            ftj,
            training_jobs=[training_job(0, "active")],
            pods=[pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)],
            **ready_nodes(),
        )
        assert decision.status.phase == "Training"
        assert "2 finished" in condition(decision, conditions.TRAINING)[2]


class TestEndings:
    def test_trained_publishes_before_releasing_the_nodes(self) -> None:
        last_read = Progress(step=53, total_steps=60, percent=88, loss=0.2)
        ftj = job(status={"phase": "Training", "progress": last_read.model_dump(by_alias=True, exclude_none=True)})
        decision = run(ftj, training_jobs=[training_job(0, "complete")], **ready_nodes())
        assert decision.status.phase == "Publishing"
        assert [m["metadata"]["name"] for m in decision.create] == ["support-bot-publish"]
        assert decision.delete == [], "the publish pod runs on the training nodes"
        assert decision.status.progress is not None
        assert (decision.status.progress.step, decision.status.progress.percent) == (60, 100)
        status, reason, message = condition(decision, conditions.COMPLETE)
        assert (status, reason) == ("False", conditions.PUBLISHING)
        assert "oci://registry.example/adapters/support-bot:v1" in message
        assert decision.status.completion_time is None
        again = run(
            ftj, training_jobs=[training_job(0, "complete")], publish_job=publish_job("active"), **ready_nodes()
        )
        assert again.create == []
        assert again.status.phase == "Publishing"

    def test_published_completes_releases_the_pool_and_records_uri_digest_and_size(self) -> None:
        decision = run(job(status={"phase": "Publishing"}, serving={"enabled": False}), **published())
        assert decision.status.phase == "Complete"
        assert decision.delete == [("karpenter.sh/v1", "NodePool", None, TRAIN_POOL)]
        assert applied(decision) == [], "never applied again once released"
        gone = run(job(status={"phase": "Complete"}, serving={"enabled": False}), **published(node_pools=[]))
        assert gone.delete == [], "released already"
        adapter = decision.status.adapter
        assert adapter is not None
        assert (adapter.uri, adapter.digest, adapter.size_bytes) == (
            "oci://registry.example/adapters/support-bot:v1",
            "sha256:abc",
            1234,
        )
        assert decision.status.completion_time is not None
        assert condition(decision, conditions.COMPLETE)[:2] == ("True", conditions.PUBLISHED)
        assert [e.reason for e in decision.events] == ["Complete"]
        assert decision.status.endpoint is None
        # The result is recorded on the publish Job, where later passes read it (not from status).
        [(patched, patch)] = decision.patch
        assert patched["metadata"]["name"] == "support-bot-publish"
        assert json.loads(patch["metadata"]["annotations"][names.RESULT_ANNOTATION]) == json.loads(RESULT)

    def test_a_status_adapter_written_by_a_user_is_neither_kept_nor_served(self) -> None:
        decoy = {"uri": "oci://attacker.example/decoy:v1", "digest": "sha256:bad", "sizeBytes": 1}
        hand = {
            "type": "Approved",
            "status": "True",
            "reason": "ByHand",
            "message": "written into status",
            "lastTransitionTime": "2026-11-29T10:00:00Z",
        }
        training = run(
            job(status={"phase": "Training", "adapter": decoy, "conditions": [hand]}),
            training_jobs=[training_job(0, "active")],
            pods=[pod(0), pod(1)],
            **ready_nodes(),
        )
        assert training.status.phase == "Training"
        assert training.status.adapter is None, "no adapter before the publish Job reports one"
        assert {c.type for c in training.status.conditions} == {conditions.NODES_READY, conditions.TRAINING}
        recorded = publish_job("complete")
        recorded["metadata"]["annotations"] = {names.RESULT_ANNOTATION: RESULT}
        serving = run(
            job(status={"phase": "Serving", "adapter": decoy}, serving={"enabled": True, "runtime": "transformers"}),
            **published(publish_job=recorded, publish_pods=[]),
        )
        assert serving.status.adapter is not None
        assert serving.status.adapter.uri == "oci://registry.example/adapters/support-bot:v1"
        assert serving.patch == [], "already recorded"
        deployed = next(m for m in serving.apply if m["kind"] == "Deployment")
        assert "oci://attacker.example/decoy:v1" not in json.dumps(deployed)

    def test_a_published_merged_model_is_named_in_status(self) -> None:
        merged = RESULT.replace("}", ', "mergedUri": "oci://registry.example/adapters/support-bot:v1-merged"}')
        pods = [pod(0, "Succeeded", exit_code=0, message=f"pushed\n{merged}")]
        decision = run(job(status={"phase": "Publishing"}, serving={"enabled": False}), **published(publish_pods=pods))
        assert decision.status.adapter is not None
        assert decision.status.adapter.merged_uri == "oci://registry.example/adapters/support-bot:v1-merged"
        [(_, patch)] = decision.patch
        assert json.loads(patch["metadata"]["annotations"][names.RESULT_ANNOTATION])["mergedUri"].endswith("-merged")

    def test_without_a_destination_the_result_is_the_jobs_volume(self) -> None:
        ftj = job(status={"phase": "Publishing"}, output={"destination": None, "secretRef": None})
        decision = run(ftj, **published(publish_pods=[]))
        assert decision.status.adapter is not None
        assert decision.status.adapter.uri == "pvc://support-bot-workspace/adapter"

    def test_a_failed_publish_fails_the_job_and_keeps_the_volume(self) -> None:
        message = "oci://registry.example/adapters/support-bot:v1: the registry refused the credentials (401)"
        decision = run(
            job(status={"phase": "Publishing"}),
            training_jobs=[training_job(0, "complete")],
            publish_job=publish_job("failed", "PodFailurePolicy"),
            publish_pods=[pod(0, "Failed", exit_code=2, message=message)],
            **ready_nodes(),
        )
        assert decision.status.phase == "Failed"
        status, reason, text = condition(decision, conditions.FAILED)
        assert (status, reason) == ("True", conditions.PUBLISH_FAILED)
        assert "401" in text
        assert "support-bot-workspace" in text
        assert not any(d[1] == "PersistentVolumeClaim" for d in decision.delete)
        assert pools_deleted(decision) == [TRAIN_POOL]

    def test_release_on_delete_keeps_the_pool(self) -> None:
        decision = run(
            job(runPolicy={"releaseNodes": "OnDelete"}), training_jobs=[training_job(0, "complete")], **ready_nodes()
        )
        assert decision.delete == []
        (kept,) = [m for m in decision.apply if m["kind"] == "NodePool"]
        assert kept["spec"]["disruption"]["consolidateAfter"] == "Never"

    def test_a_permanent_failure_fails_once_with_the_trainers_reason(self) -> None:
        decision = run(
            job(),
            training_jobs=[training_job(0, "failed", "PodFailurePolicy")],
            pods=[pod(0, "Failed", 2, "dataset: no column named 'text' (found: question, answer)")],
            **ready_nodes(),
        )
        assert decision.status.phase == "Failed"
        status, reason, message = condition(decision, conditions.FAILED)
        assert (status, reason) == ("True", conditions.PERMANENT_FAILURE)
        assert "no column named 'text'" in message
        assert not any(m["kind"] == "Job" for m in decision.create), "no restart loop"
        assert decision.status.restarts == 0

    def test_a_retryable_failure_restarts_the_gang_as_a_new_attempt(self) -> None:
        decision = run(
            job(),
            training_jobs=[training_job(0, "failed", "BackoffLimitExceeded")],
            pods=[pod(0, "Failed", 137)],
            **ready_nodes(),
        )
        (training,) = [m for m in decision.create if m["kind"] == "Job"]
        assert training["metadata"]["name"] == "support-bot-train-1"
        assert decision.status.restarts == 1
        assert decision.status.phase == "Initializing"
        assert any(e.reason == conditions.RESTARTING for e in decision.events)

    def test_restarts_are_bounded(self) -> None:
        history = [training_job(i, "failed", "BackoffLimitExceeded") for i in range(4)]
        decision = run(job(runPolicy={"maxRestarts": 3}), training_jobs=history, **ready_nodes())
        assert decision.status.phase == "Failed"
        assert condition(decision, conditions.FAILED)[1] == conditions.RESTARTS_EXHAUSTED
        assert decision.status.restarts == 3
        assert not any(m["kind"] == "Job" for m in decision.create)

    def test_deadline_is_permanent(self) -> None:
        decision = run(job(), training_jobs=[training_job(0, "failed", "DeadlineExceeded")], **ready_nodes())
        assert condition(decision, conditions.FAILED)[1] == conditions.DEADLINE_EXCEEDED


class TestSuspendAndQueue:
    def test_suspend_stops_the_pods_and_keeps_the_job(self) -> None:
        decision = run(
            job(runPolicy={"suspend": True}),
            training_jobs=[training_job(0, "active")],
            pods=[pod(0), pod(1)],
            **ready_nodes(),
        )
        assert decision.status.phase == "Suspended"
        assert [patch for _, patch in decision.patch] == [{"spec": {"suspend": True}}]

    def test_resume_unsuspends(self) -> None:
        decision = run(job(), training_jobs=[training_job(0, "suspended")], **ready_nodes())
        assert [patch for _, patch in decision.patch] == [{"spec": {"suspend": False}}]


def workload(**conds: tuple[str, str, str]) -> dict[str, Any]:
    """Kueue's Workload with conditions given as type=(status, reason, message)."""
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {"name": "job-support-bot-train-0-1a2b3", "namespace": "ml"},
        "status": {
            "conditions": [
                {"type": kind, "status": status, "reason": reason, "message": message}
                for kind, (status, reason, message) in conds.items()
            ]
        },
    }


class TestKueue:
    """runPolicy.queueName: nothing that costs money before Kueue admits the job."""

    def queued(self, **run_policy: Any) -> FineTuneJob:
        return job(runPolicy={"queueName": "team-a", **run_policy})

    def test_the_first_pass_creates_the_suspended_job_and_no_pool(self) -> None:
        decision = run(self.queued())
        (training,) = [m for m in decision.create if m["kind"] == "Job"]
        assert training["spec"]["suspend"] is True
        assert training["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert applied(decision) == [], "no NodePool before admission"
        assert decision.status.phase == "Queued"
        assert condition(decision, conditions.NODES_READY)[1] == conditions.QUEUED

    def test_waiting_quotes_kueues_reason_and_keeps_no_pool(self) -> None:
        quota = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in flavor a100, 16 more needed"
        waiting = workload(QuotaReserved=("False", "Pending", quota))
        decision = run(self.queued(), training_jobs=[training_job(0, "suspended")], workload=waiting)
        assert decision.status.phase == "Queued"
        status, reason, message = condition(decision, conditions.TRAINING)
        assert (status, reason) == ("False", conditions.QUEUED)
        assert f"QuotaReserved False, Pending: {quota}" in message
        assert applied(decision) == []
        assert decision.create == []
        assert decision.patch == [], "Kueue owns suspend"

    def test_admitted_brings_the_pool_and_the_pods_then_train(self) -> None:
        admitted = run(self.queued(), training_jobs=[training_job(0, "pending")], pods=[pod(0, "Pending")])
        assert applied(admitted) == [TRAIN_POOL]
        assert admitted.status.phase == "Provisioning"
        training = run(self.queued(), training_jobs=[training_job(0, "active")], pods=[pod(0), pod(1)], **ready_nodes())
        assert training.status.phase == "Training"

    def test_an_evicted_job_goes_back_to_the_queue_and_releases_its_nodes(self) -> None:
        evicted = workload(
            Evicted=("True", "Preempted", "Preempted to accommodate a workload (UID: 9f) due to prioritization"),
            QuotaReserved=("False", "Pending", "insufficient unused quota for nvidia.com/gpu in flavor a100"),
        )
        decision = run(self.queued(), training_jobs=[training_job(0, "suspended")], workload=evicted, **ready_nodes())
        assert decision.status.phase == "Queued"
        assert pools_deleted(decision) == [TRAIN_POOL]
        assert applied(decision) == []
        message = condition(decision, conditions.TRAINING)[2]
        assert "evicted by Kueue (Preempted: Preempted to accommodate" in message
        assert "resumes from its last checkpoint" in message

    def test_no_workload_yet_says_so(self) -> None:
        decision = run(self.queued(), training_jobs=[training_job(0, "suspended")])
        assert "Kueue has not made a Workload" in condition(decision, conditions.TRAINING)[2]

    def test_a_suspended_job_in_a_queue_gets_no_pool(self) -> None:
        decision = run(self.queued(suspend=True), training_jobs=[training_job(0, "suspended")], **ready_nodes())
        assert decision.status.phase == "Suspended"
        assert pools_deleted(decision) == [TRAIN_POOL], "no node is held for a job that is not admitted"
        assert applied(decision) == []

    def test_the_users_suspend_still_suspends_an_admitted_job(self) -> None:
        decision = run(
            self.queued(suspend=True), training_jobs=[training_job(0, "active")], pods=[pod(0), pod(1)], **ready_nodes()
        )
        assert decision.status.phase == "Suspended"
        assert [patch for _, patch in decision.patch] == [{"spec": {"suspend": True}}]


def deployment(ready: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "support-bot-serve", "namespace": "ml"},
        "status": {"readyReplicas": ready} if ready else {},
    }


class TestServing:
    def serving_job(self, **serving: Any) -> FineTuneJob:
        return job(status={"phase": "Complete"}, serving={"enabled": True, "runtime": "transformers", **serving})

    def test_published_with_serving_deploys_the_server_and_says_it_is_starting(self) -> None:
        decision = run(self.serving_job(), **published())
        assert decision.status.phase == "Serving"
        kinds = sorted((m["kind"], m["metadata"]["name"]) for m in decision.apply)
        assert kinds == [
            ("Deployment", "support-bot-serve"),
            ("NodePool", SERVE_POOL),
            ("Service", "support-bot-serve"),
        ]
        assert pools_deleted(decision) == [TRAIN_POOL], "training nodes go, the server gets its own pool"
        deployed_pod = next(m for m in decision.apply if m["kind"] == "Deployment")["spec"]["template"]["spec"]
        assert deployed_pod["nodeSelector"][names.NODEPOOL_LABEL] == SERVE_POOL
        status, reason, _ = condition(decision, conditions.SERVING_READY)
        assert (status, reason) == ("False", conditions.SERVING_STARTING)
        assert decision.status.endpoint is not None
        assert decision.status.endpoint.url == "http://support-bot-serve.ml.svc:8000/v1"
        assert decision.status.endpoint.model_name == "support-bot"
        assert decision.requeue_after == 5.0
        deployed = next(m for m in decision.apply if m["kind"] == "Deployment")
        inits = {c["name"]: c["command"] for c in deployed["spec"]["template"]["spec"]["initContainers"]}
        command = inits["pull-adapter"]
        assert command[:3] == ["kubetune", "pull", "oci://registry.example/adapters/support-bot:v1"]

    def test_a_ready_replica_makes_serving_ready(self) -> None:
        decision = run(self.serving_job(modelName="bot"), **published(deployment=deployment(1)))
        status, reason, message = condition(decision, conditions.SERVING_READY)
        assert (status, reason) == ("True", conditions.SERVING)
        assert "model bot at http://support-bot-serve.ml.svc:8000/v1" in message
        assert decision.status.phase == "Serving"

    def test_a_failing_serving_claim_is_explained(self) -> None:
        failing = claim(f"{SERVE_POOL}-0", failed="InsufficientCapacity", launched="Unknown")
        decision = run(self.serving_job(), **published(deployment=deployment(0), serving_claims=[failing]))
        message = condition(decision, conditions.SERVING_READY)[2]
        assert f"{SERVE_POOL}-0: InsufficientCapacity" in message

    def test_turning_serving_off_removes_server_and_nodes(self) -> None:
        serving_claim = claim(f"{SERVE_POOL}-0")
        ftj = job(status={"phase": "Serving"}, serving={"enabled": False})
        observed = published(deployment=deployment(1), serving_claims=[serving_claim], node_pools=[pool(SERVE_POOL)])
        decision = run(ftj, **observed)
        assert decision.status.phase == "Complete"
        deleted = {(d[1], d[3]) for d in decision.delete}
        assert {("Deployment", "support-bot-serve"), ("Service", "support-bot-serve")} <= deleted
        assert ("NodePool", SERVE_POOL) in deleted
        assert decision.status.endpoint is None
        assert condition(decision, conditions.SERVING_READY)[:2] == ("False", conditions.SERVING_DISABLED)

    def test_fewer_replicas_shrink_the_serving_pool(self) -> None:
        claims = [claim(f"{SERVE_POOL}-0"), claim(f"{SERVE_POOL}-1")]
        decision = run(self.serving_job(replicas=1), **published(deployment=deployment(1), serving_claims=claims))
        (serving_pool,) = [m for m in decision.apply if m["kind"] == "NodePool"]
        assert serving_pool["spec"]["limits"]["nodes"] == "1"

    def test_a_failed_job_stops_its_server_and_its_pool(self) -> None:
        decision = run(
            job(status={"phase": "Publishing"}),
            training_jobs=[training_job(0, "complete")],
            publish_job=publish_job("failed", "PodFailurePolicy"),
            publish_pods=[pod(0, "Failed", exit_code=2, message="401")],
            **{**ready_nodes(), "node_pools": [pool(), pool(SERVE_POOL)]},
        )
        assert pools_deleted(decision) == [SERVE_POOL, TRAIN_POOL]


# ---------------------------------------------------------------------------------- pre-flight

#: Phi-3-mini's shape (the example's model) and Llama 3.1 8B's.
PHI3_MINI = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32064,
    "tie_word_embeddings": False,
}
LLAMA_8B = dict(LLAMA_8B_CONFIG)


def checked(example: str = "karpenter-aks", **spec_patch: Any) -> FineTuneJob:
    """A job whose pre-flight is on (the default)."""
    return job(example, preflight={"enabled": True}, **spec_patch)


def preflight_job(state: str = "complete", *, annotation: dict[str, Any] | None = None) -> dict[str, Any]:
    conds: list[dict[str, str]] = []
    if state == "complete":
        conds = [{"type": "Complete", "status": "True"}]
    elif state == "failed":
        conds = [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit 2"}]
    meta: dict[str, Any] = {
        "name": "support-bot-preflight",
        "namespace": "ml",
        "labels": {names.ROLE_LABEL: "preflight"},
    }
    if annotation is not None:
        meta["annotations"] = {names.RESULT_ANNOTATION: json.dumps(annotation)}
    status = {"startTime": "2026-11-29T10:00:00Z", "completionTime": "2026-11-29T10:00:21Z", "conditions": conds}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": {}, "status": status}


def preflight_pod(exit_code: int, message: str) -> dict[str, Any]:
    state = {"terminated": {"exitCode": exit_code, "message": message}}
    return {
        "metadata": {"name": "support-bot-preflight-x1"},
        "status": {
            "phase": "Failed" if exit_code else "Succeeded",
            "containerStatuses": [{"name": "preflight", "state": state}],
        },
    }


def findings(model_config: dict[str, Any] | None = PHI3_MINI, *, kept: bool = True) -> dict[str, Any]:
    return {
        "format": "messages",
        "records": 1200,
        "trainExamples": 1140,
        "evalExamples": 60,
        "tokens": 512345,
        "truncated": 7,
        "dropped": 1,
        "kept": kept,
        "modelConfig": model_config,
    }


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return [f"{o['kind']}/{o['metadata']['name']}" for o in objects]


class TestPreflight:
    def test_a_new_job_runs_its_preflight_on_a_cpu_and_claims_no_node(self) -> None:
        decision = run(checked())
        assert decision.status.phase == "Preflight"
        created = kinds(decision.create)
        assert created == ["PersistentVolumeClaim/support-bot-workspace", "Job/support-bot-preflight"]
        assert not applied(decision), "no NodePool before the pre-flight passed"
        assert kinds(decision.apply) == ["ConfigMap/support-bot-config"]
        spec = decision.create[1]["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert container["command"][:2] == ["kubetune", "preflight"]
        assert "--keep" in container["command"]
        assert "nodeSelector" not in spec
        assert "tolerations" not in spec
        assert spec["automountServiceAccountToken"] is False
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])
        assert {v["name"] for v in spec["volumes"]} >= {"config", "workspace"}
        # The output's push credentials are not the pre-flight's business.
        assert "push-creds" not in json.dumps(spec["volumes"])
        assert "hf-token" in json.dumps(spec["volumes"])
        status, reason, _ = condition(decision, conditions.PREFLIGHT_PASSED)
        assert (status, reason) == ("False", conditions.PREFLIGHT_RUNNING)

    def test_a_read_write_once_volume_is_not_mounted_by_the_preflight(self) -> None:
        decision = run(checked(distributed={"nodes": 1}))
        spec = decision.create[-1]["spec"]["template"]["spec"]
        workspace = next(v for v in spec["volumes"] if v["name"] == "workspace")
        assert "emptyDir" in workspace
        assert "--keep" not in spec["containers"][0]["command"]
        assert kinds(decision.create) == ["Job/support-bot-preflight"]  # the volume comes with training

    def test_a_running_preflight_is_not_created_again_and_says_what_its_pod_waits_for(self) -> None:
        waiting = {
            "metadata": {"name": "support-bot-preflight-x1"},
            "status": {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "name": "preflight",
                        "state": {
                            "waiting": {
                                "reason": "CreateContainerConfigError",
                                "message": 'secret "hf-token" not found',
                            }
                        },
                    }
                ],
            },
        }
        decision = run(checked(), preflight_job=preflight_job("active"), preflight_pods=[waiting])
        assert decision.create == []
        assert 'secret "hf-token" not found' in condition(decision, conditions.PREFLIGHT_PASSED)[2]

    def test_a_failed_preflight_fails_the_job_with_the_trainers_message_and_no_node(self) -> None:
        message = "the dataset does not match its format (1 problem): spec.dataset.format: format messages needs column(s) ['messages']"
        decision = run(checked(), preflight_job=preflight_job("failed"), preflight_pods=[preflight_pod(2, message)])
        assert decision.status.phase == "Failed"
        status, reason, text = condition(decision, conditions.FAILED)
        assert (status, reason) == ("True", conditions.PREFLIGHT_FAILED)
        assert "before any node was provisioned" in text
        assert message in text
        assert condition(decision, conditions.PREFLIGHT_PASSED)[:2] == ("False", conditions.PREFLIGHT_FAILED)
        assert decision.create == []
        assert decision.status.completion_time is not None

    def test_a_passed_preflight_is_recorded_and_the_nodes_are_claimed(self) -> None:
        found = findings()
        pods = [preflight_pod(0, "some log line\n" + json.dumps(found))]
        decision = run(checked(), preflight_job=preflight_job(), preflight_pods=pods)
        assert [p for _, p in decision.patch] == [
            {
                "metadata": {
                    "annotations": {names.RESULT_ANNOTATION: json.dumps(found, separators=(",", ":"), sort_keys=True)}
                }
            }
        ]
        assert applied(decision) == [TRAIN_POOL]
        assert decision.status.phase == "Provisioning"
        status, reason, message = condition(decision, conditions.PREFLIGHT_PASSED)
        assert (status, reason) == ("True", conditions.PREFLIGHT_OK)
        assert "1140 train / 60 eval examples" in message
        assert "512,345 tokens" in message
        assert "7 truncated" in message
        assert "A100 40 GiB (Standard_ND96asr_v4)" in message
        preflight = decision.status.preflight
        assert preflight is not None
        assert (preflight.records, preflight.tokens, preflight.truncated, preflight.fits) == (1200, 512345, 7, True)
        assert preflight.device_memory_gib == 40
        assert preflight.predicted_peak_gib is not None
        assert 0 < preflight.predicted_peak_gib < 40
        assert preflight.duration_seconds == 21
        assert preflight.model_parameters is not None
        assert 3.5e9 < preflight.model_parameters < 4.0e9
        assert [e.reason for e in decision.events] == [conditions.PREFLIGHT_OK, "Provisioning"]

    def test_recorded_findings_are_read_from_the_job_and_training_reuses_the_kept_data(self) -> None:
        decision = run(checked(), preflight_job=preflight_job(annotation=findings()), **ready_nodes())
        assert decision.patch == []
        config_map = next(o for o in decision.apply if o["kind"] == "ConfigMap")
        assert json.loads(config_map["data"]["config.json"])["reusePreparedData"] is True
        assert any(o["kind"] == "Job" and o["metadata"]["name"] == "support-bot-train-0" for o in decision.create)

    def test_without_kept_data_training_prepares_it_again(self) -> None:
        decision = run(checked(), preflight_job=preflight_job(annotation=findings(kept=False)), **ready_nodes())
        config_map = next(o for o in decision.apply if o["kind"] == "ConfigMap")
        assert json.loads(config_map["data"]["config.json"])["reusePreparedData"] is False

    def test_a_job_that_would_not_fit_fails_with_what_would_and_claims_no_node(self) -> None:
        big = checked(
            method={"type": "full", "lora": None, "quantization": None},
            distributed={"nodes": 1, "processesPerNode": 1, "deepspeed": {"zeroStage": 0}},
            resources={"instanceType": "g5.xlarge"},
        )
        decision = run(big, preflight_job=preflight_job(annotation=findings(LLAMA_8B)))
        assert decision.status.phase == "Failed"
        assert not applied(decision), "no NodePool before the pre-flight passed"
        status, reason, message = condition(decision, conditions.FAILED)
        assert (status, reason) == ("True", conditions.WOULD_NOT_FIT)
        assert "A10G 24 GiB (g5.xlarge)" in message
        assert "would fit: " in message
        assert "qlora" in message
        assert decision.status.preflight is not None
        assert decision.status.preflight.fits is False

    def test_an_unknown_instance_type_is_planned_without_a_verdict_and_says_how_to_get_one(self) -> None:
        decision = run(
            checked(resources={"instanceType": "Standard_Unknown_v9"}),
            preflight_job=preflight_job(annotation=findings()),
        )
        status, _, message = condition(decision, conditions.PREFLIGHT_PASSED)
        assert status == "True"
        assert "set resources.gpuMemoryGiB" in message
        assert decision.status.preflight is not None
        assert decision.status.preflight.fits is None
        pinned = run(
            checked(resources={"instanceType": "Standard_Unknown_v9", "gpuMemoryGiB": 1, "gpusPerNode": 8}),
            preflight_job=preflight_job(annotation=findings()),
        )
        assert condition(pinned, conditions.FAILED)[1] == conditions.WOULD_NOT_FIT

    def test_byo_nodes_tell_their_gpu_memory_by_label(self) -> None:
        labelled = node("gpu-a", labels={"gpu-pool": "a100", "nvidia.com/gpu.memory": "16384"})
        decision = run(
            checked("byo-gpu-nodes"), preflight_job=preflight_job(annotation=findings(LLAMA_8B)), nodes=[labelled]
        )
        assert decision.status.preflight is not None
        assert decision.status.preflight.device_memory_gib == 16
        assert "nvidia.com/gpu.memory" in decision.status.preflight.device

    def test_a_prediction_never_fails_a_job_that_is_training(self) -> None:
        big = checked(resources={"instanceType": "Standard_Unknown_v9", "gpuMemoryGiB": 1, "gpusPerNode": 8})
        decision = run(
            big,
            preflight_job=preflight_job(annotation=findings()),
            training_jobs=[training_job(0, "active")],
            pods=[pod(0), pod(1)],
            **ready_nodes(),
        )
        assert decision.status.phase == "Training"
        assert "does NOT fit" in condition(decision, conditions.PREFLIGHT_PASSED)[2]

    def test_switched_off_it_goes_straight_to_the_nodes(self) -> None:
        decision = run(job())
        assert not conditions.get(decision.status.conditions, conditions.PREFLIGHT_PASSED)
        assert applied(decision) == [TRAIN_POOL]


def karpenter_event(name: str, reason: str, message: str, at: datetime.datetime, *, minutes: int = 0) -> dict[str, Any]:
    """A Warning event Karpenter leaves on a NodeClaim (in namespace default, as the apiserver returns it)."""
    when = (at + datetime.timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "involvedObject": {"apiVersion": "karpenter.sh/v1", "kind": "NodeClaim", "name": name},
        "reason": reason,
        "message": f"NodeClaim {name} event: {message}",
        "type": "Warning",
        "lastTimestamp": when,
    }
