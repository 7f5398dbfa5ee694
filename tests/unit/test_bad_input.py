"""The bad-input corpus: every manifest is refused, by the models and by the CRD, naming its field."""

from __future__ import annotations

import pytest

from kubetune_api import RULES, InvalidManifestError
from kubetune_api.resource import load_job
from kubetune_operator.crd import openapi_schema
from tests.conftest import BadManifest, load_bad_input
from tests.unit import schema_check

pytestmark = pytest.mark.unit

CORPUS = load_bad_input()


def test_corpus_is_large_enough_and_covers_each_kind_of_mistake() -> None:
    assert len(CORPUS) >= 25
    expected_fields = {case.expect for case in CORPUS}
    # wrong enums, bounds, missing sources, schemes, contradictions and unknown fields all appear
    for field in (
        "spec.method.type",
        "spec.training.learningRate",
        "spec.model",
        "spec.dataset.source",
        "spec.model.source",
        "spec.method.lora",
        "spec.trainer",
    ):
        assert field in expected_fields


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_models_refuse_and_name_the_field(case: BadManifest) -> None:
    with pytest.raises(InvalidManifestError) as caught:
        load_job(case.manifest)
    fields = [p.field for p in caught.value.problems]
    assert case.expect in fields, f"{case.why}: expected a problem at {case.expect}, got {caught.value}"
    for problem in caught.value.problems:
        assert problem.message.strip(), f"empty message for {problem.field}"
    assert case.expect in str(caught.value)


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_crd_schema_refuses_and_names_the_field(case: BadManifest) -> None:
    problems = schema_check.check(case.manifest, openapi_schema())
    assert problems, f"the CRD schema accepts {case.name} ({case.why})"
    assert any(case.expect in p for p in problems), f"{case.expect} not named in {problems}"


def test_every_cross_field_rule_has_a_corpus_case() -> None:
    rule_fields = {f"spec.{r.field}" for r in RULES}
    assert rule_fields <= {case.expect for case in CORPUS}
