"""Shared test data and services: the repository's paths, the example manifests, the bad-input corpus,
and a real OCI registry (``oci_registry``)."""

from __future__ import annotations

import base64
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
#: The FineTuneJob manifests of examples/ (not the other kinds beside them, such as Kueue's queues).
EXAMPLES = sorted(
    path
    for path in (REPO / "examples").glob("*.yaml")
    if (next(yaml.safe_load_all(path.read_text(encoding="utf-8"))) or {}).get("kind") == "FineTuneJob"
)
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


class OciRegistry(NamedTuple):
    """A running registry: ``host`` (``127.0.0.1:PORT``, plain HTTP) and the one user it accepts."""

    host: str
    user: str
    password: str

    def docker_config(self, folder: Path, *, password: str | None = None, name: str = ".dockerconfigjson") -> Path:
        """Write a Docker config for this registry (``password`` overrides the right one) as ``folder/name``."""
        folder.mkdir(parents=True, exist_ok=True)
        auth = base64.b64encode(f"{self.user}:{password or self.password}".encode()).decode()
        path = folder / name
        path.write_text(json.dumps({"auths": {self.host: {"auth": auth}}}), encoding="utf-8")
        return path


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciRegistry]:
    """A real registry (Debian's docker-registry, htpasswd auth) on loopback for the session; `make registry` installs it."""
    from kubetune_local.registry import LocalRegistry  # noqa: PLC0415 - only the tests that use a registry need it

    registry = LocalRegistry()
    user, password = "kubetune", secrets.token_urlsafe(16)
    host = registry.start(tmp_path_factory.mktemp("oci-registry"), user, password)
    try:
        yield OciRegistry(host, user, password)
    finally:
        registry.stop()
