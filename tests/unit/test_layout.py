"""The package layout keeps its promises: stdlib `operator` intact, the operator free of torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit


def test_import_operator_is_the_standard_library() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import operator, sys; print(operator.__file__); print(sys.modules['operator'].add)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(REPO) not in result.stdout
    assert "built-in function add" in result.stdout


def test_operator_api_and_crd_import_no_ml_stack() -> None:
    code = (
        "import sys, kubetune_operator.crd, kubetune_api.resource, kubetune_cli.main;"
        "print(sorted(m for m in ('torch','transformers','peft','deepspeed','kopf') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
