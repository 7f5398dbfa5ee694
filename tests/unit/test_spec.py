"""Defaults, effective values, sources and messages of the FineTuneJob spec models."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_api import (
    FineTuneJobSpec,
    InvalidManifestError,
    changed_immutable_fields,
    parse_uri,
)
from kubetune_api.resource import load_job
from kubetune_api.spec import MAX_STEPS, quantity_value
from kubetune_api.uris import DATASET_SCHEMES, MODEL_SCHEMES, OUTPUT_SCHEMES
from kubetune_operator.crd import openapi_schema
from tests.factories import MINIMAL, finetunejob
from tests.unit import schema_check
from tests.unit.schema_check import apply_defaults

pytestmark = pytest.mark.unit


def manifest(**spec: Any) -> dict[str, Any]:
    return finetunejob("j", base=MINIMAL, **spec)


class TestDefaults:
    def test_minimal_manifest_gets_documented_defaults(self) -> None:
        spec = load_job(manifest()).spec
        assert spec.method.type == "lora"
        assert spec.method.effective_lora is not None
        assert (spec.method.effective_lora.r, spec.method.effective_lora.alpha) == (16, 32)
        assert spec.method.effective_lora.target_modules == ["all-linear"]
        assert spec.method.effective_quantization is None
        assert spec.training.learning_rate == pytest.approx(2e-4)
        assert spec.training.precision == "bf16"
        assert spec.training.checkpoint_every_steps == 200
        assert spec.distributed.nodes == 1
        assert spec.distributed.deepspeed.zero_stage == 2
        assert spec.resources.provisioner == "byo"
        assert spec.resources.gpu_resource_name == "nvidia.com/gpu"
        assert spec.dataset.format == "auto"
        assert spec.dataset.max_seq_length == 2048
        assert spec.serving.enabled is False
        assert spec.run_policy.max_restarts == 3
        assert spec.run_policy.release_nodes == "OnCompletion"

    def test_qlora_defaults_to_4_bit_nf4_with_double_quantization(self) -> None:
        spec = load_job(manifest(method={"type": "qlora"})).spec
        quant = spec.method.effective_quantization
        assert quant is not None
        assert (quant.bits, quant.quant_type, quant.double_quant) == (4, "nf4", True)

    def test_full_fine_tuning_has_no_adapter(self) -> None:
        spec = load_job(manifest(method={"type": "full"})).spec
        assert spec.method.effective_lora is None

    @pytest.mark.parametrize(("nodes", "mode"), [(1, "ReadWriteOnce"), (2, "ReadWriteMany")])
    def test_storage_access_mode_follows_the_gang_size(self, nodes: int, mode: str) -> None:
        spec = load_job(manifest(distributed={"nodes": nodes})).spec
        assert spec.resources.storage.effective_access_mode(spec.distributed.nodes) == mode

    def test_python_defaults_match_crd_defaults(self) -> None:
        """A default in the CRD and in the model come from one place: dumping the defaults shows both."""
        raw = manifest()
        defaulted = apply_defaults(raw, openapi_schema())
        from_crd = FineTuneJobSpec.model_validate(defaulted["spec"], by_alias=True, by_name=False)
        assert from_crd == load_job(manifest()).spec


class TestSources:
    @pytest.mark.parametrize(
        "uri",
        [
            "hf://microsoft/Phi-3-mini-4k-instruct",
            "hf://gpt2",
            "hf://org/name@v1.2",
            "https://example.org/x/model",
            "pvc://models/llama/8b",
            "pvc://models",
        ],
    )
    def test_model_sources_accepted(self, uri: str) -> None:
        assert str(parse_uri(uri, MODEL_SCHEMES)) == uri

    def test_oci_sources_are_accepted_and_s3_outputs_refused_naming_what_works(self) -> None:
        for schemes in (MODEL_SCHEMES, DATASET_SCHEMES):
            parsed = parse_uri("oci://registry.example:5000/models/llama-3-8b:v1-merged", schemes)
            assert (parsed.scheme, parsed.authority) == ("oci", "registry.example:5000")
        with pytest.raises(
            ValueError, match=r"unsupported scheme 's3://' \(not supported here yet\).*; use pvc://.*oci://"
        ):
            parse_uri("s3://bucket/adapters/", OUTPUT_SCHEMES)

    @pytest.mark.parametrize(
        "uri",
        [
            "s3://team-models/llama/8b/",
            "s3://team-models/llama-8b.tar.gz",
            "s3://bucket-1/key/model",
            "s3://my.bucket.example/a/.hidden/..x/data.jsonl",
            "s3://bucket-1",
            "s3://bucket-1/",
        ],
    )
    def test_s3_sources_are_accepted_for_models_and_datasets(self, uri: str) -> None:
        for schemes in (MODEL_SCHEMES, DATASET_SCHEMES):
            parsed = parse_uri(uri, schemes)
            assert (parsed.scheme, str(parsed)) == ("s3", uri)
        assert parse_uri("s3://team-models/llama/8b/", MODEL_SCHEMES).path == "llama/8b/"

    @pytest.mark.parametrize(
        "uri", ["s3://b1/../x", "s3://b1/a/../../x", "s3://b1//etc/passwd", "s3://b1/a/./x", "s3://b1/a/.."]
    )
    def test_s3_keys_with_empty_or_dot_segments_are_refused(self, uri: str) -> None:
        """Such a key would name a file outside the folder the source is fetched into."""
        for schemes in (MODEL_SCHEMES, DATASET_SCHEMES):
            with pytest.raises(ValueError, match=r"malformed s3:// URI .*'\.\.' segment"):
                parse_uri(uri, schemes)

    def test_s3_outputs_are_still_refused(self) -> None:
        with pytest.raises(ValueError, match=r"unsupported scheme 's3://' \(not supported here yet\).*pvc://.*oci://"):
            parse_uri("s3://team-models/adapters/x", OUTPUT_SCHEMES)

    def test_s3_sources_pass_the_models_and_the_crd_and_dot_segments_fail_both(self) -> None:
        good = manifest(
            model={"source": "s3://team-models/llama/8b/", "secretRef": "s3-keys"},
            dataset={"source": "s3://team-data/train.jsonl", "secretRef": "s3-keys"},
        )
        assert refusals(good) == ([], [])
        fields, crd = refusals(manifest(dataset={"source": "s3://team-data/../other/train.jsonl"}))
        assert fields == ["spec.dataset.source"]
        assert crd, "the apiserver refuses it too"
        fields, crd = refusals(manifest(output={"destination": "s3://team-models/adapters/x"}))
        assert fields == ["spec.output.destination"]
        assert crd

    def test_configmap_only_for_datasets(self) -> None:
        assert parse_uri("configmap://toy-data/train.jsonl", DATASET_SCHEMES).authority == "toy-data"
        with pytest.raises(ValueError, match="unsupported scheme 'configmap://'"):
            parse_uri("configmap://toy-data/train.jsonl", MODEL_SCHEMES)

    @pytest.mark.parametrize(
        ("uri", "message"),
        [
            ("models/llama", "is not a URI"),
            ("ftp://host/x", "unsupported scheme 'ftp://'"),
            ("pvc://Bad_Name/x", "malformed pvc:// URI"),
            ("oci://registry/UPPER/case", "malformed oci:// URI"),
            ("hf://", "malformed hf:// URI"),
        ],
    )
    def test_bad_uris_name_the_problem_and_the_forms(self, uri: str, message: str) -> None:
        with pytest.raises(ValueError, match=message) as caught:
            parse_uri(uri, OUTPUT_SCHEMES if uri.startswith("oci") else MODEL_SCHEMES)
        assert "://" in str(caught.value)

    def test_uri_parts(self) -> None:
        uri = parse_uri("pvc://models/llama/8b", MODEL_SCHEMES)
        assert (uri.scheme, uri.authority, uri.path) == ("pvc", "models", "llama/8b")

    def test_local_paths_only_on_request(self) -> None:
        local = manifest(model={"source": "/data/model"}, dataset={"source": "file:///data/d.jsonl"})
        with pytest.raises(InvalidManifestError, match=r"spec\.model\.source"):
            load_job(local)
        spec = load_job(local, allow_local_paths=True).spec
        assert spec.model.source == "file:///data/model"
        assert parse_uri(spec.dataset.source, ("file",)).location == "/data/d.jsonl"


class TestMessages:
    def test_every_problem_is_listed_at_once(self) -> None:
        bad = manifest(
            method={"type": "sft"},
            training={"learningRate": 0, "precision": "fp8"},
            distributed={"nodes": 0},
        )
        with pytest.raises(InvalidManifestError) as caught:
            load_job(bad)
        fields = {p.field for p in caught.value.problems}
        assert fields == {
            "spec.method.type",
            "spec.training.learningRate",
            "spec.training.precision",
            "spec.distributed.nodes",
        }
        assert "4 problems" in str(caught.value)

    def test_enum_message_lists_the_choices(self) -> None:
        with pytest.raises(InvalidManifestError) as caught:
            load_job(manifest(method={"type": "sft"}))
        assert "'lora', 'qlora', 'dora' or 'full'" in str(caught.value)

    def test_cross_field_problems_all_reported(self) -> None:
        bad = manifest(
            method={"type": "full", "lora": {"r": 4}},
            resources={"provisioner": "karpenter"},
        )
        with pytest.raises(InvalidManifestError) as caught:
            load_job(bad)
        assert {p.field for p in caught.value.problems} == {"spec.method.lora", "spec.resources.instanceType"}
        assert "set resources.instanceType" in str(caught.value)

    def test_unknown_field_says_how_to_find_the_right_one(self) -> None:
        with pytest.raises(InvalidManifestError) as caught:
            load_job(manifest(training={"learning_rate": 0.1}))
        (problem,) = caught.value.problems
        assert problem.field == "spec.training.learning_rate"
        assert "kubectl explain" in problem.message

    def test_name_length_is_bounded_for_pod_names(self) -> None:
        bad = manifest()
        bad["metadata"]["name"] = "x" * 41
        with pytest.raises(InvalidManifestError, match="at most 40"):
            load_job(bad)


class TestImmutability:
    def test_model_and_method_changes_are_detected(self) -> None:
        old = load_job(manifest()).spec
        new = load_job(manifest(method={"type": "dora"}, training={"epochs": 5})).spec
        assert [f.field for f in changed_immutable_fields(old, new)] == ["method"]

    def test_training_changes_are_allowed(self) -> None:
        old = load_job(manifest()).spec
        new = load_job(manifest(training={"epochs": 5})).spec
        assert changed_immutable_fields(old, new) == []


def refusals(document: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The fields the models name and the problems the CRD schema reports, for one manifest."""
    try:
        load_job(document)
    except InvalidManifestError as error:
        fields = [p.field for p in error.problems]
    else:
        fields = []
    return fields, schema_check.check(document, openapi_schema())


class TestBounds:
    """Names and numbers the pods' command lines and the cluster cannot take are refused on both sides."""

    @pytest.mark.parametrize("name", ["leak-$(SOME_VAR)", "a=b", "two words", "-dash", ".hidden", "x" * 129, ""])
    def test_served_model_names_that_break_command_lines_are_refused(self, name: str) -> None:
        fields, schema = refusals(manifest(serving={"enabled": True, "modelName": name}))
        assert fields == ["spec.serving.modelName"]
        assert any(p.startswith("spec.serving.modelName") for p in schema), schema

    @pytest.mark.parametrize("name", ["support-bot", "Llama-3.1_ft", "x" * 128, "7b"])
    def test_served_model_names_of_letters_digits_dots_dashes_are_accepted(self, name: str) -> None:
        assert refusals(manifest(serving={"enabled": True, "modelName": name})) == ([], [])

    @pytest.mark.parametrize(("steps", "ok"), [(MAX_STEPS, True), (MAX_STEPS + 1, False), (2**63 - 1, False)])
    def test_step_counts_are_bounded(self, steps: int, ok: bool) -> None:
        for field in ("maxSteps", "checkpointEverySteps"):
            fields, schema = refusals(manifest(training={field: steps}))
            if ok:
                assert (fields, schema) == ([], [])
            else:
                assert fields == [f"spec.training.{field}"]
                assert any(p.startswith(f"spec.training.{field}") for p in schema), schema

    @pytest.mark.parametrize(
        ("size", "ok"),
        [
            ("50Gi", True),
            ("1Pi", True),
            ("1024Ti", True),
            ("1125899906842624", True),
            ("1.125P", True),
            ("1125899906842625", False),
            ("1025Ti", False),
            ("1.5Pi", False),
            ("2P", False),
            ("8Ei", False),
        ],
    )
    def test_storage_is_at_most_a_pebibyte_by_the_models_and_the_crd_alike(self, size: str, ok: bool) -> None:
        fields, schema = refusals(manifest(resources={"storage": {"size": size}}))
        if ok:
            assert (fields, schema) == ([], [])
        else:
            assert fields == ["spec.resources.storage.size"]
            assert schema == ["spec.resources.storage.size: must be at most 1Pi"]

    def test_quantity_values_are_exact(self) -> None:
        assert quantity_value("1.5Gi") == 3 * 2**29
        assert quantity_value("500m") * 2 == 1
        assert quantity_value("2k") == 2000
        with pytest.raises(ValueError, match="not a quantity"):
            quantity_value("10GB")
