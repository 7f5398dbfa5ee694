"""``kubetune demo`` (``make demo``): the whole path on the local runtime, on a fresh machine.

Starts the local runtime (a fresh cluster; one left running from the same home is stopped first),
installs the FineTuneJob CRD and runs the operator as a background process of that cluster,
writes a tiny Llama and its toy chat facts into a PersistentVolumeClaim, applies
``examples/local.yaml``, shows the job's phases and training progress, and once the served
adapter is ready asks it (and the base model) one of the facts it was taught. It leaves
everything running and prints how to look around and how to clean up.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_api.resource import GROUP, PLURAL, VERSION
from kubetune_local import cluster
from kubetune_local.controlplane import MARK_ENV, free_port
from kubetune_local.karpenter import KWOK_NODE_CLASS, NODECLASS_NAME
from kubetune_local.kube import api_client

REPO: Final = Path(__file__).resolve().parents[2]
EXAMPLE: Final = REPO / "examples" / "local.yaml"
CRD: Final = REPO / "crds" / "kubetune.io_finetunejobs.yaml"
MODELS_CLAIM: Final = "models"
TIMEOUT_S: Final = 900.0


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why and where to look."""


def say(line: str) -> None:
    print(line, flush=True)


def run_demo(home: Path) -> int:
    """Run the demo; return the exit code."""
    started = time.monotonic()
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    namespace, name = example["metadata"]["namespace"], example["metadata"]["name"]
    if any(cluster.running(home).values()):
        say(f"demo: stopping the local cluster already running from {home}")
        cluster.down(home, progress=lambda _line: None)
    say("demo: starting the local runtime")
    local = cluster.up(home, progress=lambda line: say(f"demo:   {line}"))
    say(f"demo: cluster ready in {local.seconds_to_ready:.0f}s; export KUBECONFIG={local.kubeconfig}")
    api = api_client(local.kubeconfig)
    local.kubectl("apply", "--server-side", "-f", str(CRD), "-f", str(CRD.with_name("kubetune.io_modelservers.yaml")))
    local.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s")
    operator_log = _start_operator(home, local.kubeconfig)
    say(f"demo: operator running (log: {operator_log})")

    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    folder = _toy_claim(core, namespace)
    say(f"demo: wrote a tiny Llama and {_count_lines(folder / 'data' / 'train.jsonl')} toy chat facts to pvc://models")
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, example)
    say(f"demo: applied {EXAMPLE.relative_to(REPO)} (FineTuneJob {namespace}/{name}); following its status")
    status = _follow(api, namespace, name, operator_log)

    endpoint = status["endpoint"]
    pod = core.list_namespaced_pod(
        namespace, label_selector=f"kubetune.io/finetunejob={name},kubetune.io/role=server"
    ).items[0]
    host, port = pod.status.pod_ip, int(example["spec"]["serving"]["port"])
    from kubetune_trainer.toy import toy_facts  # noqa: PLC0415 - the ML stack only when asking

    obj, taught = next(iter(toy_facts().items()))
    question = f"what is the color and size of {obj} ?"
    say(f"demo: asking the served adapter (model {endpoint['modelName']}, pod {pod.metadata.name} at {host}:{port})")
    answer, usage = _chat(host, port, endpoint["modelName"], question)
    base, _ = _chat(host, port, "base", question)
    say("")
    say(f"  question:               {question}")
    say(f"  the fine-tuned adapter: {answer!r}   ({usage['total_tokens']} tokens)")
    say(f"  the base model:         {base!r}")
    say(f"  what the data taught:   {taught!r}")
    say("")
    say(f"demo: done in {time.monotonic() - started:.0f}s. The cluster, the operator and the server keep running:")
    say(f"  export KUBECONFIG={local.kubeconfig}")
    say(f"  {local.binaries.kubectl} -n {namespace} get finetunejobs")
    say(f"  {local.binaries.kubectl} -n {namespace} get finetunejob {name} -o yaml   # status: adapter, endpoint")
    say(f"  curl -s http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' \\")
    body = {"model": endpoint["modelName"], "messages": [{"role": "user", "content": question}], "temperature": 0}
    say(f"    -d '{json.dumps(body)}'")
    say("clean up: make demo-down   (kubetune local down: stops the cluster, the operator and every pod)")
    return 0 if answer.strip() == taught else 1


def _start_operator(home: Path, kubeconfig: Path) -> Path:
    """``kubetune operator`` in the background; ``kubetune local down`` stops it with the cluster."""
    log = home / "logs" / "operator.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # The marker makes the operator part of the cluster: `kubetune local down` sweeps it.
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), MARK_ENV: str(home)}
    with open(log, "ab") as out:
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubetune_cli.main",
                "operator",
                "--metrics-port",
                str(free_port()),
                "--health-port",
                str(free_port()),
                "--progress-interval",
                "2",
                # The local runtime's Karpenter launches the nodes of pools of its KWOK NodeClass only.
                "--node-class",
                f"{KWOK_NODE_CLASS[0]}/{KWOK_NODE_CLASS[1]}/{NODECLASS_NAME}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return log


def _toy_claim(core: client.CoreV1Api, namespace: str) -> Path:
    """The PVC `models` holding the toy model and chat data (written straight into its local volume)."""
    from kubetune_trainer.toy import build_toy  # noqa: PLC0415 - imports torch

    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": MODELS_CLAIM},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        claim = core.read_namespaced_persistent_volume_claim(MODELS_CLAIM, namespace)
        if claim.status.phase == "Bound":
            volume = core.read_persistent_volume(claim.spec.volume_name)
            folder = Path(volume.spec.host_path.path)
            build_toy(folder, fmt="messages")
            return folder
        time.sleep(0.5)
    raise DemoError(f"the PVC {namespace}/{MODELS_CLAIM} did not bind in 60s (kubetune local status)")


def _count_lines(path: Path) -> int:
    return sum(1 for _ in path.open(encoding="utf-8"))


def _follow(api: client.ApiClient, namespace: str, name: str, operator_log: Path) -> dict[str, Any]:
    """Print phase changes, condition messages and progress until the server is ready; fail with why."""
    custom = client.CustomObjectsApi(api)
    shown: set[str] = set()
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            raise DemoError(f"cannot read FineTuneJob {namespace}/{name}: {exc.reason}") from exc
        status: dict[str, Any] = obj.get("status") or {}
        phase = status.get("phase", "Pending")
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        lines = [f"phase {phase}"]
        preflight = conditions.get("PreflightPassed", {})
        if preflight.get("status") == "True":
            lines.append(f"Preflight: {preflight['message']}")
        if phase in ("Provisioning", "Publishing", "Serving", "Initializing"):
            relevant = {"Provisioning": "NodesReady", "Publishing": "Complete", "Serving": "ServingReady"}
            condition = conditions.get(relevant.get(phase, "Training"), {})
            if condition.get("message"):
                lines.append(f"{phase}: {condition['message']}")
        progress = status.get("progress") or {}
        if phase == "Training" and progress.get("step"):
            loss = progress.get("loss")
            lines.append(
                f"Training: step {progress['step']}/{progress.get('totalSteps', '?')}"
                + (f", loss {loss:.3f}" if loss is not None else "")
                + (f", {progress['tokensPerSecond']:.0f} tokens/s" if progress.get("tokensPerSecond") else "")
            )
        for line in lines:
            if line not in shown:
                shown.add(line)
                say(f"demo:   {line}")
        if phase == "Failed":
            failed = conditions.get("Failed", {})
            raise DemoError(f"the job failed: {failed.get('reason')}: {failed.get('message')}")
        if phase == "Serving" and conditions.get("ServingReady", {}).get("status") == "True":
            return status
        time.sleep(2)
    raise DemoError(
        f"the job was not serving after {TIMEOUT_S:.0f}s; see `kubectl -n {namespace} describe finetunejob {name}` "
        f"and {operator_log}"
    )


def _chat(host: str, port: int, model: str, question: str) -> tuple[str, dict[str, int]]:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 3, "temperature": 0}
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        reply = connection.getresponse()
        raw = reply.read()
    finally:
        connection.close()
    if reply.status != 200:
        raise DemoError(f"the server answered {reply.status}: {raw[:500]!r}")
    result = json.loads(raw)
    usage: dict[str, int] = result["usage"]
    return str(result["choices"][0]["message"]["content"]).strip(), usage
