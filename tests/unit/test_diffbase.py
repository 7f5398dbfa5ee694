"""kopf's last-handled configuration is a digest of the spec: an annotation of fixed size, whatever
the job's own labels and annotations weigh, that still changes when (and only when) the spec does."""

from __future__ import annotations

import kopf
import pytest

from kubetune_operator.handlers import SpecDigestStorage

pytestmark = pytest.mark.unit

KEY = "kubetune.io/last-handled-configuration"


def body(spec: dict[str, object], annotations: dict[str, str] | None = None) -> kopf.Body:
    return kopf.Body(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "n", "annotations": annotations or {}, "labels": {"a": "b"}},
            "spec": spec,
            "status": {"phase": "Training"},
        }
    )


def stored_annotation(storage: SpecDigestStorage, job: kopf.Body) -> str:
    patch = kopf.Patch()
    storage.store(body=job, patch=patch, essence=storage.build(body=job))
    return str(patch["metadata"]["annotations"][KEY])


def test_a_200_kb_annotation_does_not_grow_the_stored_configuration() -> None:
    storage = SpecDigestStorage(prefix="kubetune.io", key="last-handled-configuration")
    small = stored_annotation(storage, body({"model": {"source": "pvc://m/x"}}))
    heavy = stored_annotation(storage, body({"model": {"source": "pvc://m/x"}}, {"team/notes": "x" * 200_000}))
    assert len(heavy) == len(small) < 200  # kopf's own storage would copy the 200 KB


def test_the_essence_changes_with_the_spec_and_only_with_it() -> None:
    storage = SpecDigestStorage(prefix="kubetune.io", key="last-handled-configuration")
    first = storage.build(body=body({"model": {"source": "pvc://m/x"}, "training": {"epochs": 1}}))
    reordered = storage.build(body=body({"training": {"epochs": 1}, "model": {"source": "pvc://m/x"}}))
    relabelled = storage.build(body=body({"model": {"source": "pvc://m/x"}, "training": {"epochs": 1}}, {"x": "y"}))
    changed = storage.build(body=body({"model": {"source": "pvc://m/y"}, "training": {"epochs": 1}}))
    assert first == reordered == relabelled
    assert first != changed
