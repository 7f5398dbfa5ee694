"""The Helm chart and the Dockerfile under test: a helm runner, and the local cluster for installs.

``helm`` is the binary the local runtime builds (``kubetune local build``), run with throwaway
cache, config and data folders so that nothing of the user's Helm setup leaks into a test.

The cluster fixtures are the integration tests' own (``tests/integration/conftest.py``), with
one difference: the cluster lives for this package only, not the whole session. The chart's
operator is a real ``kubetune operator`` process that binds kopf's health port (8081) on this
machine, so it must be gone before ``tests/integration`` starts an operator of its own; and a
session-wide second cluster would hold memory and, with ``KUBETUNE_TEST_HOME`` set, collide with
the first one's home.
"""

from __future__ import annotations

import inspect
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kubetune_local import cluster
from kubetune_local.binaries import ensure_binaries
from kubetune_local.kube import api_client
from tests.conftest import REPO
from tests.integration import conftest as integration
from tests.integration.conftest import namespace

__all__ = ["CHART", "SCENARIOS", "Helm", "Manifest", "api", "helm", "local_cluster", "namespace"]

CHART = REPO / "charts" / "kubetune"
#: The chart's CI scenarios: ci/<name>-values.yaml.
SCENARIOS = {path.name.removesuffix("-values.yaml"): path for path in sorted((CHART / "ci").glob("*-values.yaml"))}

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Helm:
    """The helm binary with an environment of its own."""

    binary: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args], env=self.env, capture_output=True, text=True, check=False, timeout=180
        )
        if check and result.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} exited with {result.returncode}:\n{result.stderr}")
        return result

    def template(self, *args: str, namespace: str = "kubetune-system") -> list[Manifest]:
        """The chart rendered with ``args`` (values files, --set), as parsed manifests."""
        rendered = self.run("template", "kubetune", str(CHART), "--namespace", namespace, "--include-crds", *args)
        return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    binaries = ensure_binaries(with_helm=True)
    assert binaries.helm is not None, "ensure_binaries(with_helm=True) returned no helm"
    home = tmp_path_factory.mktemp("helm")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    env.pop("KUBECONFIG", None)  # a test names its cluster explicitly, or has none
    return Helm(binaries.helm, env)


@pytest.fixture(scope="package")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Cluster]:
    """The integration tests' cluster (same start, same checks that nothing is left), for this package."""
    start = inspect.unwrap(integration.local_cluster)
    yield from start(tmp_path_factory)


@pytest.fixture(scope="package")
def api(local_cluster: cluster.Cluster) -> client.ApiClient:
    return api_client(local_cluster.kubeconfig)
