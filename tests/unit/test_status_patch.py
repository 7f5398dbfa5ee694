"""The status write is a merge patch that removes what the new status no longer has."""

from __future__ import annotations

import pytest

from kubetune_operator.controller import merge_patch

pytestmark = pytest.mark.unit


def apply(target: dict[str, object], patch: dict[str, object]) -> dict[str, object]:
    """RFC 7386, as the apiserver applies it."""
    result = dict(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = apply(result[key], value)  # type: ignore[arg-type]
        else:
            result[key] = value
    return result


def test_a_removed_endpoint_is_nulled_and_unchanged_fields_are_left_out() -> None:
    before: dict[str, object] = {
        "phase": "Serving",
        "endpoint": {"url": "http://x-serve.ml.svc:8000/v1", "modelName": "x"},
        "progress": {"step": 60, "etaSeconds": 3},
        "conditions": [{"type": "ServingReady", "status": "True"}],
    }
    after: dict[str, object] = {
        "phase": "Complete",
        "progress": {"step": 60},
        "conditions": [{"type": "ServingReady", "status": "False"}],
    }
    patch = merge_patch(before, after)
    assert patch == {
        "phase": "Complete",
        "endpoint": None,
        "progress": {"etaSeconds": None},
        "conditions": [{"type": "ServingReady", "status": "False"}],
    }
    assert apply(before, patch) == after


def test_no_change_is_an_empty_patch() -> None:
    status: dict[str, object] = {"phase": "Training", "progress": {"step": 3}}
    assert merge_patch(status, dict(status)) == {}
