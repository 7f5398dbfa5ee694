"""``kubetune local up | down | status | logs``: one local cluster, rooted at a home folder.

``up`` builds (once) and starts the control plane, installs Karpenter's CRDs, its KWOK NodeClass
and the local StorageClass, starts real Karpenter (its KWOK provider, :mod:`kubetune_local.karpenter`)
and the node daemon, and returns when the default node is Ready; with ``kueue`` it also runs real
Kueue (:mod:`kubetune_local.kueue`) and returns once its webhooks answer. Each ``up`` starts a
fresh cluster; certificates are kept. ``down`` stops everything it started and then sweeps any
process that still carries the cluster's marker in its environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_local.binaries import Binaries, ensure_binaries, karpenter_crds
from kubetune_local.controlplane import (
    COMPONENTS,
    MARK_ENV,
    ControlPlane,
    State,
    pid_alive,
    spawn_logged,
    stop_process,
)

__all__ = ["AlreadyRunning", "Cluster", "State", "down", "marked_processes", "pod_log", "status", "up"]
from kubetune_local import karpenter
from kubetune_local import kueue as local_kueue
from kubetune_local.daemon import DEFAULT_NODE
from kubetune_local.kube import api_client
from kubetune_local.storage import storage_class

DAEMON = "node-daemon"
KARPENTER = "karpenter"
KUEUE = "kueue"

Progress = Callable[[str], None]


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class AlreadyRunning(RuntimeError):  # noqa: N818 - a state, reported to the user
    """``up`` found a cluster of this home still running."""


@dataclass(frozen=True)
class Cluster:
    """A running local cluster."""

    home: Path
    kubeconfig: Path
    binaries: Binaries
    state: State
    seconds_to_ready: float

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=check,
        )


def running(home: Path) -> dict[str, bool]:
    """Each recorded component and whether its process is alive."""
    state = State.load(home)
    return {name: pid_alive(pid) for name, pid in state.pids.items()}


def up(home: Path, *, progress: Progress = _say, timeout: float = 180.0, kueue: bool | None = None) -> Cluster:
    """Start a fresh local cluster and return once a node is Ready (and Kueue admits, with it).

    Karpenter (built on first use, like the control plane) launches the nodes of NodePools; the
    node daemon adopts them and runs their pods as processes. ``kueue``: also run real Kueue
    (built on first use), its CRDs and webhooks installed; by default ``$KUBETUNE_LOCAL_KUEUE``
    (1, true or yes), else off. Recorded as ``State.kueue``.
    """
    with_kueue = local_kueue.enabled_by_environment() if kueue is None else kueue
    home.mkdir(parents=True, exist_ok=True)
    alive = [name for name, ok in running(home).items() if ok]
    if alive:
        raise AlreadyRunning(
            f"a local cluster is already running from {home} ({', '.join(alive)}); "
            f"run `kubetune local down` first, or use it: export KUBECONFIG={home / 'kubeconfig'}"
        )
    binaries = ensure_binaries(progress=progress)
    crds = [_load(path) for path in [*karpenter_crds(progress=progress), karpenter.nodeclass_crd()]]
    karpenter_binary = karpenter.ensure_binary(progress=progress)
    kueue_built = (
        (local_kueue.ensure_binary(progress=progress), local_kueue.manifests(progress=progress)) if with_kueue else None
    )
    started = time.monotonic()
    for stale in ("etcd", "pods", "volumes", "logs"):
        shutil.rmtree(home / stale, ignore_errors=True)
    plane = ControlPlane(home, binaries)
    progress("starting etcd, kube-apiserver, kube-controller-manager and kube-scheduler")
    state = plane.start(timeout=timeout)
    state.kueue = with_kueue
    state.save(home)
    try:
        api = api_client(plane.kubeconfig)
        kueue_run = local_kueue.prepare(home, *kueue_built) if kueue_built else None
        if kueue_run is not None:
            crds += local_kueue.crd_documents(
                kueue_run.manifests, port=kueue_run.ports.webhook, ca_bundle=kueue_run.ca_bundle
            )
        _install(api, crds)
        client.CustomObjectsApi(api).create_cluster_custom_object(
            "karpenter.kwok.sh", "v1alpha1", "kwoknodeclasses", karpenter.nodeclass()
        )
        state.pids[KARPENTER] = karpenter.spawn(home, karpenter_binary)
        state.save(home)
        progress("starting Karpenter (KWOK provider; its Nodes are adopted by the node daemon)")
        if kueue_run is not None:
            _spawn_kueue(api, home, state, kueue_run, progress)
        state.pids[DAEMON] = _spawn_daemon(home)
        state.save(home)
        progress("starting the node daemon (process-backed nodes, local volumes)")
        if kueue_run is not None:
            _start_kueue_webhooks(api, home, kueue_run, timeout)
        _wait_ready(api, home, timeout)
    except BaseException:
        down(home, progress=lambda _line: None)
        raise
    return Cluster(home, plane.kubeconfig, binaries, state, time.monotonic() - started)


def _load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded


def _spawn_kueue(api: client.ApiClient, home: Path, state: State, setup: local_kueue.Setup, progress: Progress) -> None:
    with contextlib.suppress(ApiException):  # 409: already there
        client.CoreV1Api(api).create_namespace({"metadata": {"name": local_kueue.NAMESPACE}})
    state.pids[KUEUE] = local_kueue.spawn(home, setup)
    state.save(home)
    progress(f"starting Kueue {local_kueue.KUEUE_VERSION} (webhooks on 127.0.0.1:{setup.ports.webhook})")


def _start_kueue_webhooks(api: client.ApiClient, home: Path, setup: local_kueue.Setup, timeout: float) -> None:
    """Wait until Kueue is ready, install its webhook configurations, and return once the
    apiserver calls them: a dry-run Job with a queue label comes back suspended."""
    pid = State.load(home).pids[KUEUE]
    log = home / "logs" / "kueue.log"
    deadline = time.monotonic() + timeout
    readyz = f"http://127.0.0.1:{setup.ports.health}/readyz"
    while not _answers(readyz):
        if not pid_alive(pid):
            raise RuntimeError(f"Kueue exited during start-up; see {log}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Kueue not ready at {readyz} after {timeout:.0f}s; see {log}:\n{_tail(log)}")
        time.sleep(0.3)
    documents = list(yaml.safe_load_all(setup.manifests.webhooks.read_text(encoding="utf-8")))
    admission = client.AdmissionregistrationV1Api(api)
    for configuration in local_kueue.webhook_configurations(
        [d for d in documents if d], port=setup.ports.webhook, ca_bundle=setup.ca_bundle
    ):
        if configuration["kind"] == "MutatingWebhookConfiguration":
            admission.create_mutating_webhook_configuration(configuration)
        else:
            admission.create_validating_webhook_configuration(configuration)
    batch = client.BatchV1Api(api)
    last = ""
    while time.monotonic() < deadline:
        try:
            answer = batch.create_namespaced_job("default", _probe_job(), dry_run="All")
            if answer.spec.suspend:
                return
            last = "the dry-run Job came back unsuspended (the mutating webhook is not called yet)"
        except ApiException as exc:
            last = f"{exc.status}: {exc.body}"
        if not pid_alive(pid):
            raise RuntimeError(f"Kueue exited during start-up; see {log}:\n{_tail(log)}")
        time.sleep(0.3)
    raise TimeoutError(f"Kueue's webhooks do not answer the apiserver after {timeout:.0f}s ({last}); see {log}")


def _probe_job() -> dict[str, Any]:
    """A Job with a queue label, created unsuspended, only ever sent as a dry run."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "kueue-webhook-probe", "labels": {local_kueue.QUEUE_LABEL: "probe"}},
        "spec": {
            "suspend": False,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "probe", "image": "probe", "command": ["true"]}],
                }
            },
        },
    }


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - a loopback URL of ours
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def _install(api: client.ApiClient, crds: list[dict[str, Any]]) -> None:
    extensions = client.ApiextensionsV1Api(api)
    for crd in crds:
        with contextlib.suppress(ApiException):  # 409: already there
            extensions.create_custom_resource_definition(crd)
    with contextlib.suppress(ApiException):
        client.StorageV1Api(api).create_storage_class(storage_class())
    deadline = time.monotonic() + 60
    names = [crd["metadata"]["name"] for crd in crds]
    while time.monotonic() < deadline:
        established = [
            any(
                c.type == "Established" and c.status == "True"
                for c in (extensions.read_custom_resource_definition(n).status.conditions or [])
            )
            for n in names
        ]
        if all(established):
            return
        time.sleep(0.2)
    raise TimeoutError(f"CRDs {names} not established after 60s")


def _spawn_daemon(home: Path) -> int:
    return spawn_logged(
        [sys.executable, "-m", "kubetune_local.daemon", "--home", str(home)],
        home / "logs" / f"{DAEMON}.log",
        env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
    )


def _wait_ready(api: client.ApiClient, home: Path, timeout: float) -> None:
    core = client.CoreV1Api(api)
    deadline = time.monotonic() + timeout
    state = State.load(home)
    while time.monotonic() < deadline:
        if not pid_alive(state.pids[DAEMON]):
            log = (home / "logs" / f"{DAEMON}.log").read_text(encoding="utf-8", errors="replace")
            raise RuntimeError(f"the node daemon exited during start-up:\n{log[-3000:]}")
        with contextlib.suppress(ApiException):
            node = core.read_node(DEFAULT_NODE)
            ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
            accounts = core.list_namespaced_service_account("default").items
            if ready and accounts:
                return
        time.sleep(0.3)
    raise TimeoutError(f"node {DEFAULT_NODE} not Ready after {timeout:.0f}s; see {home / 'logs'}")


def marked_processes(home: Path) -> list[int]:
    """Processes started for this cluster's pods (their environment names its home)."""
    marker = f"{MARK_ENV}={home}".encode()
    found = []
    spared = _ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def _ancestors() -> set[int]:
    """This process and its parents (never swept, whatever their environment holds)."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def down(home: Path, *, progress: Progress = _say) -> list[str]:
    """Stop Kueue and Karpenter, the node daemon (and so every pod), then the control plane;
    return what was stopped."""
    state = State.load(home)
    stopped = []
    order = [KUEUE, KARPENTER, DAEMON, *reversed(COMPONENTS)]
    for name in order:
        pid = state.pids.get(name)
        if pid is not None and pid_alive(pid):
            stop_process(pid, grace=20.0 if name == DAEMON else 10.0)
            stopped.append(name)
            progress(f"stopped {name}")
    for pid in marked_processes(home):
        stop_process(pid, grace=2.0)
        stopped.append(f"pod process {pid}")
    state.pids.clear()
    state.save(home)
    left = [n for n in order if (p := State.load(home).pids.get(n)) and pid_alive(p)] + [
        str(p) for p in marked_processes(home)
    ]
    if left:
        raise RuntimeError(f"processes still running after down: {', '.join(left)}")
    return stopped


def status(home: Path) -> str:
    """What runs, and the nodes the apiserver knows."""
    alive = running(home)
    if not alive:
        return f"no local cluster recorded in {home}"
    lines = [f"{name:<24} {'running' if ok else 'stopped'}" for name, ok in alive.items()]
    if alive.get("kube-apiserver"):
        with contextlib.suppress(Exception):
            core = client.CoreV1Api(api_client(home / "kubeconfig"))
            for node in core.list_node().items:
                ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
                gpus = (node.status.allocatable or {}).get("nvidia.com/gpu", "0")
                lines.append(f"node {node.metadata.name:<19} {'Ready' if ready else 'NotReady'} gpus={gpus}")
        lines.append(f"export KUBECONFIG={home / 'kubeconfig'}")
    return "\n".join(lines)


def pod_log(home: Path, pod: str, *, namespace: str = "default", container: str | None = None) -> str:
    """A container's log, read from the node daemon's files (works after the pod ended)."""
    core = client.CoreV1Api(api_client(home / "kubeconfig"))
    found = json.loads(core.read_namespaced_pod(pod, namespace, _preload_content=False).data)
    names = [c["name"] for c in found["spec"]["containers"]]
    chosen = container or names[0]
    path: Path = home / "pods" / str(found["metadata"]["uid"]) / "logs" / f"{chosen}.log"
    if not path.exists():
        raise FileNotFoundError(
            f"no log for container {chosen!r} of {namespace}/{pod} (containers: {', '.join(names)})"
        )
    return path.read_text(encoding="utf-8", errors="replace")
