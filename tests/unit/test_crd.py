"""The committed CRD equals the generated one, is structural, documented, and accepts the examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import RULES
from kubetune_api.resource import load_job
from kubetune_operator.crd import build_crd, openapi_schema, render_crd
from tests.conftest import EXAMPLES, REPO, load_yaml
from tests.unit import schema_check

pytestmark = pytest.mark.unit

COMMITTED = REPO / "crds" / "kubetune.io_finetunejobs.yaml"


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        nodes += walk(sub, f"{path}.{name}")
    if "items" in schema:
        nodes += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        nodes += walk(schema["additionalProperties"], f"{path}{{}}")
    return nodes


def test_committed_crd_is_the_generated_one() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == render_crd(), "run `make crds` and commit the result"
    model_servers = COMMITTED.with_name("kubetune.io_modelservers.yaml").read_text(encoding="utf-8")
    assert model_servers == render_crd("ModelServer"), "run `make crds` and commit the result"


def test_schema_is_structural() -> None:
    text = COMMITTED.read_text(encoding="utf-8")
    assert "$ref" not in text
    for key in ("anyOf", "oneOf", "allOf", "$defs", "additionalProperties: false", "title:"):
        assert key not in text, key
    for path, node in walk(openapi_schema()):
        assert "type" in node, f"{path or '(root)'} has no type"
        if "properties" in node and "additionalProperties" in node:
            pytest.fail(f"{path}: properties and additionalProperties together")


def test_every_field_is_documented_for_kubectl_explain() -> None:
    undocumented = [
        f"{parent}.{name}"
        for parent, node in walk(openapi_schema())
        for name, sub in node.get("properties", {}).items()
        if name != "metadata" and not sub.get("description")
    ]
    assert undocumented == []


def test_crd_shape() -> None:
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Model": ".spec.model.source",
        "Method": ".spec.method.type",
        "Phase": ".status.phase",
        "Progress%": ".status.progress.percent",
        "Loss": ".status.progress.loss",
        "Age": ".metadata.creationTimestamp",
    }
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["model", "dataset"]
    assert spec["properties"]["method"]["properties"]["type"]["enum"] == ["lora", "qlora", "dora", "full"]
    assert spec["properties"]["distributed"]["properties"]["deepspeed"]["properties"]["zeroStage"]["enum"] == [
        0,
        1,
        2,
        3,
    ]
    assert len(spec["x-kubernetes-validations"]) == len(RULES)


def test_immutable_fields_have_transition_rules() -> None:
    rules = openapi_schema()["x-kubernetes-validations"]
    transition = {r["fieldPath"] for r in rules if "oldSelf" in r["rule"]}
    assert transition == {".spec.model", ".spec.method", ".status.startTime"}
    for rule in rules:
        if "oldSelf" in rule["rule"]:
            assert "oldSelf.status.startTime" in rule["rule"], "immutable only once training started"
    kept = next(r for r in rules if r.get("fieldPath") == ".status.startTime")
    assert "has(self.status.startTime)" in kept["rule"], "the mark they hinge on cannot be removed"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    manifest = load_yaml(path)
    load_job(manifest, source=str(path))
    assert schema_check.check(manifest, openapi_schema()) == []


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 3


def test_design_example_round_trips_through_yaml() -> None:
    original = load_yaml(REPO / "examples" / "karpenter-aks.yaml")
    job = load_job(original)
    dumped = job.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert dumped == original
    again = load_job(yaml.safe_load(yaml.safe_dump(dumped)))
    assert again == job
    assert again.spec.distributed.nodes == 2
    assert again.spec.method.effective_quantization is not None


def test_a_status_is_accepted_by_the_schema() -> None:
    manifest = load_yaml(REPO / "examples" / "karpenter-aks.yaml")
    manifest["status"] = {
        "phase": "Training",
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "NodesReady",
                "status": "True",
                "reason": "NodeClaimsReady",
                "message": "2/2 nodes ready",
                "lastTransitionTime": "2026-11-29T10:00:00Z",
                "observedGeneration": 1,
            }
        ],
        "progress": {"step": 41, "totalSteps": 100, "percent": 41, "loss": 1.237, "tokensPerSecond": 5120.5},
        "workload": {"jobName": "support-bot-train-0", "attempt": 0, "nodeClaims": ["support-bot-0"]},
        "restarts": 0,
        "startTime": "2026-11-29T10:00:00Z",
    }
    job = load_job(manifest)
    assert job.status is not None
    assert job.status.progress is not None
    assert job.status.progress.percent == 41
    assert schema_check.check(manifest, openapi_schema()) == []
