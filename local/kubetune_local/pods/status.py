"""The pod's status as a kubelet reports it: phase, conditions, addresses and container states."""

from __future__ import annotations

import time
from typing import Final

import urllib3
from kubernetes.client.exceptions import ApiException

from kubetune_local.kube import Obj, stamp
from kubetune_local.pods.context import ContainerRun, PodContext


def set_waiting(runs: list[ContainerRun], reason: str, message: str) -> None:
    """Put every container in the waiting state (a volume source is missing, say)."""
    for run in runs:
        run.state = {"waiting": {"reason": reason, "message": message}}


def container_status(run: ContainerRun) -> Obj:
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


def pod_status(
    pod: PodContext,
    *,
    phase: str,
    reason: str,
    message: str,
    start_time: str,
    init_runs: list[ContainerRun],
    runs: list[ContainerRun],
) -> Obj:
    """The pod's ``status``: phase, conditions, container states, addresses."""
    initialized = all("terminated" in r.state and r.state["terminated"]["exitCode"] == 0 for r in init_runs)
    ready = phase == "Running" and all(r.ready for r in runs)
    now = stamp()

    def condition(kind: str, value: bool) -> Obj:
        return {"type": kind, "status": "True" if value else "False", "lastTransitionTime": now}

    status: Obj = {
        "phase": phase,
        "hostIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}],
        "podIP": pod.ip,
        "podIPs": [{"ip": pod.ip}],
        "startTime": start_time,
        "conditions": [
            condition("PodScheduled", True),
            condition("Initialized", initialized),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ],
        "containerStatuses": [container_status(r) for r in runs],
    }
    if init_runs:
        status["initContainerStatuses"] = [container_status(r) for r in init_runs]
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return status


#: Tries of one status write, and the pause before the next (times the try), before the runner writes it later.
WRITE_TRIES: Final = 3
WRITE_PAUSE: Final = 0.5


def write_status(pod: PodContext, status: Obj, *, pause: float = WRITE_PAUSE) -> bool:
    """Patch the pod's status; True once written, or when the pod is gone (no status left to write).

    A refusal the apiserver may not repeat (409, 429, a 5xx, a dropped connection) is tried again,
    and then left for the runner's next report, as a kubelet's status manager does: a busy apiserver
    never stops a pod's processes. It says so in the runtime's log. Any other refusal is a bug in what
    is written, and raises.
    """
    error: Exception | None = None
    for attempt in range(1, WRITE_TRIES + 1):
        try:
            pod.core.patch_namespaced_pod_status(pod.name, pod.namespace, {"status": status})
            return True
        except ApiException as exc:
            if exc.status == 404:
                return True
            if exc.status not in (409, 429) and not 500 <= (exc.status or 0) < 600:
                raise
            error = exc
        except urllib3.exceptions.HTTPError as exc:
            error = exc
        if attempt < WRITE_TRIES:
            time.sleep(pause * attempt)
    reason = f"HTTP {error.status} {error.reason}" if isinstance(error, ApiException) else repr(error)
    pod.runtime.log(f"pod {pod.namespace}/{pod.name}: status not written ({reason}); writing it again later")
    return False
