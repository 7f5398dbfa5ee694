"""Run one pod as local processes, the way a kubelet runs it in containers.

The image is recorded, not pulled: commands run in the current Python environment. Volumes
become folders (ConfigMaps and Secrets written out, PVCs mapped to their PersistentVolume's
folder, emptyDirs created, memory-backed ones under /dev/shm), and every mount path that appears
in a container's command, args, env or working directory is rewritten to its folder. The pod
gets its own loopback address, and the cluster DNS names of the runtime's pods are replaced by
their addresses. Exit codes, restarts and phases are reported in the pod's status, as a kubelet
does, so Jobs, Deployments and the operator see what they would see in a cluster.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_local.controlplane import MARK_ENV

if TYPE_CHECKING:
    from kubetune_local.node import Runtime

Obj = dict[str, Any]

#: Environment variables of the runtime itself that a pod must not inherit: pods get the API
#: only through their own service-account token, as in a cluster.
_NOT_INHERITED: Final = ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
_SERVICE_ACCOUNT_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"
_RESTART_BACKOFF_MAX: Final = 10.0


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class VolumeNotReady(Exception):  # noqa: N818 - a state to wait in, not an error
    """A volume's source (ConfigMap, Secret, PVC) does not exist or is not bound yet."""


@dataclass
class ContainerRun:
    """One container of the pod: its spec, its process and what the status reports."""

    spec: Obj
    init: bool = False
    process: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    restart_count: int = 0
    last_state: Obj = field(default_factory=dict)
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    ready: bool = False
    next_probe: float = 0.0
    restart_at: float = 0.0

    @property
    def name(self) -> str:
        return str(self.spec["name"])


def _exit_code(returncode: int) -> int:
    """Popen reports death by signal N as -N; Kubernetes reports 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion; ``$$(VAR)`` stays literal."""

    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return "$(" + match.group(2) + ")"
        return env.get(match.group(2), match.group(0))

    return re.sub(r"(\$)?\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, text)


class PodRunner(threading.Thread):
    """Runs one pod to completion (or until it is deleted) and keeps its status current."""

    def __init__(self, runtime: Runtime, node_name: str, pod: Obj) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}-{meta['name']}", daemon=True)
        self.runtime = runtime
        self.node_name = node_name
        self.pod = pod
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.spec: Obj = pod["spec"]
        self.root: Path = runtime.home / "pods" / self.uid
        self.logs = self.root / "logs"
        self.core = client.CoreV1Api(runtime.api)
        self.hostname: str = self.spec.get("hostname") or self.pod_name
        self.subdomain: str | None = self.spec.get("subdomain")
        self.ip = runtime.addresses.address_for_pod(self.uid, self.hostname, self.subdomain, self.namespace)
        self.stopping = threading.Event()
        self.stop_reason = ""
        self.stop_message = ""
        self.grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
        self.mounts: dict[str, Path] = {}
        self.volumes: dict[str, Path] = {}
        self.init_runs = [ContainerRun(c, init=True) for c in self.spec.get("initContainers", [])]
        self.runs = [ContainerRun(c) for c in self.spec.get("containers", [])]
        self.phase = "Pending"
        self.message = ""
        self.reason = ""
        self.started = time.monotonic()
        self.start_time = now()
        self.finished = threading.Event()

    # ------------------------------------------------------------------------- lifecycle

    def stop(self, grace: float | None = None, *, reason: str = "", message: str = "") -> None:
        """Stop the pod: SIGTERM the processes, SIGKILL after the grace period.

        With a ``reason`` (the node went away) the pod is then reported Failed with it; without
        one the pod is being deleted and no status is left to write.
        """
        if grace is not None:
            self.grace = grace
        self.stop_reason, self.stop_message = reason, message
        self.stopping.set()

    def run(self) -> None:
        try:
            self._run()
            if self.stopping.is_set() and self.stop_reason and self.phase not in ("Succeeded", "Failed"):
                self.phase, self.reason, self.message = "Failed", self.stop_reason, self.stop_message
                self._report()
        except Exception as exc:  # a bug or an API failure: say so in the pod, never die silently
            self.runtime.log(f"pod {self.namespace}/{self.pod_name}: {exc!r}")
            self._kill_all()
            self.phase, self.reason, self.message = "Failed", "LocalRuntimeError", str(exc)
            with contextlib.suppress(Exception):
                self._report()
        finally:
            self.finished.set()

    def _run(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._report()
        while not self.stopping.is_set():
            try:
                self._prepare_volumes()
                break
            except VolumeNotReady as waiting:
                self._set_waiting_all("ContainerCreating", str(waiting))
                self._report()
                self.stopping.wait(2)
        if self.stopping.is_set():
            return
        for run in self.init_runs:
            if not self._run_init(run):
                return
        self._supervise()

    def _deadline_passed(self) -> bool:
        deadline = self.spec.get("activeDeadlineSeconds")
        return deadline is not None and time.monotonic() - self.started > float(deadline)

    def _run_init(self, run: ContainerRun) -> bool:
        """Run an init container to completion; restart it per restartPolicy; False when the pod ends."""
        while True:
            if not self._start(run):
                return self._fail_init(run)
            self._report()
            while run.process is not None and run.process.poll() is None:
                if self.stopping.is_set():
                    self._kill_all()
                    return False
                if self._deadline_passed():
                    self._deadline_exceeded()
                    return False
                time.sleep(0.2)
            assert run.process is not None
            code = _exit_code(run.process.returncode)
            self._terminated(run, code)
            if code == 0:
                self._report()
                return True
            if self.spec.get("restartPolicy", "Always") == "Never":
                return self._fail_init(run)
            run.restart_count += 1
            self._report()
            time.sleep(min(2**run.restart_count, _RESTART_BACKOFF_MAX))

    def _fail_init(self, run: ContainerRun) -> bool:
        self.phase, self.reason = "Failed", "InitContainerFailed"
        self.message = f"init container {run.name} failed"
        for main in self.runs:
            main.state = {"waiting": {"reason": "PodInitializing"}}
        self._report()
        return False

    def _supervise(self) -> None:
        """Start the containers, restart them per restartPolicy, probe readiness, end the pod."""
        policy = self.spec.get("restartPolicy", "Always")
        for run in self.runs:
            self._start(run)
        self.phase = "Running"
        self._report()
        while True:
            changed = False
            if self.stopping.is_set():
                self._kill_all()
                return
            if self._deadline_passed():
                self._deadline_exceeded()
                return
            for run in self.runs:
                if run.process is not None and run.process.poll() is not None:
                    code = _exit_code(run.process.returncode)
                    self._terminated(run, code)
                    changed = True
                    if policy == "Always" or (policy == "OnFailure" and code != 0):
                        run.restart_at = time.monotonic() + min(2 ** (run.restart_count + 1), _RESTART_BACKOFF_MAX)
                        run.state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"exited with {code}"}}
                        run.last_state = {"terminated": run.last_state["terminated"]}
                elif run.process is None and run.restart_at and time.monotonic() >= run.restart_at:
                    run.restart_count += 1
                    run.restart_at = 0.0
                    self._start(run)
                    changed = True
                if run.process is not None and run.process.poll() is None:
                    changed |= self._probe(run)
            if all(r.process is None and not r.restart_at for r in self.runs):
                codes = [r.last_state.get("terminated", {}).get("exitCode", 1) for r in self.runs]
                self.phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
                self._report()
                return
            if changed:
                self._report()
            time.sleep(0.2)

    def _deadline_exceeded(self) -> None:
        self._kill_all()
        self.phase, self.reason = "Failed", "DeadlineExceeded"
        self.message = f"Pod was active on the node longer than {self.spec['activeDeadlineSeconds']}s"
        self._report()

    # ---------------------------------------------------------------------------- volumes

    def _read(self, kind: str, name: str, optional: bool) -> Obj | None:
        try:
            if kind == "ConfigMap":
                obj = self.core.read_namespaced_config_map(name, self.namespace)
            else:
                obj = self.core.read_namespaced_secret(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                if optional:
                    return None
                raise VolumeNotReady(f'{kind.lower()} "{name}" not found') from None
            raise
        data: Obj = self.runtime.api.sanitize_for_serialization(obj)
        return data

    @staticmethod
    def _files_of(kind: str, obj: Obj | None, items: list[Obj] | None) -> dict[str, bytes]:
        if obj is None:
            return {}
        raw: dict[str, bytes] = {}
        for key, value in (obj.get("data") or {}).items():
            raw[key] = base64.b64decode(value) if kind == "Secret" else str(value).encode()
        for key, value in (obj.get("binaryData") or {}).items():
            raw[key] = base64.b64decode(value)
        if items:
            return {item["path"]: raw[item["key"]] for item in items if item["key"] in raw}
        return raw

    def _field(self, path: str) -> str:
        """A downward-API fieldRef value."""
        meta = self.pod["metadata"]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        values = {
            "metadata.name": self.pod_name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.nodeName": self.node_name,
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
            "status.podIP": self.ip,
            "status.podIPs": self.ip,
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
            "metadata.labels": "\n".join(f'{k}="{v}"' for k, v in (meta.get("labels") or {}).items()),
            "metadata.annotations": "\n".join(f'{k}="{v}"' for k, v in (meta.get("annotations") or {}).items()),
        }
        return str(values.get(path, ""))

    def _downward_files(self, items: list[Obj]) -> dict[str, bytes]:
        return {
            item["path"]: self._field(item["fieldRef"]["fieldPath"]).encode() for item in items if "fieldRef" in item
        }

    def _token(self, source: Obj) -> bytes:
        """A TokenRequest for the pod's service account, bound to the pod."""
        account = self.spec.get("serviceAccountName", "default")
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[source["audience"]] if source.get("audience") else [],
                expiration_seconds=int(source.get("expirationSeconds", 3607)),
                bound_object_ref=client.V1BoundObjectReference(
                    kind="Pod", api_version="v1", name=self.pod_name, uid=self.uid
                ),
            )
        )
        response = self.core.create_namespaced_service_account_token(account, self.namespace, request)
        return str(response.status.token).encode()

    def _volume_files(self, volume: Obj) -> dict[str, bytes] | None:
        """Files of a ConfigMap, Secret, downwardAPI or projected volume; None for other kinds."""
        if "configMap" in volume:
            source = volume["configMap"]
            return self._files_of(
                "ConfigMap", self._read("ConfigMap", source["name"], source.get("optional", False)), source.get("items")
            )
        if "secret" in volume:
            source = volume["secret"]
            obj = self._read("Secret", source["secretName"], source.get("optional", False))
            return self._files_of("Secret", obj, source.get("items"))
        if "downwardAPI" in volume:
            return self._downward_files(volume["downwardAPI"].get("items", []))
        if "projected" in volume:
            files: dict[str, bytes] = {}
            for source in volume["projected"].get("sources", []):
                if "configMap" in source:
                    cm = source["configMap"]
                    files.update(
                        self._files_of(
                            "ConfigMap", self._read("ConfigMap", cm["name"], cm.get("optional", False)), cm.get("items")
                        )
                    )
                elif "secret" in source:
                    secret = source["secret"]
                    obj = self._read("Secret", secret["name"], secret.get("optional", False))
                    files.update(self._files_of("Secret", obj, secret.get("items")))
                elif "downwardAPI" in source:
                    files.update(self._downward_files(source["downwardAPI"].get("items", [])))
                elif "serviceAccountToken" in source:
                    files[source["serviceAccountToken"]["path"]] = self._token(source["serviceAccountToken"])
            return files
        return None

    def _claim_directory(self, claim: str) -> Path:
        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(claim, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise VolumeNotReady(f'persistentvolumeclaim "{claim}" not found') from None
            raise
        if pvc.status.phase != "Bound" or not pvc.spec.volume_name:
            raise VolumeNotReady(f'persistentvolumeclaim "{claim}" is not bound yet')
        pv = self.core.read_persistent_volume(pvc.spec.volume_name)
        path = (pv.spec.host_path and pv.spec.host_path.path) or (pv.spec.local and pv.spec.local.path)
        if not path:
            raise VolumeNotReady(f"persistentvolume {pv.metadata.name} has no local path")
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)

    def _prepare_volumes(self) -> None:
        base = self.root / "volumes"
        written: dict[str, dict[str, bytes]] = {}
        for volume in self.spec.get("volumes", []):
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                self.volumes[name] = self._claim_directory(volume["persistentVolumeClaim"]["claimName"])
                continue
            if "hostPath" in volume:
                self.volumes[name] = Path(volume["hostPath"]["path"])
                continue
            if (
                "emptyDir" in volume
                and (volume["emptyDir"] or {}).get("medium") == "Memory"
                and Path("/dev/shm").is_dir()  # noqa: S108 - a memory-backed emptyDir is what /dev/shm is for
            ):
                directory = Path("/dev/shm") / f"kubetune-{self.uid}-{name}"  # noqa: S108 - named by pod uid
            else:
                directory = base / name
            directory.mkdir(parents=True, exist_ok=True)
            written[name] = self._volume_files(volume) or {}
            self.volumes[name] = directory
        # Files are written once every volume has its folder: text files get their mount paths
        # rewritten like args and env, so a config file naming /workspace or a claim's mount path
        # (the operator's rendered trainer config does) points at the right folders here too.
        mounts: dict[str, Path] = {}
        for container in [*self.spec.get("initContainers", []), *self.spec.get("containers", [])]:
            mounts.update(self._mounts_of(container))
        for name, files in written.items():
            for relative, content in files.items():
                target = self.volumes[name] / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self._rewrite_file(content, mounts))

    def _rewrite_file(self, content: bytes, mounts: dict[str, Path]) -> bytes:
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            return content  # binary data stays as it is
        return self.rewrite_paths(text, mounts).encode("utf-8")

    def _termination_file(self, container: Obj) -> Path:
        return self.root / f"termination-{container['name']}.log"

    def _mounts_of(self, container: Obj) -> dict[str, Path]:
        # The termination-message file is a mount too, so a path to it in env or args is rewritten.
        mounts: dict[str, Path] = {
            container.get("terminationMessagePath", "/dev/termination-log"): self._termination_file(container)
        }
        for mount in container.get("volumeMounts", []):
            directory = self.volumes[mount["name"]]
            if mount.get("subPath"):
                directory = directory / mount["subPath"]
                if not directory.exists() and not directory.suffix:
                    directory.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"].rstrip("/") or "/"] = directory
        return mounts

    @staticmethod
    def rewrite_paths(text: str, mounts: dict[str, Path]) -> str:
        """Replace each mount path (longest first, at path boundaries) by its local folder."""
        for mount_path in sorted(mounts, key=len, reverse=True):
            pattern = re.compile(rf"(?<![\w./-]){re.escape(mount_path)}(?=/|$|[^\w.-])")
            text = pattern.sub(str(mounts[mount_path]).replace("\\", "\\\\"), text)
        return text

    # ------------------------------------------------------------------------ environment

    def _env_from_source(self, kind: str, name: str, optional: bool) -> dict[str, str]:
        obj = self._read(kind, name, optional)
        if obj is None:
            return {}
        return {k: v.decode(errors="replace") for k, v in self._files_of(kind, obj, None).items()}

    def _environment(self, container: Obj, mounts: dict[str, Path]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        home = self.root / "home"
        home.mkdir(parents=True, exist_ok=True)
        env.update(
            {
                "HOME": str(home),
                "HOSTNAME": self.hostname,
                "PYTHONUNBUFFERED": "1",
                "KUBETUNE_LOCAL_HOME": str(self.runtime.home),
                MARK_ENV: str(self.runtime.home),
                "KUBETUNE_LOCAL_POD": self.uid,
            }
        )
        spec_env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                values = self._env_from_source("ConfigMap", ref["name"], ref.get("optional", False))
            else:
                ref = source["secretRef"]
                values = self._env_from_source("Secret", ref["name"], ref.get("optional", False))
            spec_env.update({prefix + k: v for k, v in values.items()})
        for item in container.get("env", []):
            if "valueFrom" not in item:
                spec_env[item["name"]] = expand(str(item.get("value", "")), spec_env)
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                spec_env[item["name"]] = self._field(source["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in source or "secretKeyRef" in source:
                kind = "ConfigMap" if "configMapKeyRef" in source else "Secret"
                ref = source["configMapKeyRef" if kind == "ConfigMap" else "secretKeyRef"]
                values = self._env_from_source(kind, ref["name"], ref.get("optional", False))
                if ref["key"] in values:
                    spec_env[item["name"]] = values[ref["key"]]
                elif not ref.get("optional", False):
                    raise VolumeNotReady(f'{kind.lower()} "{ref["name"]}" has no key {ref["key"]!r}')
            elif "resourceFieldRef" in source:
                resource = source["resourceFieldRef"]["resource"]
                section, _, kind = resource.partition(".")
                value = ((container.get("resources") or {}).get(section) or {}).get(kind, "0")
                spec_env[item["name"]] = str(value)
        subdomains = self.runtime.subdomains(self.namespace)
        for key, value in spec_env.items():
            local_value = self.rewrite_paths(value, mounts)
            env[key] = self.runtime.addresses.resolve(local_value, self.namespace, subdomains)
        token = mounts.get(_SERVICE_ACCOUNT_DIR)
        if token is not None and (token / "token").exists():
            env["KUBECONFIG"] = str(self._service_account_kubeconfig(token))
        env["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
        env["KUBERNETES_SERVICE_PORT"] = str(self.runtime.apiserver_port)
        return env

    def _service_account_kubeconfig(self, directory: Path) -> Path:
        """A kubeconfig holding the pod's own service-account token: in-cluster config, locally."""
        path = self.root / "serviceaccount.kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "in-cluster",
                    "cluster": {
                        "server": f"https://127.0.0.1:{self.runtime.apiserver_port}",
                        "certificate-authority": str(directory / "ca.crt"),
                    },
                }
            ],
            "users": [{"name": "pod", "user": {"token": (directory / "token").read_text().strip()}}],
            "contexts": [
                {"name": "in-cluster", "context": {"cluster": "in-cluster", "user": "pod", "namespace": self.namespace}}
            ],
            "current-context": "in-cluster",
        }
        path.write_text(json.dumps(config), encoding="utf-8")
        path.chmod(0o600)
        return path

    # -------------------------------------------------------------------------- processes

    @staticmethod
    def _executable(name: str, env: dict[str, str]) -> str | None:
        if name in ("python", "python3", f"python{sys.version_info.major}.{sys.version_info.minor}"):
            return sys.executable
        if os.path.isabs(name):
            return name if os.access(name, os.X_OK) else None
        return shutil.which(name, path=env["PATH"])

    def _start(self, run: ContainerRun) -> bool:
        """Start the container's process; a start failure is reported like the kubelet's StartError."""
        container = run.spec
        mounts = self._mounts_of(container)
        try:
            env = self._environment(container, mounts)
        except VolumeNotReady as missing:
            run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(missing)}}
            return self._start_failed(run, str(missing))
        argv = [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]
        subdomains = self.runtime.subdomains(self.namespace)
        argv = [self.runtime.addresses.resolve(self.rewrite_paths(a, mounts), self.namespace, subdomains) for a in argv]
        if not argv:
            return self._start_failed(
                run,
                f"image {container.get('image')!r}: the local runtime cannot run an image's entrypoint; set command",
            )
        executable = self._executable(argv[0], env)
        if executable is None:
            return self._start_failed(run, f"executable {argv[0]!r} not found in $PATH")
        workdir = Path(self.rewrite_paths(container.get("workingDir") or str(self.root), mounts))
        if not workdir.is_dir():
            workdir = self.root / "rootfs" / str(workdir).lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        self._termination_file(container).write_bytes(b"")
        log_path = self.logs / f"{run.name}.log"
        with open(log_path, "ab") as log:
            run.process = subprocess.Popen(
                [executable, *argv[1:]],
                env=env,
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: deletion kills the whole tree
            )
        self.runtime.track(self.uid, run.process.pid)
        run.started_at = now()
        run.ready = "readinessProbe" not in container
        run.next_probe = time.monotonic() + float((container.get("readinessProbe") or {}).get("initialDelaySeconds", 0))
        run.state = {"running": {"startedAt": run.started_at}}
        return True

    def _start_failed(self, run: ContainerRun, message: str) -> bool:
        run.process = None
        run.last_state = {}
        run.state = {
            "terminated": {
                "exitCode": 128,
                "reason": "StartError",
                "message": message,
                "finishedAt": now(),
                "startedAt": now(),
            }
        }
        run.last_state = {"terminated": run.state["terminated"]}
        self.runtime.log(f"pod {self.namespace}/{self.pod_name} container {run.name}: {message}")
        return False

    def _terminated(self, run: ContainerRun, code: int) -> None:
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": run.started_at or now(),
            "finishedAt": now(),
        }
        message = self._termination_message(run, code)
        if message:
            terminated["message"] = message
        if run.process is not None:
            self.runtime.untrack(self.uid, run.process.pid)
        run.process = None
        run.ready = False
        run.state = {"terminated": terminated}
        run.last_state = {"terminated": terminated}

    def _termination_message(self, run: ContainerRun, code: int) -> str:
        """What the container wrote to its termination-message path or, per its policy, its log's tail."""
        path = self._termination_file(run.spec)
        text = path.read_text(encoding="utf-8", errors="replace")[-4096:] if path.exists() else ""
        if not text.strip() and code != 0 and run.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            log = self.logs / f"{run.name}.log"
            if log.exists():
                text = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-80:])[-2048:]
        return text.strip()

    def _kill_all(self) -> None:
        """SIGTERM every running process group, wait up to the grace period, then SIGKILL."""
        running = [r for r in [*self.init_runs, *self.runs] if r.process is not None and r.process.poll() is None]
        for run in running:
            assert run.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(r.process is not None and r.process.poll() is None for r in running):
            time.sleep(0.1)
        for run in running:
            assert run.process is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.process.pid, signal.SIGKILL)  # the group: children the process left behind too
            run.process.wait()
            self._terminated(run, _exit_code(run.process.returncode) if run.process else 137)
        for run in self.runs:
            run.restart_at = 0.0

    def _probe(self, run: ContainerRun) -> bool:
        """Run the readiness probe when due; True when readiness changed."""
        probe = run.spec.get("readinessProbe")
        if not probe or time.monotonic() < run.next_probe:
            return False
        run.next_probe = time.monotonic() + min(float(probe.get("periodSeconds", 10)), 2.0)
        timeout = float(probe.get("timeoutSeconds", 1))
        ok = False
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            if "httpGet" in probe:
                get = probe["httpGet"]
                port = self._port(run.spec, get["port"])
                url = f"http://{self.ip}:{port}{get.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    ok = 200 <= response.status < 400
            elif "tcpSocket" in probe:
                with socket.create_connection(
                    (self.ip, self._port(run.spec, probe["tcpSocket"]["port"])), timeout=timeout
                ):
                    ok = True
            elif "exec" in probe:
                ok = subprocess.run(probe["exec"]["command"], timeout=timeout, check=False).returncode == 0
        changed = ok != run.ready
        run.ready = ok
        return changed

    @staticmethod
    def _port(container: Obj, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for declared in container.get("ports", []):
            if declared.get("name") == port:
                return int(declared["containerPort"])
        raise ValueError(f"no container port named {port!r}")

    # ----------------------------------------------------------------------------- status

    def _set_waiting_all(self, reason: str, message: str) -> None:
        for run in [*self.init_runs, *self.runs]:
            run.state = {"waiting": {"reason": reason, "message": message}}

    @staticmethod
    def _container_status(run: ContainerRun) -> Obj:
        status: Obj = {
            "name": run.name,
            "image": run.spec.get("image", ""),
            "imageID": "",
            "ready": run.ready,
            "restartCount": run.restart_count,
            "started": "running" in run.state,
            "state": run.state,
        }
        if run.last_state and "running" in run.state:
            status["lastState"] = run.last_state
        return status

    def _report(self) -> None:
        """Write the pod's status (phase, conditions, container states, addresses)."""
        initialized = all("terminated" in r.state and r.state["terminated"]["exitCode"] == 0 for r in self.init_runs)
        ready = self.phase == "Running" and all(r.ready for r in self.runs)
        stamp = now()

        def condition(kind: str, value: bool) -> Obj:
            return {"type": kind, "status": "True" if value else "False", "lastTransitionTime": stamp}

        status: Obj = {
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "conditions": [
                condition("PodScheduled", True),
                condition("Initialized", initialized),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ],
            "containerStatuses": [self._container_status(r) for r in self.runs],
        }
        if self.init_runs:
            status["initContainerStatuses"] = [self._container_status(r) for r in self.init_runs]
        if self.reason:
            status["reason"] = self.reason
        if self.message:
            status["message"] = self.message
        try:
            self.core.patch_namespaced_pod_status(self.pod_name, self.namespace, {"status": status})
        except ApiException as exc:
            if exc.status != 404:  # a pod deleted meanwhile has no status left to write
                raise


ReportHook = Callable[[str], None]
