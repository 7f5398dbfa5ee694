"""Shared test data: the repository's paths, the example manifests and the bad-input corpus."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
BAD_INPUT = sorted((REPO / "tests" / "bad_input").glob("*.yaml"))


@dataclass(frozen=True)
class BadManifest:
    """One manifest of the bad-input corpus and the field its rejection must name."""

    name: str
    manifest: dict[str, Any]
    expect: str
    why: str


def load_bad_input() -> list[BadManifest]:
    cases = []
    for path in BAD_INPUT:
        text = path.read_text(encoding="utf-8")
        expect = re.search(r"^# expect: (\S+)$", text, re.MULTILINE)
        why = text.splitlines()[0].lstrip("# ")
        assert expect, f"{path} lacks an '# expect: <field>' line"
        cases.append(BadManifest(path.stem, yaml.safe_load(text), expect.group(1), why))
    return cases


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data
