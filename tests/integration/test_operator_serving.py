"""Train, publish and serve on the local runtime: a FineTuneJob with serving enabled (runtime
transformers) trains a LoRA adapter on the toy chat facts, publishes it, and the operator deploys
``kubetune serve`` for it. The serving pod is a real process; the test asks it over HTTP. A second
test publishes to a real OCI registry (Debian's docker-registry on loopback) with a
dockerconfigjson Secret, the server's init container pulls the adapter back, and a job with a wrong
credential fails with PublishFailed naming the registry and the Secret.

The local runtime does not route ClusterIP Services, so the test talks to the pod's own address
(every pod has a 127.x address); status.endpoint names the Service a cluster would route.
"""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubetune_api.resource import GROUP, PLURAL, VERSION
from kubetune_local.controlplane import free_port
from kubetune_operator import names
from tests.conftest import OciRegistry
from tests.factories import create_job, read_job, toy_chat, wait_until
from tests.integration.test_operator import children, delete_and_expect_nothing_left
from tests.integration.test_operator_training import toy_claim, toy_job

pytestmark = [pytest.mark.integration, pytest.mark.trainer]

#: Share of the toy facts the served adapter must answer exactly (the base answers none).
MIN_RIGHT = 0.8


def post(host: str, port: int, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def chat(host: str, port: int, model: str, obj: str, **extra: Any) -> tuple[int, bytes]:
    return post(host, port, "/v1/chat/completions", toy_chat(model, obj, **extra))


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


@pytest.mark.usefixtures("operator")
def test_a_served_adapter_answers_what_the_toy_data_taught(api: client.ApiClient, namespace: str) -> None:
    from kubetune_trainer.toy import toy_facts  # noqa: PLC0415 - torch only where training is tested

    toy_claim(api, namespace, fmt="messages")
    port = free_port()
    job = toy_job("chatbot", steps=250, nodes=1, every=100)
    job["spec"]["dataset"]["maxSeqLength"] = 48
    job["spec"]["training"]["batchSizePerDevice"] = 16
    job["spec"]["serving"] = {"enabled": True, "runtime": "transformers", "modelName": "toy-chat", "port": port}
    create_job(api, namespace, job)
    custom = client.CustomObjectsApi(api)

    # A decoy written into status while training is dropped: the adapter comes from the publish Job.
    wait_until(lambda: read_job(api, namespace, "chatbot").get("status", {}).get("phase") == "Training", timeout=600)
    decoy = {"uri": "pvc://chatbot-workspace/decoy", "digest": "sha256:" + "0" * 64, "sizeBytes": 1}
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "chatbot", {"status": {"adapter": decoy}}
    )
    wait_until(
        lambda: read_job(api, namespace, "chatbot").get("status", {}).get("adapter") != decoy,
        timeout=60,
        what="the operator to drop a status.adapter it did not write",
    )

    def serving_ready() -> dict[str, Any] | None:
        status: dict[str, Any] = read_job(api, namespace, "chatbot").get("status", {})
        assert status.get("phase") != "Failed", json.dumps(status, indent=1)
        return status if condition(status, "ServingReady").get("status") == "True" else None

    status = wait_until(serving_ready, timeout=900, what="the job to train, publish and serve")
    assert status["phase"] == "Serving"
    assert status["endpoint"] == {"url": f"http://chatbot-serve.{namespace}.svc:{port}/v1", "modelName": "toy-chat"}
    assert status["adapter"]["uri"] == "pvc://chatbot-workspace/adapter"
    assert status["adapter"]["digest"].startswith("sha256:")
    published = status["adapter"]
    # Once published too, the recorded result (on the publish Job) wins over a rewritten status.
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "chatbot", {"status": {"adapter": decoy}}
    )
    wait_until(
        lambda: read_job(api, namespace, "chatbot").get("status", {}).get("adapter") == published,
        timeout=60,
        what="the operator to restore the adapter it published",
    )
    served = client.AppsV1Api(api).read_namespaced_deployment("chatbot-serve", namespace)
    assert "decoy" not in json.dumps(api.sanitize_for_serialization(served))
    serve_pool = names.node_pool(namespace, "chatbot", names.ROLE_SERVER)

    def one_serving_node() -> dict[str, list[str]] | None:
        found = children(api, namespace, "chatbot")
        claims = found.get("NodeClaim", [])
        only_serving = found.get("NodePool") == [serve_pool] and len(claims) == 1
        return found if only_serving and claims[0].startswith(f"{serve_pool}-") else None

    found = wait_until(one_serving_node, timeout=60, what="training nodes released, one node of the serving pool")
    assert found["Deployment"] == ["chatbot-serve"]
    assert "chatbot-serve" in found["Service"]

    pods = client.CoreV1Api(api).list_namespaced_pod(
        namespace, label_selector=f"{names.selector(namespace, 'chatbot')},{names.ROLE_LABEL}=server"
    )
    (pod,) = pods.items
    assert pod.spec.automount_service_account_token is False
    host = pod.status.pod_ip

    facts = toy_facts()
    right = 0
    base_right = 0
    for obj, answer in facts.items():
        code, raw = chat(host, port, "toy-chat", obj)
        assert code == 200, raw
        reply = json.loads(raw)
        right += reply["choices"][0]["message"]["content"].strip() == answer
        code, raw = chat(host, port, "base", obj)
        assert code == 200, raw
        base_right += json.loads(raw)["choices"][0]["message"]["content"].strip() == answer
    assert right >= MIN_RIGHT * len(facts), f"adapter answered {right}/{len(facts)} facts"
    assert base_right == 0, f"the base answered {base_right} facts it cannot know"

    obj = next(iter(facts))
    code, raw = chat(host, port, "toy-chat", obj)
    whole = json.loads(raw)
    usage = whole["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    code, raw = chat(host, port, "toy-chat", obj, stream=True)
    assert code == 200
    chunks = [
        json.loads(line[len(b"data: ") :])
        for line in raw.splitlines()
        if line.startswith(b"data: ") and line != b"data: [DONE]"
    ]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]

    # Serving off: the server goes, the job stays Complete with its adapter.
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "chatbot", {"spec": {"serving": {"enabled": False}}}
    )

    def stopped() -> dict[str, Any] | None:
        status: dict[str, Any] = read_job(api, namespace, "chatbot").get("status", {})
        left = children(api, namespace, "chatbot")
        done = status.get("phase") == "Complete" and not {"Deployment", "NodePool", "NodeClaim"} & set(left)
        return status if done else None

    status = wait_until(stopped, timeout=120, what="serving to stop once disabled")
    assert "endpoint" not in status
    assert condition(status, "ServingReady")["reason"] == "ServingDisabled"
    delete_and_expect_nothing_left(api, namespace, "chatbot")


def push_secret(api: client.ApiClient, namespace: str, name: str, registry: OciRegistry, password: str) -> None:
    auth = base64.b64encode(f"{registry.user}:{password}".encode()).decode()
    config = json.dumps({"auths": {registry.host: {"auth": auth}}})
    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": name},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()},
        },
    )


@pytest.mark.usefixtures("operator")
def test_an_oci_published_adapter_is_pulled_by_the_server_and_a_wrong_credential_fails_clearly(
    api: client.ApiClient, namespace: str, oci_registry: OciRegistry, tmp_path: Path
) -> None:
    toy_claim(api, namespace, fmt="messages")
    push_secret(api, namespace, "push-ok", oci_registry, oci_registry.password)
    push_secret(api, namespace, "push-wrong", oci_registry, "not-the-password")
    port = free_port()
    good = toy_job("ocibot", steps=20, nodes=1, every=10)
    good["spec"]["output"] = {"destination": f"oci://{oci_registry.host}/adapters/ocibot:v1", "secretRef": "push-ok"}
    good["spec"]["serving"] = {"enabled": True, "runtime": "transformers", "port": port}
    bad = toy_job("badpush", steps=4, nodes=1, every=10)
    bad["spec"]["output"] = {"destination": f"oci://{oci_registry.host}/adapters/badpush:v1", "secretRef": "push-wrong"}
    create_job(api, namespace, good)
    create_job(api, namespace, bad)

    def failed() -> dict[str, Any] | None:
        status: dict[str, Any] = read_job(api, namespace, "badpush").get("status", {})
        return status if status.get("phase") == "Failed" else None

    status = wait_until(failed, timeout=600, what="the job with a wrong push credential to fail")
    reason = condition(status, "Failed")
    assert reason["reason"] == "PublishFailed", reason
    assert oci_registry.host in reason["message"]
    assert "push-wrong" in reason["message"]
    assert "not-the-password" not in json.dumps(status)
    jobs = client.BatchV1Api(api).list_namespaced_job(namespace, label_selector="kubetune.io/finetunejob=badpush")
    assert sorted(j.metadata.name for j in jobs.items) == ["badpush-publish", "badpush-train-0"]

    def serving_ready() -> dict[str, Any] | None:
        status: dict[str, Any] = read_job(api, namespace, "ocibot").get("status", {})
        assert status.get("phase") != "Failed", json.dumps(status, indent=1)
        return status if condition(status, "ServingReady").get("status") == "True" else None

    status = wait_until(serving_ready, timeout=600, what="the OCI-published job to serve")
    adapter = status["adapter"]
    assert adapter["uri"] == f"oci://{oci_registry.host}/adapters/ocibot:v1"
    # The digest in the status is the registry's manifest digest.
    request = urllib.request.Request(
        f"http://{oci_registry.host}/v2/adapters/ocibot/manifests/v1",
        method="HEAD",
        headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json",
            "Authorization": "Basic "
            + base64.b64encode(f"{oci_registry.user}:{oci_registry.password}".encode()).decode(),
        },
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.headers["Docker-Content-Digest"] == adapter["digest"]

    # The server pulled the adapter through its init container: the same bytes as the job's volume.
    pods = client.CoreV1Api(api).list_namespaced_pod(
        namespace, label_selector=f"{names.selector(namespace, 'ocibot')},{names.ROLE_LABEL}=server"
    )
    (pod,) = pods.items
    assert [c.name for c in pod.spec.init_containers] == ["pull-adapter"]
    code, raw = chat(pod.status.pod_ip, port, "ocibot", "sky")
    assert code == 200, raw
    pulled = tmp_path / "pulled"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune_cli.main",
            "pull",
            adapter["uri"],
            str(pulled),
            "--docker-config",
            str(oci_registry.docker_config(tmp_path / "auth")),
        ],
        check=True,
        capture_output=True,
    )
    workspace = client.CoreV1Api(api).read_namespaced_persistent_volume_claim("ocibot-workspace", namespace)
    trained = Path(client.CoreV1Api(api).read_persistent_volume(workspace.spec.volume_name).spec.host_path.path)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (pulled / name).read_bytes() == (trained / "adapter" / name).read_bytes()
    delete_and_expect_nothing_left(api, namespace, "ocibot")
    delete_and_expect_nothing_left(api, namespace, "badpush")
