"""The operator driving real training on the local runtime: a 2-node ZeRO-2 LoRA job end to end,
a killed trainer resuming from its checkpoint, a bad dataset failing once, sources on private
servers (http, S3) read once the admins allow their network, and an operator SIGKILLed
throughout a job's life without duplicating anything.

Training pods are real processes running ``kubetune train`` on a tiny Llama the test writes into
a PersistentVolumeClaim (nothing is downloaded).
"""

from __future__ import annotations

import json
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubetune_local import cluster
from tests.conftest import OciRegistry
from tests.factories import create_job, finetunejob, read_job, serve_folder, serve_s3, wait_until
from tests.integration.conftest import OperatorProcess
from tests.integration.test_operator import delete_and_expect_nothing_left

pytestmark = [pytest.mark.integration, pytest.mark.trainer]


def toy_claim(api: client.ApiClient, namespace: str, *, bad_data: bool = False, fmt: str = "prompt-completion") -> Path:
    """A ReadWriteMany claim `models` holding the toy base model and data; returns its folder."""
    from kubetune_trainer.toy import build_toy  # noqa: PLC0415 - torch only where training is tested

    core = client.CoreV1Api(api)
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "models"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )

    def bound() -> str | None:
        claim = core.read_namespaced_persistent_volume_claim("models", namespace)
        return claim.spec.volume_name if claim.status.phase == "Bound" else None

    volume = core.read_persistent_volume(wait_until(bound, what="the models claim to bind"))
    folder = Path(volume.spec.host_path.path)
    build_toy(folder, fmt=fmt)
    if bad_data:
        (folder / "data" / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n' * 20, encoding="utf-8")
    return folder


def toy_job(name: str, *, steps: int, nodes: int = 2, zero: int = 2, every: int = 10) -> dict[str, Any]:
    """The toy model learning its facts on ``nodes`` CPU nodes of the local runtime under ZeRO ``zero``."""
    return finetunejob(
        name,
        model={"source": "pvc://models/model"},
        dataset={"maxSeqLength": 32},
        method={"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        training={
            "maxSteps": steps,
            "learningRate": 3.0e-3,
            "lrScheduler": "constant",
            "warmupRatio": 0,
            "batchSizePerDevice": 8,
            "precision": "fp32",
            "gradientCheckpointing": False,
            "checkpointEverySteps": every,
            "loggingEverySteps": 2,
        },
        distributed={"nodes": nodes, "processesPerNode": 1, "deepspeed": {"zeroStage": zero}},
        resources={"provisioner": "karpenter", "instanceType": "local-cpu", "gpusPerNode": 0, "cpu": "1"},
        runPolicy={"maxRestarts": 2},
    )


def phase(api: client.ApiClient, namespace: str, name: str) -> str:
    return str(read_job(api, namespace, name).get("status", {}).get("phase", ""))


def ended(api: client.ApiClient, namespace: str, name: str) -> str | None:
    current = phase(api, namespace, name)
    return current if current in ("Complete", "Failed") else None


@pytest.mark.usefixtures("operator")
def test_two_node_zero2_lora_job_completes_with_progress_and_releases_its_claims(
    api: client.ApiClient, namespace: str
) -> None:
    folder = toy_claim(api, namespace)
    body = toy_job("lora2", steps=120, every=40)
    body["spec"]["preflight"] = {"enabled": True}  # the path `make demo` takes: checked, then provisioned
    create_job(api, namespace, body)
    seen_progress: list[dict[str, Any]] = []

    def finished_while_watching() -> str | None:
        status = read_job(api, namespace, "lora2").get("status", {})
        if status.get("phase") == "Training" and status.get("progress", {}).get("step"):
            seen_progress.append(status["progress"])
        return ended(api, namespace, "lora2")

    result = wait_until(finished_while_watching, timeout=600, what="the 2-node job to end")
    status = read_job(api, namespace, "lora2")["status"]
    assert result == "Complete", json.dumps(status, indent=1)
    assert seen_progress, "status.progress showed steps while training"
    assert any(p.get("loss") is not None for p in seen_progress)
    assert status["progress"]["percent"] == 100
    jobs = client.BatchV1Api(api).list_namespaced_job(namespace).items
    assert sorted(j.metadata.name for j in jobs) == ["lora2-preflight", "lora2-publish", "lora2-train-0"]
    preflight = next(c for c in status["conditions"] if c["type"] == "PreflightPassed")
    assert preflight["status"] == "True", preflight
    assert status["preflight"]["preparedDataKept"] is True
    assert status["preflight"]["tokens"] > 0
    assert next(j for j in jobs if j.metadata.name == "lora2-train-0").spec.completions == 2
    workspace = client.CoreV1Api(api).read_namespaced_persistent_volume_claim("lora2-workspace", namespace)
    output = Path(client.CoreV1Api(api).read_persistent_volume(workspace.spec.volume_name).spec.host_path.path)
    assert (output / "adapter" / "adapter_model.safetensors").exists()
    assert (output / "adapter" / "adapter_config.json").exists()
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 120
    assert status["adapter"]["uri"] == "pvc://lora2-workspace/adapter"
    sizes = sum(f.stat().st_size for f in (output / "adapter").rglob("*") if f.is_file())
    assert status["adapter"]["sizeBytes"] == sizes
    assert status["adapter"]["digest"].startswith("sha256:")
    assert folder.exists()

    def released() -> bool:
        claims = client.CustomObjectsApi(api).list_cluster_custom_object("karpenter.sh", "v1", "nodeclaims")["items"]
        return not [c for c in claims if c["metadata"]["labels"].get("kubetune.io/namespace") == namespace]

    wait_until(released, what="the job's NodeClaims to be released after completion")
    delete_and_expect_nothing_left(api, namespace, "lora2")


@pytest.mark.usefixtures("operator")
def test_a_deleted_trainer_pod_restarts_the_gang_and_deleting_the_job_leaks_nothing(
    api: client.ApiClient, namespace: str
) -> None:
    toy_claim(api, namespace)
    create_job(api, namespace, toy_job("midway", steps=2000, every=500))

    def training() -> bool:
        status = read_job(api, namespace, "midway").get("status", {})
        return status.get("phase") == "Training" and bool((status.get("progress") or {}).get("step"))

    wait_until(training, timeout=300, what="the job to be training")
    # A deleted pod ends Failed (the kubelet's final status), the Job lets it go and fails, and the
    # operator restarts the gang: no pod stays Terminating, no job stays "Training" on a pod that is gone.
    core = client.CoreV1Api(api)
    victim = next(
        p.metadata.name
        for p in core.list_namespaced_pod(namespace, label_selector="kubetune.io/attempt=0").items
        if p.metadata.name.startswith("midway-train-0-1")
    )
    core.delete_namespaced_pod(victim, namespace)

    def gone() -> bool:
        return victim not in {p.metadata.name for p in core.list_namespaced_pod(namespace).items}

    wait_until(gone, timeout=60, what=f"the deleted pod {victim} to go")

    def restarted() -> dict[str, Any] | None:
        status: dict[str, Any] = read_job(api, namespace, "midway").get("status", {})
        return status if status.get("restarts") == 1 else None

    status = wait_until(restarted, timeout=60, what="the gang to restart as attempt 1")
    assert status["workload"]["jobName"] == "midway-train-1"
    delete_and_expect_nothing_left(api, namespace, "midway")


def _kill_trainer(local_cluster: cluster.Cluster, api: client.ApiClient, namespace: str, pod_name: str) -> None:
    uid = client.CoreV1Api(api).read_namespaced_pod(pod_name, namespace).metadata.uid
    marker = f"KUBETUNE_LOCAL_POD={uid}".encode()
    killed = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
                    killed += 1
            except OSError:
                continue
    assert killed, f"no process of pod {pod_name} found"


@pytest.mark.usefixtures("operator")
def test_a_killed_trainer_pod_restarts_the_gang_from_its_checkpoint(
    local_cluster: cluster.Cluster, api: client.ApiClient, namespace: str
) -> None:
    toy_claim(api, namespace)
    create_job(api, namespace, toy_job("resume", steps=60, every=10))

    def past_a_checkpoint() -> bool:
        progress = read_job(api, namespace, "resume").get("status", {}).get("progress") or {}
        return int(progress.get("step") or 0) >= 15

    wait_until(past_a_checkpoint, timeout=600, what="training to pass its first checkpoint")
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="kubetune.io/attempt=0").items
    _kill_trainer(
        local_cluster,
        api,
        namespace,
        next(p.metadata.name for p in pods if p.metadata.name.startswith("resume-train-0-1")),
    )
    assert wait_until(lambda: ended(api, namespace, "resume"), timeout=900, what="the job to end") == "Complete"
    status = read_job(api, namespace, "resume")["status"]
    assert status["restarts"] == 1
    assert status["progress"]["step"] == 60
    jobs = sorted(j.metadata.name for j in client.BatchV1Api(api).list_namespaced_job(namespace).items)
    assert jobs == ["resume-publish", "resume-train-0", "resume-train-1"]
    log = cluster.pod_log(
        local_cluster.home,
        next(
            p.metadata.name
            for p in client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="kubetune.io/attempt=1").items
            if p.metadata.name.startswith("resume-train-1-0")
        ),
        namespace=namespace,
    )
    assert "checkpoint-" in log, "the second attempt resumed from a checkpoint"
    assert "resum" in log.lower(), "the second attempt resumed from a checkpoint"


@pytest.mark.usefixtures("operator")
def test_a_bad_dataset_fails_once_with_a_dataset_reason(api: client.ApiClient, namespace: str) -> None:
    toy_claim(api, namespace, bad_data=True)
    create_job(api, namespace, toy_job("baddata", steps=10, nodes=1))
    assert wait_until(lambda: ended(api, namespace, "baddata"), timeout=300, what="the job to fail") == "Failed"
    status = read_job(api, namespace, "baddata")["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PermanentFailure"
    assert "question" in failed["message"], "names the columns it found"
    assert "answer" in failed["message"], "names the columns it found"
    assert status["restarts"] == 0
    time.sleep(5)
    jobs = client.BatchV1Api(api).list_namespaced_job(namespace).items
    assert [j.metadata.name for j in jobs] == ["baddata-train-0"], "no restart loop"


def test_a_dataset_on_an_in_cluster_server_is_read_once_the_admins_allow_its_network(
    operator: OperatorProcess, api: client.ApiClient, namespace: str
) -> None:
    """A URL source on a private address fails the job for good, naming the operator's allow-list
    (users cannot reach the TrainerConfig); once the operator allows the network, the job trains."""
    folder = toy_claim(api, namespace)
    with serve_folder(folder / "data") as url:
        refused = toy_job("private-data", steps=4, nodes=1)
        refused["spec"]["dataset"]["source"] = f"{url}/train.jsonl"
        create_job(api, namespace, refused)
        assert (
            wait_until(lambda: ended(api, namespace, "private-data"), timeout=300, what="the job to fail") == "Failed"
        )
        failed = next(
            c for c in read_job(api, namespace, "private-data")["status"]["conditions"] if c["type"] == "Failed"
        )
        assert failed["reason"] == "PermanentFailure"
        assert "a loopback address" in failed["message"]
        assert "--allow-private-network" in failed["message"], "names the setting that allows it"
        operator.stop()
        operator.extra_args = ("--allow-private-network", "127.0.0.0/8")
        operator.start()
        try:
            allowed = toy_job("allowed-data", steps=4, nodes=1)
            allowed["spec"]["dataset"]["source"] = f"{url}/train.jsonl"
            create_job(api, namespace, allowed)
            done = wait_until(lambda: ended(api, namespace, "allowed-data"), timeout=300, what="the job to end")
            assert done == "Complete", read_job(api, namespace, "allowed-data")["status"]
        finally:
            operator.stop()
            operator.extra_args = ()
            operator.start()


def test_models_and_datasets_in_s3_and_in_a_registry_are_read_with_the_secrets_keys(
    operator: OperatorProcess, api: client.ApiClient, namespace: str, oci_registry: OciRegistry, tmp_path: Path
) -> None:
    """Two toy jobs at once: one reads its model (a prefix) and data (one object) from a real S3 server on
    loopback (moto), the keys and the endpoint in a Secret; the other its model (kubetune's image layout)
    and data (an ORAS-style file) from a real registry on loopback, with a dockerconfigjson Secret. Both
    train to Complete."""
    from kubetune_trainer.oci import transfer  # noqa: PLC0415 - the trainer's stack only where training is tested
    from kubetune_trainer.oci.credentials import Credentials  # noqa: PLC0415
    from kubetune_trainer.oci.reference import Reference  # noqa: PLC0415
    from kubetune_trainer.toy import build_toy  # noqa: PLC0415

    toy = build_toy(tmp_path / "toy")
    model_files = {
        p.relative_to(toy / "model").as_posix(): p for p in sorted((toy / "model").rglob("*")) if p.is_file()
    }
    objects: dict[str, bytes | str] = {f"toy/model/{name}": path.read_bytes() for name, path in model_files.items()}
    objects["toy/data/train.jsonl"] = (toy / "data" / "train.jsonl").read_bytes()
    credentials = Credentials(oci_registry.user, oci_registry.password)
    model_ref = Reference.parse(f"oci://{oci_registry.host}/team/toy-model:v1")
    data_ref = Reference.parse(f"oci://{oci_registry.host}/team/toy-data:v1")
    transfer.push(model_files, model_ref, credentials=credentials, credential_source="the test")
    transfer.push(
        {"train.jsonl": toy / "data" / "train.jsonl"}, data_ref, credentials=credentials, credential_source="the test"
    )
    docker_config = oci_registry.docker_config(tmp_path / "docker").read_text(encoding="utf-8")
    core = client.CoreV1Api(api)
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "regcred"},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": docker_config},
        },
    )
    with serve_s3() as s3:
        s3.put("team-models", objects)
        core.create_namespaced_secret(namespace, {"metadata": {"name": "s3-keys"}, "stringData": s3.secret_data()})
        from_s3 = toy_job("from-s3", steps=4, nodes=1)
        from_s3["spec"]["model"] = {"source": "s3://team-models/toy/model/", "secretRef": "s3-keys"}
        from_s3["spec"]["dataset"].update(source="s3://team-models/toy/data/train.jsonl", secretRef="s3-keys")
        from_oci = toy_job("from-oci", steps=4, nodes=1)
        from_oci["spec"]["model"] = {"source": str(model_ref), "secretRef": "regcred"}
        from_oci["spec"]["dataset"].update(source=str(data_ref), secretRef="regcred")
        operator.stop()
        operator.extra_args = ("--allow-private-network", "127.0.0.0/8")
        operator.start()
        try:
            create_job(api, namespace, from_s3)
            create_job(api, namespace, from_oci)
            for name in ("from-s3", "from-oci"):
                done = wait_until(partial(ended, api, namespace, name), timeout=300, what=f"{name} to end")
                assert done == "Complete", read_job(api, namespace, name)["status"]
        finally:
            operator.stop()
            operator.extra_args = ()
            operator.start()
