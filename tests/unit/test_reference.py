"""The committed FineTuneJob reference equals the one rendered from the CRD, and covers the schema."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune_operator.crd import build_crd, build_model_server_crd, openapi_schema
from kubetune_operator.reference import HEADER, render_reference
from tests.conftest import REPO

pytestmark = pytest.mark.unit

COMMITTED = REPO / "docs" / "reference.md"


def leaves(schema: dict[str, Any], path: str) -> list[str]:
    """The camelCase paths of the schema's leaf fields (scalars, lists of scalars, maps), items as ``[]``."""
    if "properties" in schema:
        return [leaf for name, sub in schema["properties"].items() for leaf in leaves(sub, f"{path}.{name}")]
    if isinstance(schema.get("items"), dict) and "properties" in schema["items"]:
        return leaves(schema["items"], f"{path}[]")
    return [path]


def cel_messages(schema: dict[str, Any]) -> list[str]:
    found = [rule["message"] for rule in schema.get("x-kubernetes-validations", [])]
    for sub in schema.get("properties", {}).values():
        found += cel_messages(sub)
    if isinstance(schema.get("items"), dict):
        found += cel_messages(schema["items"])
    return found


def rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row (pipes escaped as ``\\|`` stay inside a cell)."""
    return [
        [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in text.splitlines()
        if line.startswith("| ")
    ]


def row_of(text: str, field: str) -> list[str]:
    matches = [row for row in rows(text) if row[0] == f"`{field}`"]
    assert len(matches) == 1, f"{field}: {len(matches)} rows"
    return matches[0]


def test_committed_reference_is_the_generated_one() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == render_reference(), (
        "docs/reference.md is stale: run `make crds` and commit the result"
    )
    model_servers = COMMITTED.with_name("modelserver-reference.md").read_text(encoding="utf-8")
    assert model_servers == render_reference(build_model_server_crd()), (
        "docs/modelserver-reference.md is stale: run `make crds` and commit the result"
    )


def test_reference_is_deterministic_and_says_it_is_generated() -> None:
    text = render_reference()
    assert text == render_reference(build_crd())
    assert text.startswith(HEADER)
    assert "make crds" in HEADER


def test_every_spec_leaf_field_is_documented() -> None:
    text = render_reference()
    spec_leaves = leaves(openapi_schema()["properties"]["spec"], "spec")
    assert len(spec_leaves) > 60
    assert "spec.resources.tolerations[].effect" in spec_leaves
    missing = [leaf for leaf in spec_leaves if f"| `{leaf}` |" not in text]
    assert missing == []


def test_every_status_leaf_field_is_documented() -> None:
    text = render_reference()
    missing = [
        leaf for leaf in leaves(openapi_schema()["properties"]["status"], "status") if f"| `{leaf}` |" not in text
    ]
    assert missing == []


def test_every_cel_rule_message_appears() -> None:
    text = render_reference()
    messages = cel_messages(openapi_schema())
    assert len(messages) >= 16  # the spec's cross-field rules, the URI rules and the root's
    missing = [m for m in messages if m not in text]
    assert missing == []


def test_object_rules_are_listed_in_their_own_section() -> None:
    text = render_reference()
    spec_section = text.split("\n## spec\n", 1)[1].split("\n## ", 1)[0]
    assert "method.lora: full fine-tuning takes no LoRA block" in spec_section
    assert "rule: `self.method.type != 'full' || !has(self.method.lora)`" in spec_section
    root_section = text.split("\n## FineTuneJob\n", 1)[1].split("\n## ", 1)[0]
    assert "spec.model cannot change once training has started" in root_section


def test_one_section_per_object() -> None:
    headings = re.findall(r"^## (.+)$", render_reference(), re.MULTILINE)
    for section in (
        "FineTuneJob",
        "spec",
        "spec.model",
        "spec.method.lora",
        "spec.resources.tolerations[]",
        "status",
        "status.conditions[]",
        "status.progress",
        "Printer columns",
    ):
        assert section in headings
    assert len(headings) == len(set(headings))
    for anchor in re.findall(r"\]\(#([^)]+)\)", render_reference()):
        assert any(re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") == anchor for h in headings), anchor


def test_tables_are_well_formed() -> None:
    text = render_reference()
    table = [row for row in rows(text) if len(row) == 6]
    assert len(table) > 100
    assert all(len(row) in (4, 6) for row in rows(text))


def test_rows_show_type_default_required_and_validation() -> None:
    text = render_reference()
    assert row_of(text, "spec.method.type")[1:4] == ["string, one of `lora`, `qlora`, `dora`, `full`", "`lora`", ""]
    assert row_of(text, "spec.model.source")[3] == "yes"
    assert row_of(text, "spec.dataset.maxSeqLength")[5] == "≥ 16; ≤ 131072"
    assert row_of(text, "spec.method.lora.alpha")[5] == "> 0; ≤ 4096"
    assert row_of(text, "spec.method.lora.targetModules")[1:3] == ["list of string", '`["all-linear"]`']
    assert row_of(text, "spec.resources.nodeSelector")[1] == "map of string to string"
    assert "pattern `^[0-9]+(\\.[0-9]+)?(m\\|k" in row_of(text, "spec.resources.cpu")[5]
    assert row_of(text, "status.conditions")[5] == "at most 32 items; list map keyed by `type`"
    assert row_of(text, "status.conditions[].message")[2] == '`""`'
    assert row_of(text, "status.startTime")[1] == "string (date-time)"
    assert row_of(text, "spec.model.source")[5].startswith("1–2048 characters; CEL: must be one of hf://")
    assert row_of(text, "spec.training.learningRate")[4] == "Peak learning rate."


def test_printer_columns_are_listed() -> None:
    text = render_reference()
    columns = build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    for column in columns:
        assert any(row[0] == column["name"] and row[2] == f"`{column['jsonPath']}`" for row in rows(text)), column
    assert "| Progress% | integer | `.status.progress.percent` | Training steps done, in percent |" in text


def test_a_new_field_and_rule_show_up() -> None:
    crd = copy.deepcopy(build_crd())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["model"]["properties"]["revisionPin"] = {
        "type": "string",
        "description": "A pinned | revision.",
        "enum": ["a", "b"],
    }
    spec["x-kubernetes-validations"].append({"rule": "true", "message": "a brand-new rule"})
    text = render_reference(crd)
    assert row_of(text, "spec.model.revisionPin")[1:5] == [
        "string, one of `a`, `b`",
        "",
        "",
        "A pinned \\| revision.",
    ]
    assert "- a brand-new rule; rule: `true`" in text
    assert text != render_reference()


def test_kubetune_crd_reference_prints_and_writes_it(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "kubetune_cli.main", "crd", "--reference"]
    printed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == render_reference()
    out = tmp_path / "reference.md"
    assert subprocess.run([*command, "--output", str(out)], capture_output=True, check=False).returncode == 0
    assert out.read_text(encoding="utf-8") == render_reference()
