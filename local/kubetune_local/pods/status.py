"""The pod's status as a kubelet reports it: phase, conditions, addresses and container states."""

from __future__ import annotations

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


def write_status(pod: PodContext, status: Obj) -> None:
    """Patch the pod's status; a pod deleted meanwhile has no status left to write."""
    try:
        pod.core.patch_namespaced_pod_status(pod.name, pod.namespace, {"status": status})
    except ApiException as exc:
        if exc.status != 404:
            raise
