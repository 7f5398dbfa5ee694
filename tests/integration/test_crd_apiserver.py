"""The generated CRD on a real apiserver: accepted as structural, examples admitted, the bad-input
corpus refused with the field named, and model/method frozen once training has started."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_api import InvalidManifestError
from kubetune_api.modelserver import load_model_server
from kubetune_api.resource import GROUP, PLURAL, VERSION
from kubetune_local import cluster
from tests.conftest import EXAMPLES, REPO, BadManifest, load_bad_input, load_yaml
from tests.factories import MINIMAL, finetunejob

pytestmark = pytest.mark.integration


def apply(
    local_cluster: cluster.Cluster, namespace: str, manifest: dict[str, object]
) -> subprocess.CompletedProcess[str]:
    """kubectl apply with the default strict field validation, as a user would run it."""
    return subprocess.run(
        [
            str(local_cluster.binaries.kubectl),
            f"--kubeconfig={local_cluster.kubeconfig}",
            "apply",
            "-n",
            namespace,
            "-f",
            "-",
        ],
        input=yaml.safe_dump(manifest),
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_admitted(local_cluster: cluster.Cluster, namespace: str, path: object) -> None:
    manifest = load_yaml(path)  # type: ignore[arg-type]
    manifest["metadata"]["namespace"] = namespace
    result = apply(local_cluster, namespace, manifest)
    assert result.returncode == 0, result.stderr


@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize("case", load_bad_input(), ids=lambda c: c.name)
def test_bad_input_is_refused_naming_the_field(
    local_cluster: cluster.Cluster, namespace: str, case: BadManifest
) -> None:
    manifest = dict(case.manifest)
    manifest["metadata"] = {**case.manifest["metadata"], "namespace": namespace}
    result = apply(local_cluster, namespace, manifest)
    assert result.returncode != 0, f"the apiserver admitted {case.name} ({case.why})"
    assert case.expect in result.stderr, f"{case.expect} not named in: {result.stderr}"


def read_started(custom: client.CustomObjectsApi, namespace: str, name: str) -> object:
    return (
        custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status", {}).get("startTime")
    )


@pytest.mark.usefixtures("crd")
def test_model_and_method_are_immutable_once_training_started(api: client.ApiClient, namespace: str) -> None:
    custom = client.CustomObjectsApi(api)
    job = load_yaml(REPO / "examples" / "byo-gpu-nodes.yaml")
    job["metadata"] = {"name": "frozen", "namespace": namespace}
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    # Before training starts, the method may still change.
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "frozen", {"spec": {"method": {"type": "dora"}}}
    )
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "frozen",
        {"status": {"phase": "Training", "startTime": "2026-11-29T10:00:00Z"}},
    )
    with pytest.raises(ApiException) as refused:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "frozen", {"spec": {"method": {"type": "lora"}}}
        )
    assert refused.value.status == 422
    assert "spec.method" in str(refused.value.body)
    with pytest.raises(ApiException) as refused_model:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "frozen", {"spec": {"model": {"source": "hf://org/other"}}}
        )
    assert "spec.model" in str(refused_model.value.body)
    # Nor can the mark be taken away through the status subresource to lift the rule.
    for removal in ({"status": {"startTime": None}}, {"status": None}):
        with pytest.raises(ApiException) as refused_removal:
            custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "frozen", removal)
        assert refused_removal.value.status == 422
        assert "status.startTime" in str(refused_removal.value.body)
    assert read_started(custom, namespace, "frozen") == "2026-11-29T10:00:00Z"
    # Other fields stay editable (for example to extend the training).
    patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "frozen", {"spec": {"training": {"epochs": 5}}}
    )
    assert patched["spec"]["training"]["epochs"] == 5


@pytest.mark.usefixtures("crd")
def test_defaults_are_applied_by_the_apiserver(api: client.ApiClient, namespace: str) -> None:
    custom = client.CustomObjectsApi(api)
    minimal = finetunejob("minimal", base=MINIMAL, dataset={"source": "configmap://toy/train.jsonl"})
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, minimal)
    spec = created["spec"]
    assert spec["method"]["type"] == "lora"
    assert spec["distributed"]["deepspeed"]["zeroStage"] == 2
    assert spec["training"]["learningRate"] == pytest.approx(2e-4)
    assert spec["resources"]["storage"]["size"] == "50Gi"


@pytest.mark.usefixtures("crd")
@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ({"runtime": "vllm", "model": {"source": "hf://org/base"}, "gpus": 0}, "vLLM needs a GPU"),
        ({"instanceType": "p4d.24xlarge", "nodeSelector": {"pool": "gpu"}}, "set one of them"),
    ],
    ids=["vllm-without-gpu", "pool-and-node-selector"],
)
def test_model_server_rules_are_the_apiservers_too(
    local_cluster: cluster.Cluster, namespace: str, spec: dict[str, object], expect: str
) -> None:
    """Each rule of the ModelServer spec refuses on the apiserver (CEL) as `kubetune validate` does (Python)."""
    manifest: dict[str, object] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelServer",
        "metadata": {"name": "shared", "namespace": namespace},
        "spec": {"model": {"source": "pvc://models/base"}, "adapterClaim": "adapters", **spec},
    }
    result = apply(local_cluster, namespace, manifest)
    assert result.returncode != 0, "the apiserver admitted it"
    assert expect in result.stderr, result.stderr
    with pytest.raises(InvalidManifestError, match=expect):
        load_model_server(manifest)
