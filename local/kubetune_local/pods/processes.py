"""A container's process: started in the current Python environment, stopped by process group.

The image is recorded, not pulled: the command runs here, ``python`` as this interpreter. A start
that cannot happen is reported as the kubelet reports a StartError; an exit is reported with
Kubernetes' exit code (128 + N for death by signal N) and the container's termination message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from kubetune_local.kube import stamp
from kubetune_local.pods.context import ContainerRun, PodContext
from kubetune_local.pods.environment import command_line, environment
from kubetune_local.pods.sources import VolumeNotReady
from kubetune_local.pods.volumes import rewrite_paths


def exit_code(returncode: int) -> int:
    """Popen reports death by signal N as -N; Kubernetes reports 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _executable(name: str, env: dict[str, str]) -> str | None:
    if name in ("python", "python3", f"python{sys.version_info.major}.{sys.version_info.minor}"):
        return sys.executable
    if os.path.isabs(name):
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name, path=env["PATH"])


def start(pod: PodContext, run: ContainerRun, mounts: dict[str, Path]) -> bool:
    """Start the container's process; a start failure is reported like the kubelet's StartError."""
    container = run.spec
    try:
        env = environment(pod, container, mounts)
    except VolumeNotReady as missing:
        run.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(missing)}}
        return _start_failed(pod, run, str(missing))
    argv = command_line(pod, container, env, mounts)
    if not argv:
        return _start_failed(
            pod,
            run,
            f"image {container.get('image')!r}: the local runtime cannot run an image's entrypoint; set command",
        )
    executable = _executable(argv[0], env.process)
    if executable is None:
        return _start_failed(pod, run, f"executable {argv[0]!r} not found in $PATH")
    workdir = Path(rewrite_paths(container.get("workingDir") or str(pod.root), mounts))
    if not workdir.is_dir():
        workdir = pod.root / "rootfs" / str(workdir).lstrip("/")
        workdir.mkdir(parents=True, exist_ok=True)
    pod.termination_file(container).write_bytes(b"")
    with open(pod.log_file(run.name), "ab") as log:
        run.process = subprocess.Popen(
            [executable, *argv[1:]],
            env=env.process,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: deletion kills the whole tree
        )
    pod.runtime.track(pod.uid, run.process.pid)
    run.started_at = stamp()
    run.ready = "readinessProbe" not in container
    run.next_probe = time.monotonic() + float((container.get("readinessProbe") or {}).get("initialDelaySeconds", 0))
    run.state = {"running": {"startedAt": run.started_at}}
    return True


def _start_failed(pod: PodContext, run: ContainerRun, message: str) -> bool:
    run.process = None
    run.last_state = {}
    run.state = {
        "terminated": {
            "exitCode": 128,
            "reason": "StartError",
            "message": message,
            "finishedAt": stamp(),
            "startedAt": stamp(),
        }
    }
    run.last_state = {"terminated": run.state["terminated"]}
    pod.runtime.log(f"pod {pod.namespace}/{pod.name} container {run.name}: {message}")
    return False


def terminated(pod: PodContext, run: ContainerRun, code: int) -> None:
    """Record the container's exit with ``code``: its state, last state and termination message."""
    state = {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "startedAt": run.started_at or stamp(),
        "finishedAt": stamp(),
    }
    message = _termination_message(pod, run, code)
    if message:
        state["message"] = message
    if run.process is not None:
        pod.runtime.untrack(pod.uid, run.process.pid)
    run.process = None
    run.ready = False
    run.state = {"terminated": state}
    run.last_state = {"terminated": state}


def _termination_message(pod: PodContext, run: ContainerRun, code: int) -> str:
    """What the container wrote to its termination-message path or, per its policy, its log's tail."""
    path = pod.termination_file(run.spec)
    text = path.read_text(encoding="utf-8", errors="replace")[-4096:] if path.exists() else ""
    if not text.strip() and code != 0 and run.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        log = pod.log_file(run.name)
        if log.exists():
            text = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-80:])[-2048:]
    return text.strip()


def kill_all(pod: PodContext, runs: list[ContainerRun], grace: float) -> None:
    """SIGTERM every running process group, wait up to the grace period, then SIGKILL."""
    running = [r for r in runs if r.process is not None and r.process.poll() is None]
    for run in running:
        assert run.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(r.process is not None and r.process.poll() is None for r in running):
        time.sleep(0.1)
    for run in running:
        assert run.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.process.pid, signal.SIGKILL)  # the group: children the process left behind too
        run.process.wait()
        terminated(pod, run, exit_code(run.process.returncode) if run.process else 137)
