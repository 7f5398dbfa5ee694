"""The thread that runs one pod as local processes, the way a kubelet runs it in containers.

It waits for the pod's volumes, runs the init containers in order, then supervises the
containers: restarts them per ``restartPolicy`` with back-off, probes readiness, enforces
``activeDeadlineSeconds`` and ends the pod Succeeded or Failed. Every change is written to the
pod's status, so Jobs, Deployments and the operator see what they would see in a cluster.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Final

from kubetune_local.kube import Obj, stamp
from kubetune_local.pods import processes, status
from kubetune_local.pods.context import ContainerRun, NodeRuntime, PodContext
from kubetune_local.pods.probes import probe
from kubetune_local.pods.sources import VolumeNotReady
from kubetune_local.pods.volumes import PodVolumes

_RESTART_BACKOFF_MAX: Final = 10.0


class PodRunner(threading.Thread):
    """Runs one pod to completion (or until it is deleted) and keeps its status current."""

    def __init__(self, runtime: NodeRuntime, node_name: str, pod: Obj) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}-{meta['name']}", daemon=True)
        self.runtime = runtime
        self.context = PodContext(runtime, node_name, pod)
        # What the node runtime and the kubelet server find and release a pod by.
        self.node_name = node_name
        self.namespace = self.context.namespace
        self.pod_name = self.context.name
        self.uid = self.context.uid
        self.hostname = self.context.hostname
        self.subdomain = self.context.subdomain
        self.logs = self.context.logs
        self.spec = self.context.spec
        self.volumes = PodVolumes(self.context)
        self.stopping = threading.Event()
        self.stop_reason = ""
        self.stop_message = ""
        self.deleting = False
        self.grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
        self.init_runs = [ContainerRun(c, init=True) for c in self.spec.get("initContainers", [])]
        self.runs = [ContainerRun(c) for c in self.spec.get("containers", [])]
        self.phase = "Pending"
        self.message = ""
        self.reason = ""
        self.started = time.monotonic()
        self.start_time = stamp()
        self.finished = threading.Event()
        self.unreported = False
        """Whether the last status write was refused (a busy apiserver): the next report writes it."""

    def stop(self, grace: float | None = None, *, reason: str = "", message: str = "", deleting: bool = False) -> None:
        """Stop the pod: SIGTERM the processes, SIGKILL after the grace period.

        With a ``reason`` (the node went away) the pod is then reported Failed with it. A pod being
        ``deleting`` gracefully ends in a terminal phase as a kubelet reports it: Succeeded if every
        container exited 0, else Failed, so that finalizers waiting for that (a Job's pod tracking)
        let it go. Otherwise (the runtime stops, the object is gone) no status is written.
        """
        if grace is not None:
            self.grace = grace
        self.stop_reason, self.stop_message = reason, message
        self.deleting = self.deleting or deleting
        self.stopping.set()

    def run(self) -> None:
        try:
            self._run()
            if self.stopping.is_set() and self.phase not in ("Succeeded", "Failed"):
                if self.stop_reason:
                    self.phase, self.reason, self.message = "Failed", self.stop_reason, self.stop_message
                    self._report()
                elif self.deleting:
                    self.phase = "Succeeded" if self._all_exited_zero() else "Failed"
                    self._report()
            if self.phase in ("Succeeded", "Failed"):
                self._report_until_written()
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
                self.volumes.prepare()
                break
            except VolumeNotReady as waiting:
                status.set_waiting([*self.init_runs, *self.runs], "ContainerCreating", str(waiting))
                self._report()
                self.stopping.wait(2)
        self._wait_for_ports()
        if self.stopping.is_set():
            return
        for run in self.init_runs:
            if not self._run_init(run):
                return
        self._supervise()

    def declared_ports(self) -> set[int]:
        """The container ports the pod's containers declare."""
        return {
            int(port["containerPort"])
            for run in [*self.init_runs, *self.runs]
            for port in run.spec.get("ports", [])
            if "containerPort" in port
        }

    def _wait_for_ports(self) -> None:
        """Start no container while a pod being stopped, which declares one of its ports, still runs.

        The runtime's pods share one network namespace: a replaced server that listens on 0.0.0.0
        would answer its replacement's probes on the new address (a false Ready) and hold the port
        the replacement binds. The replacement waits until those processes are gone; its own
        network namespace in a cluster would never need to.
        """
        message = ""
        while not self.stopping.is_set():
            held = sorted(self.declared_ports() & self.runtime.ports_being_released(self.uid))
            if not held:
                return
            waiting = f"port {', '.join(map(str, held))} is still held by a pod being stopped on this machine"
            if waiting != message:
                message = waiting
                status.set_waiting([*self.init_runs, *self.runs], "ContainerCreating", message)
                self._report()
            self.stopping.wait(0.2)

    def _start(self, run: ContainerRun) -> bool:
        return processes.start(self.context, run, self.volumes.mounts_of(run.spec))

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
            code = processes.exit_code(run.process.returncode)
            processes.terminated(self.context, run, code)
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
                    code = processes.exit_code(run.process.returncode)
                    processes.terminated(self.context, run, code)
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
                    changed |= probe(run, self.context.ip)
            if all(r.process is None and not r.restart_at for r in self.runs):
                codes = [r.last_state.get("terminated", {}).get("exitCode", 1) for r in self.runs]
                self.phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
                self._report()
                return
            if changed or self.unreported:
                self._report()
            time.sleep(0.2)

    def _all_exited_zero(self) -> bool:
        """Whether every container ran and its last run exited 0 (what makes a deleted pod Succeeded)."""
        return all((r.last_state.get("terminated") or {}).get("exitCode") == 0 for r in self.runs)

    def _deadline_exceeded(self) -> None:
        self._kill_all()
        self.phase, self.reason = "Failed", "DeadlineExceeded"
        self.message = f"Pod was active on the node longer than {self.spec['activeDeadlineSeconds']}s"
        self._report()

    def _kill_all(self) -> None:
        """Stop every running container (SIGTERM, SIGKILL after the grace period); no restarts follow."""
        processes.kill_all(self.context, [*self.init_runs, *self.runs], self.grace)
        for run in self.runs:
            run.restart_at = 0.0

    def _report(self) -> None:
        """Write the pod's status (phase, conditions, container states, addresses)."""
        current = status.pod_status(
            self.context,
            phase=self.phase,
            reason=self.reason,
            message=self.message,
            start_time=self.start_time,
            init_runs=self.init_runs,
            runs=self.runs,
        )
        self.unreported = not status.write_status(self.context, current)

    def _report_until_written(self, seconds: float = 60.0) -> None:
        """Write a status the apiserver refused until it takes it: a terminal phase must not be lost."""
        deadline = time.monotonic() + seconds
        while self.unreported and time.monotonic() < deadline:
            time.sleep(1.0)
            self._report()
