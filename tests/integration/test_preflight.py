"""The pre-flight on the local runtime: bad jobs fail on a CPU with no node ever created, a good one shows
its findings and trains on the data the pre-flight prepared.

Every NodePool, NodeClaim and Node the cluster creates is watched from before the jobs are applied; the jobs
use ``provisioner: karpenter``, so a pre-flight that let one through would show up as a pool.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from kubetune_local import cluster
from tests.factories import LLAMA_8B_CONFIG, create_job, read_job, wait_until
from tests.integration.test_operator import delete_and_expect_nothing_left
from tests.integration.test_operator_training import ended, toy_claim, toy_job

pytestmark = [pytest.mark.integration, pytest.mark.trainer]


class Creations:
    """Every NodePool, NodeClaim and Node ADDED while it runs (a watch each, started before the jobs exist)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self._stop = threading.Event()
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        self._threads = [
            threading.Thread(
                target=self._watch,
                args=("NodeClaim", custom.list_cluster_custom_object, "karpenter.sh", "v1", "nodeclaims"),
                daemon=True,
            ),
            threading.Thread(
                target=self._watch,
                args=("NodePool", custom.list_cluster_custom_object, "karpenter.sh", "v1", "nodepools"),
                daemon=True,
            ),
            threading.Thread(target=self._watch, args=("Node", core.list_node), daemon=True),
        ]
        self._ready = threading.Barrier(len(self._threads) + 1)

    def _watch(self, kind: str, lister: Any, *args: Any) -> None:
        custom = kind in ("NodeClaim", "NodePool")
        first = lister(*args, **({"_preload_content": False} if custom else {}))
        version = json.loads(first.data)["metadata"]["resourceVersion"] if custom else first.metadata.resource_version
        self._ready.wait()
        while not self._stop.is_set():
            for event in watch.Watch().stream(lister, *args, resource_version=version, timeout_seconds=2):
                obj = event["object"]
                meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata.to_dict()
                version = meta["resource_version"] if "resource_version" in meta else meta["resourceVersion"]
                if event["type"] == "ADDED":
                    self.seen.append((kind, meta["name"], dict(meta.get("labels") or {})))

    def __enter__(self) -> Creations:
        for thread in self._threads:
            thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(2)  # let the watches deliver what happened last
        self._stop.set()

    def of(self, namespace: str) -> list[tuple[str, str]]:
        return [(kind, name) for kind, name, labels in self.seen if labels.get("kubetune.io/namespace") == namespace]


def big_model(folder: Path) -> str:
    """`big/`: an 8B config.json with the toy tokenizer and a safetensors file (the pre-flight reads no weights)."""
    import numpy as np  # noqa: PLC0415
    from safetensors.numpy import save_file  # noqa: PLC0415 - trainer stack only where training is tested

    big = folder / "big"
    big.mkdir()
    for item in (folder / "model").iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")) or item.name.endswith(".model"):
            shutil.copy(item, big / item.name)
    (big / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG), encoding="utf-8")
    save_file({"model.embed_tokens.weight": np.zeros((1, 1), dtype=np.float32)}, str(big / "model.safetensors"))
    return "pvc://models/big"


def checked(name: str, **spec: Any) -> dict[str, Any]:
    body = toy_job(name, steps=20, nodes=1)
    body["spec"]["preflight"] = {"enabled": True}
    for key, value in spec.items():
        body["spec"][key] = value
    return body


def failed_condition(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    status = read_job(api, namespace, name)["status"]
    return next(c for c in status["conditions"] if c["type"] == "Failed")


@pytest.mark.usefixtures("operator")
def test_jobs_the_preflight_refuses_fail_with_its_reason_and_never_get_a_node(
    api: client.ApiClient, namespace: str
) -> None:
    folder = toy_claim(api, namespace)
    (folder / "data" / "wrong.jsonl").write_text('{"question": "q", "answer": "a"}\n' * 20, encoding="utf-8")
    big = big_model(folder)
    jobs = {
        "wrong-columns": checked(
            "wrong-columns", dataset={"source": "pvc://models/data/wrong.jsonl", "maxSeqLength": 32}
        ),
        "unreachable": checked(
            "unreachable", dataset={"source": "https://data.invalid/train.jsonl", "maxSeqLength": 32}
        ),
        "wrong-modules": checked(
            "wrong-modules",
            method={"type": "lora", "lora": {"r": 8, "alpha": 16, "targetModules": ["query_key_value"]}},
        ),
        "too-big": checked(
            "too-big",
            model={"source": big},
            method={"type": "full"},
            resources={"provisioner": "karpenter", "instanceType": "g5.xlarge", "cpu": "1"},
        ),
    }
    with Creations(api) as creations:
        applied = time.monotonic()
        for body in jobs.values():
            create_job(api, namespace, body)
        verdicts: dict[str, float] = {}

        def all_ended() -> bool | None:
            for name in jobs:
                if name not in verdicts and ended(api, namespace, name):
                    verdicts[name] = time.monotonic() - applied
            return len(verdicts) == len(jobs) or None

        wait_until(all_ended, timeout=420, what="every refused job to fail in its pre-flight")
    print(
        f"apply → pre-flight verdict, 4 jobs at once on 2 cores: {json.dumps({k: round(v, 1) for k, v in verdicts.items()})}"
    )
    for name in jobs:
        assert ended(api, namespace, name) == "Failed", name
    reasons = {name: failed_condition(api, namespace, name) for name in jobs}
    assert reasons["wrong-columns"]["reason"] == "PreflightFailed"
    assert "spec.dataset.format" in reasons["wrong-columns"]["message"]
    assert "['question', 'answer']" in reasons["wrong-columns"]["message"], "names the columns it found"
    assert reasons["unreachable"]["reason"] == "PreflightFailed"
    assert "cannot resolve 'data.invalid'" in reasons["unreachable"]["message"]
    assert reasons["wrong-modules"]["reason"] == "PreflightFailed"
    assert "spec.method.lora.targetModules" in reasons["wrong-modules"]["message"]
    assert "q_proj" in reasons["wrong-modules"]["message"], "names the modules that exist"
    assert reasons["too-big"]["reason"] == "WouldNotFit"
    assert "A10G 24 GiB (g5.xlarge)" in reasons["too-big"]["message"]
    assert "would fit:" in reasons["too-big"]["message"]
    for name in jobs:
        assert read_job(api, namespace, name)["status"].get("workload", {}).get("nodeClaims", []) == []
    assert creations.of(namespace) == [], "no NodePool, NodeClaim or Node was ever created for a refused job"
    batch = client.BatchV1Api(api)
    assert sorted(j.metadata.name for j in batch.list_namespaced_job(namespace).items) == sorted(
        f"{name}-preflight" for name in jobs
    ), "no training Job either"
    delete_and_expect_nothing_left(api, namespace, "too-big")


@pytest.mark.usefixtures("operator")
def test_a_good_job_shows_its_findings_and_trains_on_the_prepared_data(
    local_cluster: cluster.Cluster, api: client.ApiClient, namespace: str
) -> None:
    toy_claim(api, namespace)
    body = checked("good")
    body["spec"]["resources"]["storage"] = {"accessMode": "ReadWriteMany"}  # shared: the prepared data is kept
    create_job(api, namespace, body)
    applied = time.monotonic()

    def passed() -> dict[str, Any] | None:
        status = read_job(api, namespace, "good").get("status", {})
        found = next((c for c in status.get("conditions", []) if c["type"] == "PreflightPassed"), None)
        return found if found and found["status"] == "True" else None

    condition = wait_until(passed, timeout=300, what="the pre-flight to pass")
    print(f"apply → pre-flight verdict (toy model, alone): {time.monotonic() - applied:.1f} s")
    assert "train / 0 eval examples" in condition["message"]
    assert "predicted peak" in condition["message"]
    described = local_cluster.kubectl("describe", "finetunejob", "good", "-n", namespace).stdout
    assert "PreflightPassed" in described
    assert "Predicted Peak Gi B" in described or "Predicted Peak GiB" in described, described
    assert "Train Examples" in described
    assert wait_until(lambda: ended(api, namespace, "good"), timeout=420, what="the job to end") == "Complete"
    status = read_job(api, namespace, "good")["status"]
    assert status["preflight"]["preparedDataKept"] is True
    print(f"pre-flight Job ran {status['preflight']['durationSeconds']} s")
    log = cluster.pod_log(local_cluster.home, _pod_of(api, namespace, "good-train-0"), namespace=namespace)
    assert "reusing what the pre-flight tokenized" in log
    summary_tokens = status["preflight"]["tokens"]
    assert f"{summary_tokens:,} tokens" in log, "training read the rows the pre-flight counted"


def _pod_of(api: client.ApiClient, namespace: str, job: str) -> str:
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
    assert pods, f"no pod of {job}"
    return str(pods[0].metadata.name)


def test_kubectl_explain_documents_the_switch(local_cluster: cluster.Cluster, crd: None) -> None:
    explained = subprocess.run(
        [
            str(local_cluster.binaries.kubectl),
            f"--kubeconfig={local_cluster.kubeconfig}",
            "explain",
            "finetunejob.spec.preflight",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "before any GPU node is provisioned" in explained
