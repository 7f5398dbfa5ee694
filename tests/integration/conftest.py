"""The local runtime as a test harness: one real control plane per session, a namespace per test.

Nothing here is mocked: tests talk to a real kube-apiserver, whose controllers and scheduler run
and whose pods run as processes on this machine. The first session on a machine builds the
binaries (about 11 minutes); later ones start in seconds.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from kubernetes import client

from kubetune_local import cluster
from kubetune_local.controlplane import pid_alive
from kubetune_local.kube import api_client

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], *, timeout: float = 60.0, what: str = "condition") -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return cast(T, last)
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cluster.Cluster]:
    home = Path(os.environ.get("KUBETUNE_TEST_HOME") or tmp_path_factory.mktemp("kubetune-local"))
    started = cluster.up(home)
    try:
        yield started
    finally:
        cluster.down(home, progress=lambda _line: None)
    leftovers = [name for name, pid in cluster.State.load(home).pids.items() if pid_alive(pid)]
    assert leftovers == [], f"still running after down: {leftovers}"
    assert cluster.marked_processes(home) == []


@pytest.fixture(scope="session")
def api(local_cluster: cluster.Cluster) -> client.ApiClient:
    return api_client(local_cluster.kubeconfig)


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: core.list_namespaced_service_account(name).items, what=f"default ServiceAccount in {name}")
    yield name
    core.delete_namespace(name)
