"""The local runtime as a test harness: one real control plane per session, a namespace per test.

Nothing here is mocked: tests talk to a real kube-apiserver, whose controllers and scheduler run
and whose pods run as processes on this machine. The first session on a machine builds the
binaries (about 11 minutes); later ones start in seconds.

The operator's jobs with ``provisioner: karpenter`` get their nodes from their NodePools, which
the cluster's real Karpenter (KWOK provider) launches; the operator points its pools at the KWOK
NodeClass.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from kubetune_local import cluster, karpenter
from kubetune_local.controlplane import free_port, pid_alive
from kubetune_local.kube import api_client
from tests.factories import wait_until

#: Log lines of each pod shown when a test fails (the tail of CI's output is all that is kept of a run).
FAILURE_LOG_LINES = 8


def pods_report(api: client.ApiClient, namespace: str) -> str:
    """Each pod of ``namespace``: phase, readiness, restarts, address and the last lines of its log."""
    core = client.CoreV1Api(api)
    lines = []
    for pod in core.list_namespaced_pod(namespace).items:
        status = pod.status
        ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
        for container in status.container_statuses or []:
            state = container.state
            now = next(k for k in ("running", "waiting", "terminated") if getattr(state, k, None)) if state else "?"
            lines.append(
                f"{pod.metadata.name}/{container.name}: {status.phase} ready={ready} {now} "
                f"restarts={container.restart_count} ip={status.pod_ip}"
                f"{' deleting' if pod.metadata.deletion_timestamp else ''}"
            )
            with contextlib.suppress(client.ApiException, ValueError):
                log = core.read_namespaced_pod_log(
                    pod.metadata.name, namespace, container=container.name, tail_lines=FAILURE_LOG_LINES
                )
                lines.extend(f"  | {line}" for line in str(log).splitlines()[-FAILURE_LOG_LINES:])
    return "\n".join(lines) or "no pods"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report ends with its namespace's pods and their logs' last lines."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    funcargs = getattr(item, "funcargs", {})
    api, namespace = funcargs.get("api"), funcargs.get("namespace")
    if report.when == "call" and report.failed and api is not None and isinstance(namespace, str):
        try:
            report.sections.append((f"pods in {namespace}", pods_report(api, namespace)))
        except Exception as exc:  # a report of the failure must not hide it
            report.sections.append((f"pods in {namespace}", f"cannot list: {exc!r}"))
    running = funcargs.get("operator")
    if report.when == "call" and report.failed and isinstance(running, OperatorProcess) and running.log.exists():
        warned = [
            line
            for line in running.log.read_text(errors="replace").splitlines()
            if "WARNING" in line or "ERROR" in line
        ]
        report.sections.append(("operator warnings", "\n".join(warned[-FAILURE_LOG_LINES:]) or "none"))


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


#: The operator's flags on the local runtime: its NodePools point at the KWOK NodeClass.
NODE_CLASS_ARGS = (
    "--node-class",
    f"{karpenter.KWOK_NODE_CLASS[0]}/{karpenter.KWOK_NODE_CLASS[1]}/{karpenter.NODECLASS_NAME}",
)


@pytest.fixture(scope="session")
def api(local_cluster: cluster.Cluster) -> client.ApiClient:
    return api_client(local_cluster.kubeconfig)


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name}})
    wait_until(lambda: core.list_namespaced_service_account(name).items, what=f"default ServiceAccount in {name}")
    yield name
    core.delete_namespace(name)


CRD = Path(__file__).resolve().parents[2] / "crds" / "kubetune.io_finetunejobs.yaml"
MS_CRD = CRD.with_name("kubetune.io_modelservers.yaml")


class OperatorProcess:
    """``kubetune operator`` as a real process against the local cluster (killable, restartable)."""

    def __init__(self, kubeconfig: Path, log: Path, *extra_args: str) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.extra_args = extra_args
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kubetune_cli.main",
                    "operator",
                    "--metrics-port",
                    str(self.metrics_port),
                    "--health-port",
                    str(self.health_port),
                    "--progress-interval",
                    "1",
                    *NODE_CLASS_ARGS,
                    *self.extra_args,
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._serving, timeout=60, what="the operator's metrics endpoint")

    def _serving(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"the operator exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2):
                return True
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as a crashed or evicted operator."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def install_crd(started: cluster.Cluster) -> None:
    """Apply the FineTuneJob and ModelServer CRDs to ``started`` and wait until they are established."""
    result = started.kubectl("apply", "--server-side", "-f", str(CRD), "-f", str(MS_CRD), check=False)
    assert result.returncode == 0, result.stderr
    extensions = client.ApiextensionsV1Api(api_client(started.kubeconfig))

    def established() -> bool:
        found = [
            extensions.read_custom_resource_definition(name)
            for name in ("finetunejobs.kubetune.io", "modelservers.kubetune.io")
        ]
        return all(
            any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or []) for crd in found
        )

    wait_until(established, what="the FineTuneJob and ModelServer CRDs to be established")


@contextlib.contextmanager
def operator_running(started: cluster.Cluster, log: Path) -> Iterator[OperatorProcess]:
    """An operator process against ``started`` for the ``with`` block, its log at ``log``."""
    running = OperatorProcess(started.kubeconfig, log)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def crd(local_cluster: cluster.Cluster) -> None:
    install_crd(local_cluster)


@pytest.fixture(scope="module")
def operator(
    local_cluster: cluster.Cluster, crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One operator per test module: a module that runs its own (peered replicas) sees no other."""
    with operator_running(local_cluster, tmp_path_factory.mktemp("operator") / "operator.log") as running:
        yield running
