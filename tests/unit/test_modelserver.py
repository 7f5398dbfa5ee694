"""ModelServers without a cluster: the API, the builders, which adapters a server holds, and a job served by one."""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any, ClassVar

import pytest

from kubetune_api import InvalidManifestError
from kubetune_api.modelserver import ModelServer, load_model_server
from kubetune_local.controlplane import free_port
from kubetune_operator import conditions, names
from kubetune_operator.children.modelserver import (
    ADAPTERS_MOUNT,
    adapter_path,
    build_adapters_config_map,
    build_server_deployment,
    build_server_node_pool,
    build_server_service,
    server_url,
)
from kubetune_operator.observed import result_annotation
from kubetune_operator.servers import ReplicaError, changed_jobs, ready_pods, sync_replica, wanted
from kubetune_operator.settings import OperatorSettings
from tests.unit.test_reconcile import condition, job, published, run

pytestmark = pytest.mark.unit

BASE = "pvc://models/base"


def server(**spec: Any) -> ModelServer:
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "shared", "namespace": "ml", "uid": "ms-uid"},
        "spec": {"model": {"source": BASE}, "adapterClaim": "adapters", **spec},
    }
    return load_model_server(manifest)


def ftj(name: str, *, created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"source": BASE},
        "dataset": {"source": "pvc://models/data/train.jsonl"},
        "output": {"destination": f"pvc://adapters/{name}"},
        "serving": {"enabled": True, "server": "shared"},
    }
    for section, values in spec.items():
        body[section] = {**body.get(section, {}), **values}
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ml", "creationTimestamp": created},
        "spec": body,
    }


def publish(name: str, uri: str | None = None) -> dict[str, Any]:
    from kubetune_api.resource import Adapter  # noqa: PLC0415

    annotation = result_annotation(Adapter(uri=uri or f"pvc://adapters/{name}", digest="sha256:" + "a" * 64))
    return {
        "metadata": {
            "name": f"{name}-publish",
            "labels": {names.JOB_LABEL: name, names.ROLE_LABEL: names.ROLE_PUBLISH},
            **annotation["metadata"],
        }
    }


class TestApi:
    def test_a_hub_base_is_for_vllm_only(self) -> None:
        with pytest.raises(InvalidManifestError, match=r"spec\.model\.source"):
            server(model={"source": "hf://org/base"})
        assert server(model={"source": "hf://org/base"}, runtime="vllm").spec.model.source == "hf://org/base"

    def test_sources_a_server_cannot_mount_are_refused_naming_what_works(self) -> None:
        with pytest.raises(InvalidManifestError, match=r"pvc://claim/path"):
            server(model={"source": "https://example.org/model.tar.gz"})

    def test_a_job_served_by_a_server_publishes_on_a_claim(self) -> None:
        from kubetune_api.resource import load_job  # noqa: PLC0415

        manifest = ftj("a", output={"destination": "oci://registry.example/a:v1"})
        with pytest.raises(InvalidManifestError, match=r"output\.destination"):
            load_job(manifest)

    def test_vllm_without_a_gpu_is_refused_as_the_crd_refuses_it(self) -> None:
        with pytest.raises(InvalidManifestError, match=r"spec\.gpus") as caught:
            server(runtime="vllm", model={"source": "hf://org/base"}, gpus=0)
        assert "vLLM needs a GPU" in str(caught.value)

    def test_a_pool_of_its_own_and_existing_nodes_are_one_or_the_other(self) -> None:
        with pytest.raises(InvalidManifestError, match=r"spec\.nodeSelector") as caught:
            server(instanceType="p4d.24xlarge", nodeSelector={"pool": "gpu"})
        assert "set one of them" in str(caught.value)
        assert server(instanceType="p4d.24xlarge").spec.instance_type == "p4d.24xlarge"

    def test_the_crd_carries_the_same_rules(self) -> None:
        from kubetune_api.modelserver import SERVER_RULES  # noqa: PLC0415
        from kubetune_operator.crd import model_server_schema  # noqa: PLC0415

        rules = model_server_schema()["properties"]["spec"]["x-kubernetes-validations"]
        assert [(r["rule"], r["fieldPath"]) for r in rules] == [(r.cel, f".{r.field}") for r in SERVER_RULES]
        assert len(rules) == 2


class TestNodePool:
    def test_a_server_with_an_instance_type_gets_a_pool_of_its_own(self) -> None:
        settings = OperatorSettings()
        pool = build_server_node_pool(
            server(instanceType="p4d.24xlarge", replicas=2, runtime="vllm"), "ms-uid", settings
        )
        assert pool["kind"] == "NodePool"
        assert pool["metadata"]["name"] == names.server_node_pool("ml", "shared")
        assert pool["metadata"]["name"] != names.node_pool("ml", "shared", names.ROLE_SERVER), "apart from a job's"
        labels = pool["metadata"]["labels"]
        assert labels[names.SERVER_LABEL] == "shared"
        assert labels[names.UID_LABEL] == "ms-uid"
        assert names.JOB_LABEL not in labels, "the job sweep leaves it alone"
        template = pool["spec"]["template"]
        assert template["metadata"]["labels"] == labels, "its claims and nodes carry the server's labels"
        assert {"key": "node.kubernetes.io/instance-type", "operator": "In", "values": ["p4d.24xlarge"]} in template[
            "spec"
        ]["requirements"]
        assert template["spec"]["taints"][0]["key"] == names.GPU_TAINT_KEY
        assert pool["spec"]["limits"] == {"nodes": "3", "nvidia.com/gpu": "24"}, "replicas + 1 nodes of 8 GPUs"
        assert pool["spec"]["disruption"]["consolidationPolicy"] == "WhenEmpty"

    def test_its_replicas_select_the_pool_and_tolerate_its_taint(self) -> None:
        deployment = build_server_deployment(server(instanceType="local-cpu"), "ms-uid", OperatorSettings())
        spec = deployment["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {
            names.NODEPOOL_LABEL: names.server_node_pool("ml", "shared"),
            names.UID_LABEL: "ms-uid",
        }
        assert spec["tolerations"] == [{"key": names.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]

    def test_without_one_the_replicas_go_where_the_node_selector_says(self) -> None:
        deployment = build_server_deployment(server(nodeSelector={"pool": "cpu"}), "ms-uid", OperatorSettings())
        assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}


class TestBuilders:
    def test_the_built_in_server_loads_runtime_adapters_from_the_claim_and_the_file(self) -> None:
        deployment = build_server_deployment(server(cpu="2"), "ms-uid", OperatorSettings())
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        command = container["command"]
        assert command[:2] == ["kubetune", "serve"]
        assert command[command.index("--runtime-adapters") + 1] == ADAPTERS_MOUNT
        assert command[command.index("--adapters-file") + 1] == "/etc/kubetune/adapters/adapters.json"
        assert command[command.index("--base-name") + 1] == "shared"
        assert command[command.index("--model") + 1] == "/var/run/kubetune/sources/pvc/models/base"
        claims = {
            v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims == {"adapters": True, "models": True}
        assert spec["automountServiceAccountToken"] is False
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert {"name": "OMP_NUM_THREADS", "value": "2"} in container["env"]
        assert deployment["metadata"]["ownerReferences"][0]["kind"] == "ModelServer"
        assert "tolerations" not in spec, "a CPU server stays off the GPU nodes"

    def test_vllm_runs_with_runtime_lora_updating(self) -> None:
        deployment = build_server_deployment(
            server(runtime="vllm", model={"source": "hf://org/base@v2"}, maxAdapters=8, maxLoraRank=20),
            "ms-uid",
            OperatorSettings(),
        )
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        command = container["command"]
        assert command[:3] == ["vllm", "serve", "org/base"]
        assert command[command.index("--revision") + 1] == "v2"
        assert command[command.index("--max-loras") + 1] == "8"
        assert command[command.index("--max-lora-rank") + 1] == "32", "rounded up to a rank vLLM accepts"
        assert "--enable-lora" in command
        assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in container["env"]
        assert container["workingDir"] == ADAPTERS_MOUNT, "where vLLM resolves the relative adapter paths"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
        assert tolerations[0]["key"] == names.GPU_TAINT_KEY

    def test_the_adapters_file_and_the_service(self) -> None:
        config_map = build_adapters_config_map(server(), "ms-uid", {"b": "/x/b", "a": "/x/a"})
        assert json.loads(config_map["data"]["adapters.json"]) == {"a": "/x/a", "b": "/x/b"}
        service = build_server_service(server(), "ms-uid")
        assert service["metadata"]["name"] == "shared-server"
        assert server_url(server()) == "http://shared-server.ml.svc:8000/v1"

    def test_adapter_paths_lie_on_the_adapter_claim_only(self) -> None:
        assert adapter_path(server(), "pvc://adapters/team/a/") == "./team/a"
        assert adapter_path(server(), "pvc://adapters/") is None
        assert adapter_path(server(), "pvc://other/team/a") is None
        assert adapter_path(server(), "oci://registry.example/a:v1") is None


class TestWanted:
    def test_published_jobs_oldest_first_and_unpublished_ones_not_yet(self) -> None:
        jobs = [ftj("b", created="2026-01-02T00:00:00Z"), ftj("a"), ftj("c")]
        found = wanted(server(), jobs, [publish("a"), publish("b")])
        assert [(w.name, w.job, w.path, w.refused) for w in found] == [
            ("a", "a", "./a", None),
            ("b", "b", "./b", None),
        ]

    def test_deleted_disabled_and_other_servers_jobs_are_dropped(self) -> None:
        deleted = ftj("a")
        deleted["metadata"]["deletionTimestamp"] = "2026-01-03T00:00:00Z"
        jobs = [deleted, ftj("b", serving={"enabled": False}), ftj("c", serving={"server": "other"})]
        assert wanted(server(), jobs, [publish("a"), publish("b"), publish("c")]) == []

    @pytest.mark.parametrize(
        ("spec", "server_spec", "expected"),
        [
            ({"model": {"source": "pvc://models/other"}}, {}, "an adapter only fits its own base"),
            ({"method": {"type": "dora"}}, {"runtime": "vllm", "model": {"source": BASE}}, "vLLM cannot load DoRA"),
            (
                {"method": {"type": "lora", "lora": {"r": 128}}},
                {"runtime": "vllm"},
                "above ModelServer shared's maxLoraRank 64",
            ),
            ({"method": {"type": "full"}}, {}, "not an adapter"),
        ],
    )
    def test_what_a_server_cannot_hold_says_why(
        self, spec: dict[str, Any], server_spec: dict[str, Any], expected: str
    ) -> None:
        (found,) = wanted(server(**server_spec), [ftj("a", **spec)], [publish("a")])
        assert found.refused is not None
        assert expected in found.refused

    def test_an_adapter_off_the_claim_names_the_fix(self) -> None:
        (found,) = wanted(
            server(), [ftj("a", output={"destination": "pvc://other/a"})], [publish("a", "pvc://other/a")]
        )
        assert found.refused is not None
        assert "set spec.output.destination to pvc://adapters/<path>" in found.refused

    def test_a_taken_name_and_a_full_server_refuse_the_newer_job(self) -> None:
        jobs = [
            ftj("a", serving={"modelName": "bot"}),
            ftj("b", created="2026-01-02T00:00:00Z", serving={"modelName": "bot"}),
        ]
        first, second = wanted(server(), jobs, [publish("a"), publish("b")])
        assert first.refused is None
        assert second.refused is not None
        assert "taken on ModelServer shared by job a" in second.refused
        first, second = wanted(
            server(maxAdapters=1), [ftj("a"), ftj("b", created="2026-01-02T00:00:00Z")], [publish("a"), publish("b")]
        )
        assert first.refused is None
        assert second.refused is not None
        assert "at most 1 adapters" in second.refused

    def test_ready_replicas_are_ready_with_an_address(self) -> None:
        def replica(ready: str, ip: str | None, deleting: bool = False) -> dict[str, Any]:
            meta: dict[str, Any] = {"name": "p"}
            if deleting:
                meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
            return {"metadata": meta, "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}}

        pods = [
            replica("True", "10.0.0.1"),
            replica("False", "10.0.0.2"),
            replica("True", None),
            replica("True", "10.0.0.3", deleting=True),
        ]
        assert [p["status"]["podIP"] for p in ready_pods(pods)] == ["10.0.0.1"]


def shared_status(*adapters: dict[str, Any], ready: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": "shared", "namespace": "ml"},
        "spec": {"model": {"source": "pvc://models/base"}, "adapterClaim": "adapters"},
        "status": {"phase": "Ready", "readyReplicas": ready, "adapters": list(adapters)},
    }


class TestJobServedByAServer:
    def serving_job(self) -> Any:
        return job(
            status={"phase": "Complete"},
            serving={"enabled": True, "server": "shared", "modelName": "bot"},
            output={"destination": "pvc://adapters/support-bot"},
        )

    def test_a_missing_server_is_named_with_the_fix(self) -> None:
        decision = run(self.serving_job(), **published())
        assert decision.status.phase == "Serving"
        status, reason, message = condition(decision, conditions.SERVING_READY)
        assert (status, reason) == ("False", conditions.SERVER_NOT_FOUND)
        assert "ModelServer shared not found in namespace ml" in message
        assert not [m for m in decision.apply if m["kind"] == "Deployment"], "no server of the job's own"

    def test_loaded_means_ready_and_the_endpoint_is_the_servers(self) -> None:
        loaded = {"name": "bot", "job": "support-bot", "path": "/p", "loadedReplicas": 2}
        decision = run(self.serving_job(), **published(model_server=shared_status(loaded, ready=2)))
        status, reason, message = condition(decision, conditions.SERVING_READY)
        assert (status, reason) == ("True", conditions.SERVING)
        assert "loaded on 2/2 replicas of ModelServer shared" in message
        assert decision.status.endpoint is not None
        assert decision.status.endpoint.url == "http://shared-server.ml.svc:8000/v1"
        assert decision.status.endpoint.model_name == "bot"

    def test_a_refusal_is_quoted_and_waiting_is_said(self) -> None:
        refused = {"name": "bot", "job": "support-bot", "path": "", "message": "the model name bot is taken"}
        decision = run(self.serving_job(), **published(model_server=shared_status(refused)))
        assert condition(decision, conditions.SERVING_READY) == (
            "False",
            conditions.ADAPTER_REFUSED,
            "the model name bot is taken",
        )
        decision = run(self.serving_job(), **published(model_server=shared_status(ready=0)))
        status, reason, message = condition(decision, conditions.SERVING_READY)
        assert (status, reason) == ("False", conditions.ADAPTER_LOADING)
        assert "0/1 replicas ready" in message


class FakeReplica(http.server.BaseHTTPRequestHandler):
    """A replica answering like vLLM's runtime LoRA endpoints: lists, loads, refuses one adapter."""

    holds: ClassVar[set[str]] = set()
    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        models = [{"id": "shared", "root": "/model"}, *({"id": n, "parent": "shared"} for n in sorted(self.holds))]
        self._answer(200, {"object": "list", "data": models})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append((self.path, body))
        if self.path == "/v1/load_lora_adapter" and body["lora_name"] == "broken":
            self._answer(400, {"error": {"message": "Loading lora broken failed: no adapter_config.json"}})
            return
        if self.path == "/v1/load_lora_adapter":
            self.holds.add(body["lora_name"])
        else:
            self.holds.discard(body["lora_name"])
        self._answer(200, {})


def test_a_replica_is_made_to_hold_what_the_server_wants() -> None:
    FakeReplica.holds = {"gone", "kept"}
    FakeReplica.calls = []
    replica = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeReplica)
    thread = threading.Thread(target=replica.serve_forever, daemon=True)
    thread.start()
    try:
        port = replica.server_address[1]
        wants = {"kept": "/a/kept", "new": "/a/new", "broken": "/a/broken"}
        holds, errors = sync_replica("shared", "127.0.0.1", port, wants)
    finally:
        replica.shutdown()
        replica.server_close()
    assert holds == {"kept", "new"}
    assert errors == {"broken": "HTTP 400: Loading lora broken failed: no adapter_config.json"}
    assert FakeReplica.calls == [
        ("/v1/unload_lora_adapter", {"lora_name": "gone"}),
        ("/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": "/a/broken"}),
        ("/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "/a/new"}),
    ], "the base is never unloaded, and what is held already is not loaded again"


def test_a_replica_that_does_not_answer_is_an_error() -> None:
    with pytest.raises(ReplicaError, match="no answer"):
        sync_replica("shared", "127.0.0.1", free_port(), {"a": "/a"})


def test_only_jobs_whose_entry_changed_are_woken() -> None:
    from kubetune_api.modelserver import ModelServerStatus, ServedAdapter  # noqa: PLC0415

    before = {"status": {"adapters": [{"name": "a", "job": "a", "path": "./a", "loadedReplicas": 1}]}}
    same = ModelServerStatus(adapters=[ServedAdapter(name="a", job="a", path="./a", loaded_replicas=1)])
    assert changed_jobs(before, same) == [], "a pass that changed nothing wakes nobody (no ping-pong)"
    grown = ModelServerStatus(
        adapters=[
            ServedAdapter(name="a", job="a", path="./a", loaded_replicas=2),
            ServedAdapter(name="b", job="b", path="./b", loaded_replicas=0),
        ]
    )
    assert changed_jobs(before, grown) == ["a", "b"]
    assert changed_jobs(before, ModelServerStatus()) == ["a"], "a dropped job is woken too"


class PoolKube:
    """The API as a ModelServer pass uses it, with no replica ready: applies, lists, deletions and the status."""

    def __init__(self, pools: list[dict[str, Any]], *, karpenter: bool = True) -> None:
        self.pools, self.karpenter = pools, karpenter
        self.applied: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.status: dict[str, Any] = {}

    def installed(self, api_version: str, kind: str) -> bool:
        return self.karpenter

    def list(
        self, api_version: str, kind: str, *, namespace: str | None = None, labels: str | None = None
    ) -> list[Any]:
        return self.pools if kind == "NodePool" else []

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.applied.append(manifest)
        return manifest

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        self.deleted.append(f"{kind}/{name}")

    def write_status(self, namespace: str, name: str, status: dict[str, Any], *, kind: str) -> None:
        self.status = status


def server_obj(**spec: Any) -> dict[str, Any]:
    return server(**spec).model_dump(mode="json", by_alias=True, exclude_none=True) | {
        "metadata": {"name": "shared", "namespace": "ml", "uid": "ms-uid", "generation": 1}
    }


class TestPoolPass:
    def test_the_pass_applies_the_pool_and_deletes_the_servers_other_pools(self) -> None:
        from kubetune_operator.servers import ServerController  # noqa: PLC0415

        old = build_server_node_pool(server(instanceType="local-cpu"), "ms-uid", OperatorSettings())
        old["metadata"]["name"] = "ml-shared-ms-old"
        kube = PoolKube([old])
        ServerController(kube, OperatorSettings()).reconcile(server_obj(instanceType="local-cpu"))  # type: ignore[arg-type]
        pools = [m for m in kube.applied if m["kind"] == "NodePool"]
        assert [p["metadata"]["name"] for p in pools] == [names.server_node_pool("ml", "shared")]
        assert kube.deleted == ["NodePool/ml-shared-ms-old"]

    def test_unsetting_the_instance_type_deletes_the_pool(self) -> None:
        from kubetune_operator.servers import ServerController  # noqa: PLC0415

        pool = build_server_node_pool(server(instanceType="local-cpu"), "ms-uid", OperatorSettings())
        kube = PoolKube([pool])
        ServerController(kube, OperatorSettings()).reconcile(server_obj())  # type: ignore[arg-type]
        assert not [m for m in kube.applied if m["kind"] == "NodePool"]
        assert kube.deleted == [f"NodePool/{pool['metadata']['name']}"]

    def test_an_instance_type_without_karpenter_says_so_and_the_fix(self) -> None:
        from kubetune_operator.servers import ServerController  # noqa: PLC0415

        kube = PoolKube([], karpenter=False)
        ServerController(kube, OperatorSettings()).reconcile(server_obj(instanceType="p4d.24xlarge"))  # type: ignore[arg-type]
        assert not [m for m in kube.applied if m["kind"] == "NodePool"]
        ready = next(c for c in kube.status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False"
        assert ready["reason"] == "KarpenterNotInstalled"
        assert "unset instanceType" in ready["message"]
        assert kube.status["phase"] == "Pending"
