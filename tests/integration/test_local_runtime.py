"""The local runtime against its acceptance: real Jobs, pods, volumes, NodeClaims and logs."""

from __future__ import annotations

import functools
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_api.resource import load_job
from kubetune_local import cluster
from kubetune_local.controlplane import free_port
from kubetune_operator.children.target import Target
from kubetune_operator.children.training import build_training_job
from kubetune_operator.progress import scrape
from kubetune_operator.settings import OperatorSettings
from tests.factories import MINIMAL, absent, finetunejob, wait_until

pytestmark = pytest.mark.integration

PYTHON = "python:3.11"  # recorded as the image; the local runtime runs the command in this environment


def pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": PYTHON, "command": ["python", "-c", script]}],
            **spec,
        },
    }


def raw_pod(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    response = client.CoreV1Api(api).read_namespaced_pod(name, namespace, _preload_content=False)
    data: dict[str, Any] = json.loads(response.data)
    return data


def phase(api: client.ApiClient, namespace: str, name: str) -> str:
    """The pod's phase, or "Deleted" once the object is gone."""
    try:
        return str(raw_pod(api, namespace, name).get("status", {}).get("phase", ""))
    except ApiException as exc:
        if exc.status == 404:
            return "Deleted"
        raise


def finished(api: client.ApiClient, namespace: str, name: str) -> str | None:
    current = phase(api, namespace, name)
    return current if current in ("Succeeded", "Failed") else None


def test_indexed_job_gang_connects_by_dns_and_completes(
    local_cluster: cluster.Cluster, api: client.ApiClient, namespace: str
) -> None:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    core.create_namespaced_service(
        namespace, {"metadata": {"name": "gang"}, "spec": {"clusterIP": "None", "selector": {"job-name": "gang"}}}
    )
    script = (
        "import os, socket, sys, time\n"
        "index, master = int(os.environ['JOB_COMPLETION_INDEX']), os.environ['MASTER_ADDR']\n"
        "if index == 0:\n"
        "    server = socket.create_server((master, 29411)); peer, _ = server.accept()\n"
        "    print('rank 0 received', peer.recv(64).decode())\n"
        "else:\n"
        "    for _ in range(200):\n"
        "        try:\n"
        "            socket.create_connection((master, 29411)).sendall(b'hello-from-rank-1'); break\n"
        "        except OSError: time.sleep(0.1)\n"
        "    else: sys.exit(4)\n"
    )
    batch.create_namespaced_job(
        namespace,
        {
            "metadata": {"name": "gang"},
            "spec": {
                "completionMode": "Indexed",
                "completions": 2,
                "parallelism": 2,
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "subdomain": "gang",
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "main",
                                "image": PYTHON,
                                "command": ["python", "-c", script],
                                "env": [{"name": "MASTER_ADDR", "value": f"gang-0.gang.{namespace}.svc.cluster.local"}],
                            }
                        ],
                    }
                },
            },
        },
    )

    def complete() -> bool:
        status = batch.read_namespaced_job("gang", namespace).status
        return any(c.type == "Complete" and c.status == "True" for c in status.conditions or [])

    wait_until(complete, timeout=90, what="the Job controller to mark the 2-pod Job Complete")
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=gang").items
    rank0 = next(p for p in pods if p.metadata.annotations["batch.kubernetes.io/job-completion-index"] == "0")
    log = cluster.pod_log(local_cluster.home, rank0.metadata.name, namespace=namespace)
    assert "rank 0 received hello-from-rank-1" in log
    assert len({p.status.pod_ip for p in pods}) == 2, "each pod has its own address"
    assert all(p.status.pod_ip.startswith("127.") for p in pods)


def test_exit_code_is_reported_in_the_container_state(api: client.ApiClient, namespace: str) -> None:
    client.CoreV1Api(api).create_namespaced_pod(namespace, pod("exit3", "import sys; sys.exit(3)"))
    assert wait_until(lambda: finished(api, namespace, "exit3"), what="pod exit3 to end") == "Failed"
    state = raw_pod(api, namespace, "exit3")["status"]["containerStatuses"][0]["state"]
    assert state["terminated"]["exitCode"] == 3
    assert state["terminated"]["reason"] == "Error"


def _pids_of(home: Path, uid: str) -> list[int]:
    marker = f"KUBETUNE_LOCAL_POD={uid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_deleted_pod_processes_are_gone_within_the_grace_period(
    local_cluster: cluster.Cluster, api: client.ApiClient, namespace: str
) -> None:
    # The process ignores SIGTERM and starts a child: only SIGKILL of the whole group ends both.
    script = (
        "import signal, subprocess, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen(['sleep', '300'])\n"
        "print('ready', flush=True); time.sleep(300)\n"
    )
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, pod("stubborn", script, terminationGracePeriodSeconds=2))
    wait_until(lambda: phase(api, namespace, "stubborn") == "Running", what="pod stubborn to run")
    uid = raw_pod(api, namespace, "stubborn")["metadata"]["uid"]
    wait_until(lambda: len(_pids_of(local_cluster.home, uid)) >= 2, what="the pod's process and its child")
    started = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace)
    wait_until(lambda: not _pids_of(local_cluster.home, uid), timeout=10, what="the pod's processes to exit")
    elapsed = time.monotonic() - started
    assert elapsed < 2 + 3, f"processes outlived the 2 s grace period by too much ({elapsed:.1f}s)"

    wait_until(
        lambda: absent(lambda: core.read_namespaced_pod("stubborn", namespace)),
        timeout=15,
        what="the pod object to be removed",
    )


def test_pod_sees_configmap_and_pvc_files_and_pvc_data_outlives_the_pod(
    local_cluster: cluster.Cluster, api: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "settings"}, "data": {"greeting": "hello"}})
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "shared"},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    script = (
        "import sys\n"
        "greeting = open(sys.argv[1] + '/greeting').read()\n"
        "open(sys.argv[2] + '/note.txt', 'w').write(greeting + ' from the pod')\n"
        "print('wrote', sys.argv[2])\n"
    )
    manifest = pod("writer", script)
    manifest["spec"]["containers"][0]["args"] = ["/etc/settings", "/data"]
    manifest["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "settings", "mountPath": "/etc/settings"},
        {"name": "shared", "mountPath": "/data"},
    ]
    manifest["spec"]["volumes"] = [
        {"name": "settings", "configMap": {"name": "settings"}},
        {"name": "shared", "persistentVolumeClaim": {"claimName": "shared"}},
    ]
    core.create_namespaced_pod(namespace, manifest)
    assert wait_until(lambda: finished(api, namespace, "writer"), what="pod writer to end") == "Succeeded"
    claim = core.read_namespaced_persistent_volume_claim("shared", namespace)
    volume = core.read_persistent_volume(claim.spec.volume_name)
    folder = Path(volume.spec.host_path.path)
    assert (folder / "note.txt").read_text() == "hello from the pod"
    assert folder.is_relative_to(local_cluster.home)

    core.delete_namespaced_pod("writer", namespace)
    core.delete_namespaced_persistent_volume_claim("shared", namespace)
    wait_until(lambda: not folder.exists(), timeout=60, what="the released volume's folder to be removed (Delete)")


def test_kubectl_logs_shows_the_pod_output(
    local_cluster: cluster.Cluster, api: client.ApiClient, namespace: str
) -> None:
    client.CoreV1Api(api).create_namespaced_pod(namespace, pod("talker", "print('line one'); print('line two')"))
    wait_until(lambda: finished(api, namespace, "talker"), what="pod talker to end")
    result = local_cluster.kubectl("logs", "-n", namespace, "talker")
    assert result.stdout == "line one\nline two\n"
    assert cluster.pod_log(local_cluster.home, "talker", namespace=namespace) == "line one\nline two\n"


def test_restart_policy_on_failure_restarts_and_counts(api: client.ApiClient, namespace: str) -> None:
    script = (
        "import os, sys\n"
        "marker = os.path.join(os.environ['HOME'], 'tried')\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').close(); sys.exit(1)\n"
        "print('second try')\n"
    )
    client.CoreV1Api(api).create_namespaced_pod(namespace, pod("retry", script, restartPolicy="OnFailure"))
    assert wait_until(lambda: finished(api, namespace, "retry"), what="pod retry to end") == "Succeeded"
    status = raw_pod(api, namespace, "retry")["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1


def test_active_deadline_fails_the_pod(api: client.ApiClient, namespace: str) -> None:
    client.CoreV1Api(api).create_namespaced_pod(
        namespace, pod("slow", "import time; time.sleep(60)", activeDeadlineSeconds=2)
    )
    assert wait_until(lambda: finished(api, namespace, "slow"), timeout=30, what="pod slow to end") == "Failed"
    assert raw_pod(api, namespace, "slow")["status"]["reason"] == "DeadlineExceeded"


def test_termination_message_and_log_fallback_reach_the_container_state(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    writes = pod("reason", "import os, sys; open(os.environ['MSG'], 'w').write('dataset is empty'); sys.exit(2)")
    writes["spec"]["containers"][0]["env"] = [{"name": "MSG", "value": "/dev/termination-log"}]
    falls_back = pod("fallback", "import sys; print('no such column: text'); sys.exit(2)")
    falls_back["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    core.create_namespaced_pod(namespace, writes)
    core.create_namespaced_pod(namespace, falls_back)
    for name, expected in (("reason", "dataset is empty"), ("fallback", "no such column: text")):
        wait_until(functools.partial(finished, api, namespace, name), what=f"pod {name} to end")
        terminated = raw_pod(api, namespace, name)["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 2
        assert terminated["message"] == expected


def test_commands_expand_only_the_pods_own_variables(
    local_cluster: cluster.Cluster, api: client.ApiClient, namespace: str
) -> None:
    """$(VAR) in a command comes from the container's env, as a kubelet has it, never from the node daemon's."""
    manifest = pod("expander", "import sys; print(sys.argv[1:])")
    manifest["spec"]["containers"][0]["args"] = ["$(DECLARED)", "$$(DECLARED)", "$(HOME)", "$(PATH)", "a$$b"]
    manifest["spec"]["containers"][0]["env"] = [{"name": "DECLARED", "value": "mine"}]
    client.CoreV1Api(api).create_namespaced_pod(namespace, manifest)
    assert wait_until(lambda: finished(api, namespace, "expander"), what="pod expander to end") == "Succeeded"
    log = cluster.pod_log(local_cluster.home, "expander", namespace=namespace)
    assert log.strip() == "['mine', '$(DECLARED)', '$(HOME)', '$(PATH)', 'a$b']"


def test_a_deleted_job_pod_ends_failed_so_the_job_lets_it_go_and_fails(api: client.ApiClient, namespace: str) -> None:
    """A kubelet reports a deleted pod's terminal phase before it goes: the Job's tracking finalizer waits for it."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    template = pod("unused", "import time; print('up', flush=True); time.sleep(300)")
    batch.create_namespaced_job(
        namespace,
        {
            "metadata": {"name": "victim"},
            "spec": {
                "backoffLimit": 0,
                # As the training Jobs: a pod failure policy makes the Job controller wait for terminal phases.
                "podFailurePolicy": {
                    "rules": [
                        {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [2]}}
                    ]
                },
                "template": {"spec": template["spec"]},
            },
        },
    )

    def running_pod() -> str | None:
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=victim").items
        return next((p.metadata.name for p in pods if p.status.phase == "Running"), None)

    name = wait_until(running_pod, what="the Job's pod to run")
    core.delete_namespaced_pod(name, namespace)
    assert wait_until(lambda: phase(api, namespace, name) == "Deleted", timeout=30, what="the deleted pod to go")

    def failed() -> bool:
        status = batch.read_namespaced_job("victim", namespace).status
        return any(c.type == "Failed" and c.status == "True" for c in status.conditions or [])

    wait_until(failed, timeout=30, what="the Job to count the deleted pod as failed")


def test_pods_serve_their_metrics_on_their_own_address(api: client.ApiClient, namespace: str) -> None:
    """Two trainers' metrics on one port: each pod serves on its own IP (the training pods' env), so each is
    scraped for its own progress; on 0.0.0.0 the second could not listen and its scrape would read the first."""
    port = free_port()
    job = load_job(finetunejob("metrics", base=MINIMAL))
    built = build_training_job(
        Target(
            name="metrics", namespace=namespace, uid="uid", spec=job.spec, settings=OperatorSettings(), gpus_per_node=0
        )
    )
    env = [e for e in built["spec"]["template"]["spec"]["containers"][0]["env"] if "valueFrom" in e]
    script = (
        "import os, sys, time\n"
        "from kubetune_trainer.training.metrics import TrainingMetrics\n"
        "metrics = TrainingMetrics()\n"
        "metrics.set('kubetune_train_step', float(sys.argv[1]))\n"
        "address = os.environ.get('KUBETUNE_METRICS_ADDRESS') or '0.0.0.0'\n"
        "print('serving' if metrics.serve(int(sys.argv[2]), address=address) else 'port taken', flush=True)\n"
        "time.sleep(120)\n"
    )
    core = client.CoreV1Api(api)
    for step in (1, 2):
        manifest = pod(f"trainer-{step}", script)
        manifest["spec"]["containers"][0]["args"] = [str(step), str(port)]
        manifest["spec"]["containers"][0]["env"] = env
        core.create_namespaced_pod(namespace, manifest)

    def scraped(step: int) -> int | None:
        found = raw_pod(api, namespace, f"trainer-{step}")
        ip = (found.get("status") or {}).get("podIP")
        progress = scrape(ip, port, timeout=1.0) if found["status"].get("phase") == "Running" and ip else None
        return progress.step if progress is not None else None

    assert wait_until(lambda: scraped(1), what="the first pod's metrics") == 1
    assert wait_until(lambda: scraped(2), what="the second pod's metrics") == 2, "each pod is scraped for its own"


def test_a_replacement_server_is_ready_on_its_own_answers_not_its_predecessors(
    api: client.ApiClient, namespace: str
) -> None:
    """Pods here share one network namespace: a server on 0.0.0.0 answers on every pod's address. A
    replaced pod that keeps serving while it stops must neither make its replacement Ready nor hold
    the port the replacement binds; the replacement starts once the predecessor's processes are gone."""
    port = free_port()
    script = (
        "import http.server, os, signal, sys, threading, time\n"
        "name = os.environ['POD_NAME'].encode()\n"
        "class Who(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(name)\n"
        "    def log_message(self, *args): pass\n"
        "server = http.server.ThreadingHTTPServer(('0.0.0.0', int(sys.argv[1])), Who)\n"
        "def linger(*_):\n"
        "    time.sleep(4); os._exit(0)\n"  # keeps answering for 4 s after SIGTERM, as a draining server
        "signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=linger).start())\n"
        "server.serve_forever()\n"
    )
    labels = {"app": "who"}
    container = {
        "name": "main",
        "image": PYTHON,
        "command": ["python", "-c", script, str(port)],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    client.AppsV1Api(api).create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "who"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"terminationGracePeriodSeconds": 10, "containers": [container]},
                },
            },
        },
    )
    core = client.CoreV1Api(api)

    def ready_pods() -> list[Any]:
        pods = core.list_namespaced_pod(namespace, label_selector="app=who").items
        return [
            p
            for p in pods
            if not p.metadata.deletion_timestamp
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
        ]

    (first,) = wait_until(ready_pods, timeout=60, what="the first server pod to be ready")
    core.delete_namespaced_pod(first.metadata.name, namespace)  # graceful: it drains for 4 s
    (second,) = wait_until(
        lambda: [p for p in ready_pods() if p.metadata.name != first.metadata.name],
        timeout=60,
        what="the replacement to be ready",
    )
    with urllib.request.urlopen(f"http://{second.status.pod_ip}:{port}/", timeout=5) as reply:
        assert reply.read().decode() == second.metadata.name, "the replacement's readiness came from its predecessor"
    assert second.status.container_statuses[0].restart_count == 0, "the replacement could not bind its port"
