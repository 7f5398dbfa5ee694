"""Start and stop a real Kubernetes control plane on loopback: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, as background processes.

The apiserver runs as in a cluster: TLS from a throwaway CA, client-certificate
authentication, RBAC authorization, service-account tokens signed with their own key and the
ServiceAccount admission plugin. What runs is recorded in ``<home>/state.json`` so that a later
``down`` or ``status`` (another process) finds it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Final

from kubetune_local.binaries import Binaries
from kubetune_local.pki import CertificateAuthority, KeyPair, service_account_keys

#: The order processes start in; they stop in reverse.
COMPONENTS: Final = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
SERVICE_CIDR: Final = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER: Final = "https://kubernetes.default.svc.cluster.local"


#: Set in the environment of every process started for a cluster's pods (and the demo's operator) to
#: its home: `down` stops what carries it. Not KUBETUNE_LOCAL_HOME, which users export themselves.
MARK_ENV: Final = "KUBETUNE_LOCAL_CLUSTER"


def default_home() -> Path:
    """``$KUBETUNE_LOCAL_HOME`` or ``~/.kubetune/local``: certificates, data, logs and the kubeconfig."""
    return Path(os.environ.get("KUBETUNE_LOCAL_HOME", Path.home() / ".kubetune" / "local"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_process(pid: int, *, grace: float = 10.0) -> None:
    """SIGTERM the process (and its group when it leads one), then SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.1)


def spawn_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start ``command`` as a process of its own session, its output appended to ``log``; return its pid.

    Every process of a local cluster starts so: detached from the caller's terminal and signals,
    stopped by ``down`` through the pid the caller records.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
    return process.pid


@dataclass
class State:
    """What ``up`` started, persisted for ``down`` and ``status``."""

    apiserver_port: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    kueue: bool = False
    """Whether real Kueue runs as a process of the cluster (``up(kueue=True)``)."""

    @classmethod
    def load(cls, home: Path) -> State:
        path = home / "state.json"
        if not path.exists():
            return cls()
        known = {f.name for f in fields(cls)}
        # A state written by an older kubetune may carry fields this one no longer has.
        return cls(**{k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k in known})

    def save(self, home: Path) -> None:
        temporary = home / "state.json.tmp"
        temporary.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        temporary.replace(home / "state.json")


class ControlPlane:
    """The control-plane processes of one local cluster, rooted at ``home``."""

    def __init__(self, home: Path, binaries: Binaries) -> None:
        self.home = home
        self.binaries = binaries
        self.pki = home / "pki"
        self.logs = home / "logs"
        self.kubeconfig = home / "kubeconfig"

    # ------------------------------------------------------------------------ credentials

    def _credentials(self) -> dict[str, KeyPair]:
        ca = CertificateAuthority(self.pki)
        return {
            "ca": ca.pair,
            "apiserver": ca.issue(
                "apiserver",
                common_name="kube-apiserver",
                dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
                ip_addresses=("127.0.0.1", "10.0.0.1"),
                server=True,
            ),
            "admin": ca.issue("admin", common_name="kubetune-admin", organizations=("system:masters",), client=True),
            "controller-manager": ca.issue(
                "controller-manager", common_name="system:kube-controller-manager", client=True
            ),
            "scheduler": ca.issue("scheduler", common_name="system:kube-scheduler", client=True),
            "kubelet-client": ca.issue(
                "kubelet-client",
                common_name="kube-apiserver-kubelet-client",
                organizations=("system:masters",),
                client=True,
            ),
            "kubelet-serving": ca.issue(
                "kubelet-serving", common_name="kubetune-node", ip_addresses=("127.0.0.1",), server=True
            ),
            "service-accounts": service_account_keys(self.pki),
        }

    def write_kubeconfig(self, path: Path, user: str, pair: KeyPair, port: int) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetune-local",
                    "cluster": {
                        "server": f"https://127.0.0.1:{port}",
                        "certificate-authority": str(self.pki / "ca.crt"),
                    },
                }
            ],
            "users": [{"name": user, "user": {"client-certificate": str(pair.cert), "client-key": str(pair.key)}}],
            "contexts": [{"name": "kubetune-local", "context": {"cluster": "kubetune-local", "user": user}}],
            "current-context": "kubetune-local",
        }
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        path.chmod(0o600)

    # --------------------------------------------------------------------------- lifecycle

    def start(self, *, timeout: float = 180.0) -> State:
        """Start every component and return once the apiserver is ready and the controllers are healthy."""
        for directory in (self.pki, self.logs):
            directory.mkdir(parents=True, exist_ok=True)
        creds = self._credentials()
        state = State(apiserver_port=free_port(), started_at=time.time())
        ports = {"etcd": free_port(), "etcd-peer": free_port(), "kcm": free_port(), "scheduler": free_port()}
        self.write_kubeconfig(self.kubeconfig, "kubetune-admin", creds["admin"], state.apiserver_port)
        for user in ("controller-manager", "scheduler"):
            self.write_kubeconfig(self.pki / f"{user}.kubeconfig", user, creds[user], state.apiserver_port)
        commands = self._commands(creds, state.apiserver_port, ports)
        try:
            for name in COMPONENTS:
                state.pids[name] = self._spawn(name, commands[name])
                state.save(self.home)
                if name == "etcd":
                    self._wait(f"http://127.0.0.1:{ports['etcd']}/health", timeout, name, state)
                elif name == "kube-apiserver":
                    self._wait(f"https://127.0.0.1:{state.apiserver_port}/readyz", timeout, name, state)
            self._wait(f"https://127.0.0.1:{ports['kcm']}/healthz", timeout, "kube-controller-manager", state)
            self._wait(f"https://127.0.0.1:{ports['scheduler']}/healthz", timeout, "kube-scheduler", state)
        except BaseException:
            self.stop(state)
            raise
        return state

    def _commands(self, creds: dict[str, KeyPair], api_port: int, ports: dict[str, int]) -> dict[str, list[str]]:
        b = self.binaries
        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
        sa = creds["service-accounts"]
        return {
            "etcd": [
                str(b.etcd),
                "--name=kubetune",
                f"--data-dir={self.home / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kubetune={peer_url}",
                "--unsafe-no-fsync",  # a throwaway cluster: speed over durability
                "--log-level=warn",
            ],
            "kube-apiserver": [
                str(b.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={creds['apiserver'].cert}",
                f"--tls-private-key-file={creds['apiserver'].key}",
                f"--client-ca-file={creds['ca'].cert}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Endpoints may not point at loopback; the local runtime reaches the apiserver directly.
                "--endpoint-reconciler-type=none",
                f"--kubelet-client-certificate={creds['kubelet-client'].cert}",
                f"--kubelet-client-key={creds['kubelet-client'].key}",
                f"--kubelet-certificate-authority={creds['ca'].cert}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--cert-dir={self.pki / 'apiserver-generated'}",
            ],
            "kube-controller-manager": [
                str(b.kube_controller_manager),
                *self._component_auth("controller-manager"),
                f"--secure-port={ports['kcm']}",
                f"--cert-dir={self.pki / 'kcm-generated'}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={sa.key}",
                f"--root-ca-file={creds['ca'].cert}",
                f"--cluster-signing-cert-file={creds['ca'].cert}",
                f"--cluster-signing-key-file={creds['ca'].key}",
                # Pods on a process-backed node that stops heartbeating are evicted quickly.
                "--node-monitor-grace-period=20s",
            ],
            "kube-scheduler": [
                str(b.kube_scheduler),
                *self._component_auth("scheduler"),
                f"--secure-port={ports['scheduler']}",
                f"--cert-dir={self.pki / 'scheduler-generated'}",
                "--leader-elect=false",
            ],
        }

    def _component_auth(self, user: str) -> list[str]:
        kubeconfig = self.pki / f"{user}.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
        ]

    def _spawn(self, name: str, command: list[str]) -> int:
        return spawn_logged(command, self.logs / f"{name}.log")

    def _wait(self, url: str, timeout: float, name: str, state: State) -> None:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        if "/healthz" in url:
            # The controller manager and scheduler serve self-signed certificates of their own.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            pid = state.pids.get(name)
            if pid is not None and not pid_alive(pid):
                raise RuntimeError(
                    f"{name} exited during start-up; see {self.logs / (name + '.log')}:\n{self.tail(name)}"
                )
            try:
                with urllib.request.urlopen(url, context=context, timeout=5) as response:  # noqa: S310 - loopback
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.3)
        raise TimeoutError(f"{name} not ready after {timeout:.0f}s ({last}); see {self.logs / (name + '.log')}")

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def stop(self, state: State | None = None) -> None:
        """Stop every recorded component, newest first; etcd last so the apiserver shuts down cleanly."""
        state = state or State.load(self.home)
        for name in reversed(list(state.pids)):
            stop_process(state.pids[name])
        state.pids.clear()
        state.save(self.home)
